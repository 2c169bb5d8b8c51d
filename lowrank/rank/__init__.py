"""Rank policies: from a spectrum (or a layer's shape) to the rank to keep.

Each policy is usable on its own and through :func:`lowrank.compress`.
"""

from lowrank.rank.policies import energy_rank

__all__ = ["energy_rank"]
