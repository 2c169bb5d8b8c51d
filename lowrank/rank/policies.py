"""Rank policies that read a spectrum."""

from __future__ import annotations

import torch


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least ``energy`` of the total ``sum(s**2)``.

    Parameters
    ----------
    singular_values : torch.Tensor
        Singular values (any order; they are sorted).
    energy : float
        Fraction of the squared Frobenius norm to keep, in (0, 1].

    Returns
    -------
    int
        A rank in ``[1, len(singular_values)]``.

    Examples
    --------
    >>> import torch
    >>> energy_rank(torch.tensor([3.0, 2.0, 1.0]), 0.9)   # 9 + 4 = 13 of 14 is 0.93
    2

    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be a fraction in (0, 1], got {energy!r}")
    squares = torch.sort(singular_values.detach().double() ** 2, descending=True).values
    kept = torch.cumsum(squares, 0)
    total = float(kept[-1])
    if total == 0.0:
        return 1
    # a relative slack of 1e-12 so that energy=1.0 is met despite rounding in the cumulative sum
    meets = torch.nonzero(kept >= energy * total * (1 - 1e-12))
    return int(meets[0]) + 1
