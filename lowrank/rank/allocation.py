"""Whole-model rank allocation under a parameter budget.

Each layer offers a menu: stay dense, or factorize at a rank ``1..max_rank``.
A rank costs parameters and drops the scores of the components it leaves out;
:func:`allocate_ranks` picks one item per layer so that the parameters fit the
budget and the total dropped score is small (a multiple-choice knapsack).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowrank.checks import check_int


@dataclass(frozen=True, eq=False)
class LayerBudget:
    """What one layer costs and loses at each rank.

    Attributes
    ----------
    scores : torch.Tensor
        1-D, finite: ``scores[k]`` is the estimated loss increase when
        component ``k`` is dropped, components being kept in order (component
        ``k`` only if all before it are). Not necessarily sorted, and may be
        negative. Stored as float64 on the CPU.
    params_per_rank : int
        Parameters one more rank costs (``rows + cols`` for a low-rank linear
        layer), ``>= 1``.
    fixed_params : int
        Parameters a factorized layer pays at any rank (e.g. its bias), ``>= 0``.
    dense_params : int
        Parameters of the layer left dense, ``>= 0``.
    max_rank : int
        The largest rank worth factorizing at (below break-even), in
        ``[0, len(scores)]``; 0 means the layer can only stay dense.

    """

    scores: torch.Tensor
    params_per_rank: int
    fixed_params: int
    dense_params: int
    max_rank: int

    def __post_init__(self) -> None:
        scores = torch.as_tensor(self.scores)
        if scores.dtype == torch.bool or scores.is_complex() or scores.ndim != 1:
            raise ValueError(f"scores must be a 1-D real tensor, got shape {tuple(scores.shape)} dtype {scores.dtype}")
        scores = scores.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("scores must be finite")
        object.__setattr__(self, "scores", scores)
        check_int(self.params_per_rank, "params_per_rank", 1)
        check_int(self.fixed_params, "fixed_params", 0)
        check_int(self.dense_params, "dense_params", 0)
        check_int(self.max_rank, "max_rank", 0)
        if self.max_rank > scores.numel():
            raise ValueError(f"max_rank ({self.max_rank}) exceeds the number of scores ({scores.numel()})")

    def params(self, rank: int | None) -> int:
        """Parameters at ``rank`` (``None``: left dense)."""
        if rank is None:
            return self.dense_params
        return self.fixed_params + rank * self.params_per_rank

    def dropped(self, rank: int | None) -> float:
        """Total score of the components dropped at ``rank`` (``None``: left dense, nothing dropped)."""
        return 0.0 if rank is None else float(self.scores[rank:].sum())

    def options(self) -> list[tuple[int, float, int | None]]:
        """Every choice as ``(params, dropped score, rank or None)``: dense, then ranks ``1..max_rank``."""
        tails = torch.flip(torch.cumsum(torch.flip(self.scores, (0,)), 0), (0,)).tolist() + [0.0]
        return [(self.dense_params, 0.0, None)] + [
            (self.params(rank), tails[rank], rank) for rank in range(1, self.max_rank + 1)
        ]


def _lower_hull(options: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """The cheapest option, then the lower convex hull of (params, dropped) down to the least dropped score.

    Collinear points are kept, so that the steps along the hull are as small as possible.
    """
    ordered = sorted(options, key=lambda item: (item[0], item[1]))
    frontier = [ordered[0]]
    for item in ordered[1:]:
        if item[1] < frontier[-1][1] and item[0] > frontier[-1][0]:
            frontier.append(item)
    hull: list[tuple[int, float, int | None]] = []
    for item in frontier:
        while len(hull) >= 2:
            (c0, l0, _), (c1, l1, _) = hull[-2], hull[-1]
            # drop the middle point when it lies strictly above the chord from hull[-2] to item
            if (l1 - l0) * (item[0] - c0) > (item[1] - l0) * (c1 - c0):
                hull.pop()
            else:
                break
        hull.append(item)
    return hull


def minimum_budget(layers: Sequence[LayerBudget]) -> int:
    """The fewest parameters any allocation needs: every layer at its cheapest choice.

    That is ``min(dense_params, fixed_params + params_per_rank)`` for a layer
    with ``max_rank >= 1``, and ``dense_params`` otherwise.
    """
    return sum(min(cost for cost, _, _ in layer.options()) for layer in layers)


def allocate_ranks(layers: Sequence[LayerBudget], budget: int) -> list[int | None]:
    """Choose a rank (or dense) per layer within a parameter budget, dropping as little score as possible.

    The problem is a multiple-choice knapsack: per layer, one of "dense"
    (``dense_params``, drops nothing) or a rank ``r`` in ``1..max_rank``
    (``fixed_params + r * params_per_rank``, drops ``sum(scores[r:])``).
    The algorithm is the classic convex-hull greedy for it:

    1. Every layer starts at its cheapest choice (rank 1, or dense when that
       is no dearer); the budget must cover these.
    2. Per layer, the choices are reduced to the lower convex hull of
       (parameters, dropped score), from the cheapest choice down to the least
       dropped score. Each step along the hull has a gain per parameter, and
       the gains decrease along the hull, so a non-monotone score sequence is
       handled (a run of small scores followed by a large one becomes one
       step with the run's average gain), and dense is just another point on
       the hull (typically the last, reached from ``max_rank`` or earlier).
    3. All steps of all layers are taken in order of decreasing gain per
       parameter while they fit. A step that does not fit freezes its layer
       (its later steps assume it); the other layers go on.
    4. With what is left of the budget, each frozen layer repeatedly moves to
       the choice (hull point or not) with the best gain per parameter that
       still fits, until no move fits or helps.

    Up to the first step that does not fit, this is the greedy that solves
    the linear relaxation exactly, so the dropped score is at most the
    optimum's plus the gain of that one step (the usual greedy bound); the
    result is optimal whenever that step is never needed, e.g. when every
    hull step costs the same (equal ``params_per_rank`` with decreasing
    scores and no dense option in reach).

    Parameters
    ----------
    layers : sequence of LayerBudget
        The layers.
    budget : int
        Total parameters allowed over these layers; respected exactly.

    Returns
    -------
    list of int or None
        Per layer, the rank (``1 <= rank <= max_rank``) or ``None`` for dense.

    Raises
    ------
    ValueError
        If ``budget`` is below :func:`minimum_budget` (the message names it).

    Examples
    --------
    >>> import torch
    >>> a = LayerBudget(torch.tensor([5.0, 3.0, 1.0]), params_per_rank=10, fixed_params=0,
    ...                 dense_params=40, max_rank=3)
    >>> b = LayerBudget(torch.tensor([4.0, 2.0, 0.5]), params_per_rank=10, fixed_params=0,
    ...                 dense_params=40, max_rank=3)
    >>> allocate_ranks([a, b], 30)   # rank 1 each (20), then the better second component: a's 3.0
    [2, 1]

    """
    layers = list(layers)
    for layer in layers:
        if not isinstance(layer, LayerBudget):
            raise ValueError(f"layers must be LayerBudget instances, got {type(layer).__name__}")
    check_int(budget, "budget", 0)
    menus = [layer.options() for layer in layers]
    hulls = [_lower_hull(menu) for menu in menus]
    needed = sum(hull[0][0] for hull in hulls)
    if budget < needed:
        raise ValueError(
            f"budget {budget} is below the minimum achievable {needed} (every layer at rank 1, "
            f"or dense where that is cheaper or the only choice)"
        )
    remaining = budget - needed

    # steps (negative gain per parameter, layer, step); gains made non-increasing per layer against rounding
    steps = []
    for index, hull in enumerate(hulls):
        ratio = math.inf
        for step in range(len(hull) - 1):
            (c0, l0, _), (c1, l1, _) = hull[step], hull[step + 1]
            ratio = min(ratio, (l0 - l1) / (c1 - c0))
            steps.append((-ratio, index, step))
    steps.sort()
    position = [0] * len(layers)
    frozen = [False] * len(layers)
    for _, index, step in steps:
        if frozen[index]:
            continue
        cost = hulls[index][step + 1][0] - hulls[index][step][0]
        if cost <= remaining:
            remaining -= cost
            position[index] = step + 1
        else:
            frozen[index] = True
    chosen = [hull[pos] for hull, pos in zip(hulls, position)]

    # fill: frozen layers move to the best-ratio choice that still fits, while one does
    tables = {
        index: (
            torch.tensor([option[0] for option in menus[index]], dtype=torch.float64),
            torch.tensor([option[1] for option in menus[index]], dtype=torch.float64),
        )
        for index, is_frozen in enumerate(frozen)
        if is_frozen
    }
    while True:
        best = None
        for index, (costs, dropped) in tables.items():
            extra, gain = costs - chosen[index][0], chosen[index][1] - dropped
            fits = (extra > 0) & (extra <= remaining) & (gain > 0)
            if not bool(fits.any()):
                continue
            ratios = torch.where(fits, gain / extra.clamp_min(1), torch.full_like(gain, -math.inf))
            option = int(torch.argmax(ratios))
            if best is None or float(ratios[option]) > best[0]:
                best = (float(ratios[option]), index, menus[index][option])
        if best is None:
            break
        _, index, option = best
        remaining -= option[0] - chosen[index][0]
        chosen[index] = option
    return [choice for _, _, choice in chosen]
