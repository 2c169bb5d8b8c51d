"""Parameter-budget arithmetic: how many parameters a fraction allows, and the largest rank that fits them.

Every "largest rank within a budget" in ``lowrank`` is computed here: a rank
policy's :func:`~lowrank.rank.param_fraction_rank`, each factorized module's
``rank_for_budget`` and the uniform allocation of data-aware compression.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lowrank.checks import check_int, is_real

# Relative slack on a fraction times a count, so that 0.29 * 100 allows 29 parameters, not 28.
_SLACK = 1e-12


def fraction_budget(fraction: float, total: int) -> int:
    """The parameters ``fraction`` of ``total`` allows: ``floor(fraction * total)``, rounding forgiven.

    Examples
    --------
    >>> fraction_budget(0.29, 100), fraction_budget(0.5, 2112)
    (29, 1056)

    """
    if not is_real(fraction) or not fraction >= 0:
        raise ValueError(f"fraction must be a number >= 0, got {fraction!r}")
    return math.floor(fraction * check_int(total, "total", minimum=0) * (1 + _SLACK))


def budget_rank(budget: int, params_per_rank: int, fixed_params: int = 0, max_rank: int | None = None) -> int:
    """The largest rank ``r`` with ``fixed_params + r * params_per_rank <= budget``, at most ``max_rank``.

    Parameters
    ----------
    budget : int
        Parameters allowed.
    params_per_rank : int
        Parameters one more rank costs, ``>= 1``.
    fixed_params : int
        Parameters paid at any rank (a bias), ``>= 0``.
    max_rank : int, optional
        The largest rank that makes sense (the matrix's smaller side).

    Returns
    -------
    int
        The rank; 0 when not even rank 1 fits.

    Examples
    --------
    >>> budget_rank(1056, 96, fixed_params=64)   # a 64x32 linear with a bias at half of its 2112 parameters
    10

    """
    budget = check_int(budget, "budget", minimum=0)
    per_rank = check_int(params_per_rank, "params_per_rank")
    fixed = check_int(fixed_params, "fixed_params", minimum=0)
    rank = max(0, (budget - fixed) // per_rank)
    return rank if max_rank is None else min(rank, max_rank)


def largest_fitting(cost: Callable[[int], int], budget: int, max_rank: int) -> int:
    """The largest ``r`` in ``[1, max_rank]`` with ``cost(r) <= budget``, for a ``cost`` increasing in ``r``; else 0.

    For structures whose size grows faster than linearly in the rank (a
    Tucker-2 core, the inner cores of a tensor train); found by bisection.

    Examples
    --------
    >>> largest_fitting(lambda r: 10 * r + r * r, 100, 50)   # 10 * 7 + 49 = 119 > 100 >= 96
    6

    """
    low, high = 0, check_int(max_rank, "max_rank", minimum=0)
    while low < high:
        middle = (low + high + 1) // 2
        if cost(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low
