"""Greedy structure search of a tensor network.

After Hashemizadeh, Liu, Miller and Rabusseau, "Adaptive Learning of Tensor
Network Structures": start from the network with every rank one, try raising
each edge's rank, keep the edge that lowers the error most per parameter
added, refit, and repeat until a target error, a parameter budget, a step
limit or a time limit is reached; then, once the target error is reached,
shrink the network (lower bonds, split cores into internal ones) while the
error stays within it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from lowrank.checks import check_bool, check_fraction, check_int, check_nonnegative, check_positive, check_tol
from lowrank.decompose._inputs import checked_input, make_generator
from lowrank.decompose._linalg import leading_left_subspace, unfold
from lowrank.decompose.factorizations import SearchStep, TensorNetwork
from lowrank.decompose.tn_edits import (
    core_spectrum,
    internal_groups,
    lower_bond,
    merge_group,
    merge_while_saving,
    split_core,
)
from lowrank.decompose.tn_fit import Entries, als, checked_mask, entries_of

# While the search's relative error is above this, it contracts and forms Gram matrices in float32 (the
# solves stay in float64): about twice as fast. Float32 Gram matrices and their ridge stall ALS near a
# relative error of 1e-3 (3e-3 on a planted 6^4 train), well below this.
SINGLE_PRECISION_ERROR = 3e-2
# The relative ridge of float32 Gram matrices: near float32's rounding, so that a bond grown beyond the
# rank the data supports leaves a solvable system (1e-10, still far above the float64 RIDGE, let a
# LIVE-image search diverge; 1e-6 stalled the planted train near 1e-2).
SINGLE_PRECISION_RIDGE = 1e-7
# A completion search stops after this many steps without a lower error on its held-out entries.
HOLDOUT_PATIENCE = 3
# The most ALS sweeps of the refit after an edit that shrinks a network within its tolerance. A refit
# stops once within it, or once its rate of decrease could not get there in the sweeps left; an edge
# lowered on a planted ring took about 1000 sweeps to come back within 1e-4.
SHRINK_SWEEPS = 1000
_SINGLE = {"gram_dtype": torch.float32, "ridge": SINGLE_PRECISION_RIDGE}


def rank_one_cores(x: torch.Tensor) -> list[torch.Tensor]:
    """Cores of the all-ranks-one network, from each unfolding's leading singular vector."""
    ndim = x.ndim
    cores = []
    for k in range(ndim):
        vector = leading_left_subspace(unfold(x, k), 1)[:, 0]
        shape = [1] * ndim
        shape[k] = x.shape[k]
        cores.append(vector.reshape(shape))
    return cores


def bond_bound(cores: Sequence[torch.Tensor], i: int, j: int) -> int:
    """Largest useful rank of bond ``(i, j)``: no larger than the other dimensions of either core."""
    return min(cores[i].numel() // cores[i].shape[j], cores[j].numel() // cores[j].shape[i])


def bond_slices(
    cores: Sequence[torch.Tensor], i: int, j: int, count: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """The cores with cores ``i`` and ``j`` replaced by ``count`` new slices of their bond.

    Zeros in core ``i`` and random ones of core ``j``'s scale in core ``j``
    (drawn in float64 in any dtype, so that a search draws the same slices in
    either precision): the start of a fit of the slices alone to the residual
    of ``cores`` (:func:`als` over modes ``(i, j)``), which :func:`join_slices`
    adds to the network.
    """
    slices = list(cores)
    shape_i, shape_j = list(cores[i].shape), list(cores[j].shape)
    shape_i[j] = shape_j[i] = count
    slices[i] = cores[i].new_zeros(shape_i)
    scale = float(cores[j].abs().mean()) or 1.0
    noise = torch.randn(shape_j, generator=generator, device=cores[j].device, dtype=torch.float64)
    slices[j] = (scale * noise).to(cores[j].dtype)
    return slices


def join_slices(cores: Sequence[torch.Tensor], slices: Sequence[torch.Tensor], i: int, j: int) -> list[torch.Tensor]:
    """One network that is the sum of ``cores`` and ``slices``, two networks that differ in cores ``i`` and ``j`` only.

    Cores ``i`` and ``j`` are stacked along their bond, whose rank becomes the
    sum of the two ranks.
    """
    joined = list(cores)
    joined[i] = torch.cat([cores[i], slices[i]], dim=j)
    joined[j] = torch.cat([cores[j], slices[j]], dim=i)
    return joined


def tn(
    x: Any,
    *,
    tol: float | None = None,
    max_params: int | None = None,
    max_steps: int = 200,
    time_limit: float | None = None,
    mask: Any = None,
    holdout: float = 0.1,
    growth: float = 0.0,
    n_sweeps: int = 30,
    candidate_sweeps: int = 2,
    final_sweeps: int = 50,
    prune: bool = True,
    split: bool = True,
    seed: int | None = 0,
) -> TensorNetwork:
    """Learn a tensor network's structure and cores by greedy edge growth.

    Starts from the network with every rank one (fitted by ALS). Each step
    raises the rank of one bond: every bond is scored by fitting only its new
    slices in the two cores it joins to the current residual, all other
    cores fixed (``candidate_sweeps`` ALS sweeps), the bond that lowers the
    error most per parameter added is kept, and every core is refitted (at
    most ``n_sweeps`` sweeps). The network is polished by up to
    ``final_sweeps`` sweeps at the end. The search stops when the error is at
    most ``tol``, no bond fits in ``max_params``, no bond lowers the error,
    or after ``max_steps`` steps or ``time_limit`` seconds.

    With ``mask`` the search completes a partly observed tensor: cores are
    fitted on the observed entries only, except a ``holdout`` fraction of them
    (drawn with ``seed``) on which bonds are scored. The search stops after
    ``HOLDOUT_PATIENCE`` (3) steps without a lower error on the held-out
    entries and goes back to the network of the lowest, so it stops growing
    when a larger network no longer predicts unseen entries better. The final
    polish fits all observed entries.

    While the error is above ``SINGLE_PRECISION_ERROR`` (3e-2), scoring,
    refits and the polish contract and form their normal equations in float32
    (solving them in float64, with a relative ridge of
    ``SINGLE_PRECISION_RIDGE``), which halves their cost; a refit that ends
    below it goes on in ``x``'s precision, as does everything after. The
    logged errors are computed in ``x``'s precision.

    Once the error is at most ``tol``, the network is made smaller while it
    stays within ``tol`` (each edit refitted by up to ``SHRINK_SWEEPS`` ALS
    sweeps and kept only if it does): with ``prune``, bonds are lowered one
    rank at a time, the costliest first, undoing growth the greedy order
    overshot; with ``split``, a core whose matricisation (its mode against
    its bonds) is numerically low-rank is split into a leaf and an internal
    core, and internal cores are merged where that saves parameters, so a
    Tucker tensor ends as its Tucker network (one internal core).

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        A tensor with at least two modes. Entries where ``mask`` is false are
        ignored (they may be NaN).
    tol : float, optional
        Target relative error in (0, 1) (on the fitted entries).
    max_params : int, optional
        Parameter budget; at least the rank-one network's ``sum(x.shape)``.
    max_steps : int
        Largest number of accepted bond increments.
    time_limit : float, optional
        Seconds after which the search stops; a step under way when it
        expires is dropped and the final polish is cut short, so the search
        overruns by at most one candidate fit and one sweep.
    mask : torch.Tensor or numpy.ndarray, optional
        Boolean (or 0/1) tensor of ``x``'s shape, true where an entry is observed.
    holdout : float
        Fraction of the observed entries held out to score bonds on, in
        [0, 1) (0 scores bonds on the fitted entries). Used only with ``mask``.
    growth : float
        Relative rank increment: a step raises a bond of rank ``r`` by
        ``max(1, floor(growth * r))`` (within the budget), so large tensors
        reach a large budget in fewer steps. 0 (the default) adds one at a time.
        On the 4^8 LIVE images at budgets up to 8192, ``growth=0.5,
        candidate_sweeps=1, n_sweeps=3`` reaches the budget within a minute
        (``benchmarks/tn_search.py``).
    n_sweeps, candidate_sweeps, final_sweeps : int
        ALS sweeps after each accepted step (at most; a refit stops when a
        sweep gains less than 1e-5 of the error), for scoring each candidate,
        and at the end. 30 refit sweeps recovered more planted structures than
        10 (``benchmarks/tn_search.py``).
    prune : bool
        Lower bonds once within ``tol`` (see above).
    split : bool
        Split cores into internal ones once within ``tol`` (see above).
    seed : int or None
        Seed of the random slices that new bonds start from and of the holdout draw.

    Returns
    -------
    TensorNetwork
        The network, with the search in ``log`` (structure, parameters, error
        on the fitted entries, error on the held-out ones and elapsed time
        after every step; the last entry is after the polish or the
        shrinking, of the network returned, which with a held-out part may be
        an earlier step's). Its internal cores, if any, come last.

    Examples
    --------
    >>> import torch, lowrank
    >>> _ = torch.manual_seed(0)
    >>> a, b = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    >>> x = torch.einsum("ir,rjk->ijk", a, b)      # mode 0 joined to the rest by a rank-3 bond
    >>> net = lowrank.decompose.tn(x, tol=1e-6)
    >>> net.relative_error(x) < 1e-6, net.edges, net.ranks[0][1]
    (True, ((0, 1), (1, 2)), 3)
    >>> core, factors = torch.randn(2, 3, 2, 2, dtype=torch.float64), [torch.randn(6, r, dtype=torch.float64)
    ...                                                                  for r in (2, 3, 2, 2)]
    >>> x = torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, *factors)   # Tucker, 24 + 54 parameters
    >>> net = lowrank.decompose.tn(x, tol=1e-6)
    >>> net.relative_error(x) < 1e-6, net.n_internal, net.num_params
    (True, 1, 78)

    """
    start = time.perf_counter()
    observed = checked_mask(mask, x)
    if observed is not None:
        x = torch.as_tensor(x).masked_fill(~observed.to(torch.as_tensor(x).device), 0.0)
    x, work, sq_norm, scale = checked_input(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 modes for a tensor network, got shape {tuple(x.shape)}")
    tol = check_tol(tol)
    max_steps = check_int(max_steps, "max_steps", minimum=0)
    n_sweeps = check_int(n_sweeps, "n_sweeps")
    candidate_sweeps = check_int(candidate_sweeps, "candidate_sweeps")
    final_sweeps = check_int(final_sweeps, "final_sweeps", minimum=0)
    max_params = _checked_budget(max_params, x.shape)
    if time_limit is not None:
        time_limit = check_positive(time_limit, "time_limit")
    holdout = check_fraction(holdout, "holdout", low_closed=True, high_closed=False)
    growth = check_nonnegative(growth, "growth")
    prune, split = check_bool(prune, "prune"), check_bool(split, "split")
    generator = make_generator(seed, x.device)
    deadline = math.inf if time_limit is None else start + time_limit
    observed_entries = entries_of(work, None if observed is None else observed.to(work))
    fitted, held_out = observed_entries, None
    if observed is not None and holdout > 0:
        fitted, held_out = _holdout_split(work, observed_entries.mask, holdout, generator)
    cores = rank_one_cores(fitted.target)
    als(fitted.target, cores, fitted.sq_norm, n_sweeps, mask=fitted.mask, deadline=deadline)
    error = fitted.error(cores)
    log = [_step(cores, error, held_out, start)]
    kept = (cores, error, 0)  # with a held-out part: the network that predicts it best, and its step
    for _ in range(max_steps):
        if (tol is not None and error <= tol) or time.perf_counter() > deadline:
            break
        if held_out is not None and len(log) - 1 - kept[2] >= HOLDOUT_PATIENCE:
            break
        entries, options = _precision(fitted, error)
        best = _best_candidate(
            [c.to(entries.target.dtype) for c in cores], entries, held_out, max_params, growth, candidate_sweeps,
            generator, deadline, options,
        )
        if best is None:
            break
        cores, error = _refit(best, fitted, error, n_sweeps, 1e-5, deadline)
        log.append(_step(cores, error, held_out, start))
        if held_out is not None and log[-1].holdout_error < log[kept[2]].holdout_error:
            kept = (cores, error, len(log) - 1)
    if held_out is not None:
        cores, error, _ = kept
    polish = final_sweeps and (tol is None or error > tol or held_out is not None)
    if polish and observed_entries.sq_norm > 0 and time.perf_counter() < deadline:
        cores, error = _refit(cores, observed_entries, error, final_sweeps, 1e-6, deadline)
        log.append(_step(cores, error, None, start))
    if tol is not None and error <= tol and (prune or split):
        shrunk, error = _shrink(cores, observed_entries, tol, error, SHRINK_SWEEPS, prune, split, deadline)
        if shrunk is not cores:
            cores = shrunk
            if final_sweeps:
                cores, error = _refit(cores, observed_entries, error, final_sweeps, 1e-6, deadline)
            log.append(_step(cores, error, None, start))
    cores[-1] = cores[-1] * scale
    n_internal = len(cores) - x.ndim
    return TensorNetwork(tuple(c.to(x.dtype) for c in cores), tuple(log), n_internal)


def _shrink(
    cores: list[torch.Tensor],
    entries: Entries,
    tol: float,
    error: float,
    n_sweeps: int,
    prune: bool,
    split: bool,
    deadline: float,
) -> tuple[list[torch.Tensor], float]:
    """The network made smaller while its error stays at most ``tol``: bonds lowered, cores split.

    With ``prune``, :func:`_prune`; with ``split``, :func:`_split_cores`,
    then :func:`_prune` again if a core was split. Each edit is refitted (at
    most ``n_sweeps`` ALS sweeps) and kept only if the error stays at most
    ``tol``. Returns ``cores`` itself when nothing changed.
    """
    shrunk = cores
    if prune:
        shrunk, error = _prune(shrunk, entries, tol, error, n_sweeps, deadline)
    if split:
        before = len(shrunk)
        shrunk, error = _split_cores(shrunk, entries, tol, error, n_sweeps, deadline)
        if prune and len(shrunk) > before:
            shrunk, error = _prune(shrunk, entries, tol, error, n_sweeps, deadline)
    return shrunk, error


def _within_tol(
    trial: list[torch.Tensor], entries: Entries, tol: float, n_sweeps: int, deadline: float
) -> tuple[list[torch.Tensor], float] | None:
    """``trial`` refitted by ALS and its error, if that error is at most ``tol``; else None."""
    # the refit starts within reach of tol, so tol picks its precision
    trial, error = _refit(trial, entries, tol, n_sweeps, 1e-6, deadline, stop_error=tol)
    return (trial, error) if error <= tol else None


def _prune(
    cores: list[torch.Tensor], entries: Entries, tol: float, error: float, n_sweeps: int, deadline: float
) -> tuple[list[torch.Tensor], float]:
    """Bonds lowered by one rank at a time (:func:`lower_bond`), costliest first, while the refit stays within ``tol``.

    Passes over all bonds repeat until one lowers none. Returns ``cores``
    itself when none was lowered.
    """
    lowered = True
    while lowered:
        lowered = False
        bonds = [(i, j) for i, j in itertools.combinations(range(len(cores)), 2) if cores[i].shape[j] > 1]
        for i, j in sorted(bonds, key=lambda bond: -_rank_cost(cores, *bond)):
            if time.perf_counter() > deadline:
                return cores, error
            kept = _within_tol(lower_bond(cores, i, j, cores[i].shape[j] - 1), entries, tol, n_sweeps, deadline)
            if kept is not None:
                (cores, error), lowered = kept, True
    return cores, error


def _split_cores(
    cores: list[torch.Tensor], entries: Entries, tol: float, error: float, n_sweeps: int, deadline: float
) -> tuple[list[torch.Tensor], float]:
    """Mode cores split into leaves and internal cores, internal cores merged, while the refit stays within ``tol``.

    Tries the edits of :func:`_splitting_edits`, fewest parameters first,
    keeps the first whose refit stays within ``tol``, and starts again from
    it until none does.
    """
    n_modes = entries.target.ndim
    edited = True
    while edited:
        edited = False
        for trial in _splitting_edits(cores, n_modes, tol):
            if time.perf_counter() > deadline:
                return cores, error
            kept = _within_tol(trial, entries, tol, n_sweeps, deadline)
            if kept is not None:
                (cores, error), edited = kept, True
                break
    return cores, error


def _splitting_edits(cores: list[torch.Tensor], n_modes: int, tol: float) -> list[list[torch.Tensor]]:
    """Smaller structures to try: one mode core split, or one group of internal cores merged and every core split.

    Mode core ``k`` is split (:func:`split_core`) at the numerical rank of
    its matricisation (the singular values above ``tol`` times the largest),
    internal cores are then merged while that saves
    (:func:`merge_while_saving`), and the split is kept if the two together
    save parameters. A group of joined internal cores is merged even if that
    alone costs parameters, since it can make a split of the cores around it
    pay. Returned: the edits with fewer parameters than ``cores``, fewest
    first.
    """
    def split_where_it_saves(edited: list[torch.Tensor], modes: Sequence[int]) -> list[torch.Tensor]:
        for k in modes:
            spectrum = core_spectrum(edited[k], k)
            rank = int(torch.sum(spectrum > tol * spectrum[0]))
            if rank < spectrum.numel():
                split = merge_while_saving(split_core(edited, k, rank), n_modes)
                edited = split if _size(split) < _size(edited) else edited
        return edited

    trials = [split_where_it_saves(cores, [k]) for k in range(n_modes)]
    trials += [split_where_it_saves(merge_group(cores, group), range(n_modes))
               for group in internal_groups(cores, n_modes)]
    return sorted((trial for trial in trials if _size(trial) < _size(cores)), key=_size)


def _size(cores: Sequence[torch.Tensor]) -> int:
    """Parameters of a network's cores."""
    return sum(c.numel() for c in cores)


def _rank_cost(cores: Sequence[torch.Tensor], i: int, j: int) -> int:
    """Parameters one unit of rank of the bond between cores ``i`` and ``j`` costs."""
    return cores[i].numel() // cores[i].shape[j] + cores[j].numel() // cores[j].shape[i]


def _holdout_split(
    target: torch.Tensor, mask: torch.Tensor, holdout: float, generator: torch.Generator
) -> tuple[Entries, Entries | None]:
    """The observed entries split at random into fitted ones and a held-out ``holdout`` fraction of them."""
    draw = torch.rand(mask.shape, generator=generator, device=mask.device, dtype=torch.float64) < holdout
    held = mask * draw.to(mask)
    if not bool(held.any()) or bool(torch.equal(held, mask)):
        return entries_of(target, mask), None
    return entries_of(target, mask - held), entries_of(target, held)


def _checked_budget(max_params: int | None, shape: Sequence[int]) -> int | None:
    """``max_params``, checked to hold at least the rank-one network."""
    if max_params is None:
        return None
    max_params = check_int(max_params, "max_params")
    if max_params < sum(shape):
        raise ValueError(
            f"max_params={max_params} is below the {sum(shape)} parameters of the rank-one network "
            f"of shape {tuple(shape)} (the sum of its dimensions)"
        )
    return max_params


def _precision(entries: Entries, error: float) -> tuple[Entries, dict[str, Any]]:
    """The entries and :func:`als` options a fit at relative ``error`` runs with (see ``SINGLE_PRECISION_ERROR``)."""
    if error > SINGLE_PRECISION_ERROR:
        return entries.to(torch.float32), _SINGLE
    return entries, {}


def _refit(
    cores: list[torch.Tensor],
    entries: Entries,
    error: float,
    n_sweeps: int,
    stop_rtol: float,
    deadline: float,
    stop_error: float = 0.0,
) -> tuple[list[torch.Tensor], float]:
    """All cores refitted by ALS from a network of relative ``error``, in the precision that error calls for.

    A fit in float32 that ends below ``SINGLE_PRECISION_ERROR`` goes on in the
    entries' own precision; either stops early at ``stop_error`` (see
    :func:`als`). Returns the cores in that precision and their error,
    computed in it.
    """
    entries = entries.padded(len(cores))  # one trailing size-1 dimension per internal core
    fit_entries, options = _precision(entries, error)
    cores = [c.to(fit_entries.target.dtype) for c in cores]
    als(fit_entries.target, cores, fit_entries.sq_norm, n_sweeps, mask=fit_entries.mask, stop_rtol=stop_rtol,
        deadline=deadline, stop_error=stop_error, **options)
    cores = [c.to(entries.target.dtype) for c in cores]
    error = entries.error(cores)
    if options and error <= SINGLE_PRECISION_ERROR and time.perf_counter() <= deadline:
        als(entries.target, cores, entries.sq_norm, n_sweeps, mask=entries.mask, stop_rtol=stop_rtol,
            deadline=deadline, stop_error=stop_error)
        error = entries.error(cores)
    return cores, error


def _best_candidate(
    cores: list[torch.Tensor],
    fitted: Entries,
    held_out: Entries | None,
    max_params: int | None,
    growth: float,
    sweeps: int,
    generator: torch.Generator,
    deadline: float,
    options: dict[str, Any],
) -> list[torch.Tensor] | None:
    """The cores with the bond of best gain per parameter grown; None when no bond fits or helps.

    A bond of rank ``r`` grows by ``max(1, floor(growth * r))``, less where its
    bound or the budget allow less. Its new slices alone are fitted to the
    residual (``sweeps`` ALS sweeps with ``options``); the gain is the drop of
    the error on the ``held_out`` entries if given, else on the fitted ones.
    """
    params = _size(cores)
    ndim = len(cores)
    residual = fitted.target - TensorNetwork(tuple(cores)).to_tensor()
    if fitted.mask is not None:
        residual = residual * fitted.mask
    sq_residual = float(torch.sum(residual.double() ** 2))
    if sq_residual == 0 or fitted.sq_norm == 0:
        return None
    current = math.sqrt(sq_residual / fitted.sq_norm) if held_out is None else held_out.error(cores)
    best, best_gain = None, 0.0
    for i, j in itertools.combinations(range(ndim), 2):
        per_rank = _rank_cost(cores, i, j)
        count = min(max(1, math.floor(growth * cores[i].shape[j])), bond_bound(cores, i, j) - cores[i].shape[j])
        if max_params is not None:
            count = min(count, (max_params - params) // per_rank)
        if count < 1:
            continue
        added = count * per_rank
        if time.perf_counter() > deadline:
            return None  # a step cut short compares too few bonds to be trusted
        slices = bond_slices(cores, i, j, count, generator)
        left = als(residual, slices, sq_residual, sweeps, modes=(i, j), mask=fitted.mask, stop_rtol=0.0, **options)
        candidate = join_slices(cores, slices, i, j)
        if held_out is None:
            candidate_error = left * math.sqrt(sq_residual / fitted.sq_norm)
        else:
            candidate_error = held_out.error(candidate)
        gain = (current - candidate_error) / added
        if gain > best_gain:
            best, best_gain = candidate, gain
    return best


def _step(cores: Sequence[torch.Tensor], error: float, held_out: Entries | None, start: float) -> SearchStep:
    ranks = tuple(tuple(c.shape) for c in cores)
    holdout_error = None if held_out is None else held_out.error(cores)
    return SearchStep(ranks, _size(cores), error, time.perf_counter() - start, holdout_error)


