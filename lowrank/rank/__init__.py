"""Rank policies: from a spectrum (or a layer's shape) to the rank to keep, and budgets across layers.

Rules as functions ("spectrum in, rank out"):

- :func:`energy_rank` -- smallest rank keeping a fraction of ``sum(s**2)``
- :func:`threshold_rank` -- singular values above a (relative) threshold
- :func:`stable_rank` -- ``ceil(sum(s**2) / max(s)**2)``
- :func:`vbmf_rank` (and :func:`vbmf`, :class:`VBMFResult`) -- empirical variational Bayes matrix factorization
- :func:`heavy_tail_rank` -- WeLore's threshold on the min-max normalised spectrum
- :func:`param_fraction_rank` -- largest rank within a fraction of the dense parameters

The same rules as frozen policy objects for ``lowrank.compress(model, rank=...)``, each
with ``min_rank`` / ``max_rank`` and ``choose(singular_values, shape)``:

- :class:`RankPolicy` (the base), :class:`FixedRank`, :class:`ParamFraction`,
  :class:`Energy`, :class:`Threshold`, :class:`StableRank`, :class:`VBMF`, :class:`HeavyTail`
- :func:`policy_from_string` -- ``"vbmf"``, ``"energy:0.9"``, ``"fixed:32,max=64"`` ...

Whole-model allocation under a parameter budget:

- :class:`LayerBudget`, :func:`allocate_ranks`, :func:`minimum_budget`
"""

from lowrank.rank.allocation import LayerBudget, allocate_ranks, minimum_budget
from lowrank.rank.policies import (
    VBMF,
    Energy,
    FixedRank,
    HeavyTail,
    ParamFraction,
    RankPolicy,
    StableRank,
    Threshold,
    energy_rank,
    heavy_tail_rank,
    param_fraction_rank,
    policy_from_string,
    stable_rank,
    threshold_rank,
)
from lowrank.rank.vbmf import VBMFResult, vbmf, vbmf_rank

__all__ = [
    "VBMF",
    "Energy",
    "FixedRank",
    "HeavyTail",
    "LayerBudget",
    "ParamFraction",
    "RankPolicy",
    "StableRank",
    "Threshold",
    "VBMFResult",
    "allocate_ranks",
    "energy_rank",
    "heavy_tail_rank",
    "minimum_budget",
    "param_fraction_rank",
    "policy_from_string",
    "stable_rank",
    "threshold_rank",
    "vbmf",
    "vbmf_rank",
]
