"""Tensor networks of learned structure: ALS fitting and greedy edge growth.

After Hashemizadeh, Liu, Miller and Rabusseau, "Adaptive Learning of Tensor
Network Structures": start from the network with every rank one, try raising
each edge's rank, keep the edge that lowers the error most per parameter
added, refit, and repeat until a target error, a parameter budget, a step
limit or a time limit is reached.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowrank.decompose._checks import check_positive_int, check_tol, checked_input, compute_dtype, make_generator
from lowrank.decompose._linalg import leading_left_subspace, unfold
from lowrank.decompose.factorizations import SearchStep, TensorNetwork, network_expression, network_subscripts

# While the search's relative error is above this, it contracts and forms Gram matrices in float32 (the
# solves stay in float64): about twice as fast. Float32 Gram matrices and their ridge stall ALS near a
# relative error of 1e-3 (3e-3 on a planted 6^4 train), well below this.
SINGLE_PRECISION_ERROR = 3e-2
# The relative ridge of float32 Gram matrices: near float32's rounding, so that a bond grown beyond the
# rank the data supports leaves a solvable system (1e-10, the float64 ridge, let a LIVE-image search
# diverge; 1e-6 stalled the planted train near 1e-2).
SINGLE_PRECISION_RIDGE = 1e-7
# A completion search stops after this many steps without a lower error on its held-out entries.
HOLDOUT_PATIENCE = 3
_SINGLE = {"gram_dtype": torch.float32, "ridge": SINGLE_PRECISION_RIDGE}


def environment(cores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Contract every core but ``k`` into a matrix ``(bonds of core k, physical modes of the others)``.

    Rows run over core ``k``'s bonds in the order of its dimensions, columns
    over the other modes in increasing order, as in the mode-``k`` unfolding.
    """
    ndim = len(cores)
    inputs, output = network_subscripts(ndim)
    others = [i for i in range(ndim) if i != k]
    result = "".join(inputs[k][j] for j in others) + "".join(output[j] for j in others)
    equation = ",".join(inputs[i] for i in others) + "->" + result
    operands = [cores[i] for i in others]
    env = network_expression(equation, *(tuple(op.shape) for op in operands))(*operands, backend="torch")
    return env.reshape(math.prod(cores[k].shape[j] for j in others), -1)


def als_update(
    target_unfolding: torch.Tensor,
    cores: list[torch.Tensor],
    k: int,
    ridge: float,
    mask_unfolding: torch.Tensor | None = None,
    gram_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, float]:
    """The least-squares core ``k`` given all others, and the squared error it leaves.

    Solves ``min ||X_(k) - G M||² + ridge * trace(M Mᵀ) / R * ||G||²`` through
    the normal equations, where ``X_(k)`` is the mode-``k`` unfolding of the
    target and ``M`` the :func:`environment` of core ``k``. The Gram matrix
    ``M Mᵀ`` and ``X_(k) Mᵀ`` are formed in ``gram_dtype`` (float32 halves
    their cost, at float32's rounding), the system is solved in float64.
    With ``mask_unfolding`` (1 where an entry is observed, 0 elsewhere; the
    target must be 0 where it is not observed), only observed entries count:
    each row of ``G`` (one index of mode ``k``) is the least-squares solution
    over the entries observed in that row.

    Returns
    -------
    core : torch.Tensor
        The new core ``k``, in the cores' dtype.
    sq_error : float
        ``||X_(k) - G M||²`` (over the observed entries) minus ``||X||²``
        (add the target's squared norm to get the error).

    """
    env = environment(cores, k).to(gram_dtype)
    rhs = (target_unfolding.to(gram_dtype) @ env.T).double()
    if mask_unfolding is None:
        gram = (env @ env.T).double()
        shift = ridge * float(torch.trace(gram)) / gram.shape[0] + 1e-300
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        solution = torch.linalg.solve(gram + shift * eye, rhs.T).T
        sq_error_offset = float(torch.sum((solution @ gram) * solution) - 2 * torch.sum(solution * rhs))
    else:
        mask = mask_unfolding.to(gram_dtype)
        grams = torch.stack([(env * row) @ env.T for row in mask]).double()  # one Gram per index of mode k
        shifts = ridge * torch.diagonal(grams, dim1=1, dim2=2).mean(1) + 1e-300
        eye = torch.eye(env.shape[0], dtype=grams.dtype, device=env.device)
        solution = torch.linalg.solve(grams + shifts[:, None, None] * eye, rhs.unsqueeze(-1)).squeeze(-1)
        sq_error_offset = float(
            torch.einsum("ib,ibd,id->", solution, grams, solution) - 2 * torch.sum(solution * rhs)
        )
    bond_shape = [size for j, size in enumerate(cores[k].shape) if j != k]
    core = solution.reshape(cores[k].shape[k], *bond_shape).movedim(0, k).to(cores[k].dtype)
    return core, sq_error_offset


def als(
    target: torch.Tensor,
    cores: list[torch.Tensor],
    sq_norm: float,
    n_sweeps: int,
    *,
    modes: Sequence[int] | None = None,
    mask: torch.Tensor | None = None,
    stop_rtol: float = 1e-5,
    ridge: float = 1e-10,
    gram_dtype: torch.dtype = torch.float64,
    deadline: float = math.inf,
) -> float:
    """Alternating least squares over the cores (in place); returns the final relative error.

    Parameters
    ----------
    target : torch.Tensor
        The tensor to fit (0 where ``mask`` is 0).
    cores : list of torch.Tensor
        The network's cores, updated in place.
    sq_norm : float
        ``||target||²`` (over the observed entries).
    n_sweeps : int
        Largest number of sweeps over ``modes``.
    modes : sequence of int, optional
        The cores to update (all by default), in this order.
    mask : torch.Tensor, optional
        1 where an entry of ``target`` is observed and 0 elsewhere: only the
        observed entries are fitted, and the error is theirs.
    stop_rtol : float
        Stop when a sweep lowers the error by less than this fraction of it.
    ridge : float
        Relative Tikhonov shift of the normal equations.
    gram_dtype : torch.dtype
        The dtype the normal equations are formed in (see :func:`als_update`).
    deadline : float
        A ``time.perf_counter()`` value after which no new sweep starts.

    """
    modes = range(len(cores)) if modes is None else modes
    unfoldings = {k: unfold(target, k) for k in modes}
    mask_unfoldings = {k: None if mask is None else unfold(mask, k) for k in modes}
    previous = math.inf
    error = math.inf
    for _ in range(n_sweeps):
        for k in modes:
            cores[k], offset = als_update(unfoldings[k], cores, k, ridge, mask_unfoldings[k], gram_dtype)
        error = math.sqrt(max(sq_norm + offset, 0.0) / sq_norm) if sq_norm > 0 else 0.0
        if previous - error <= stop_rtol * error or time.perf_counter() > deadline:
            break
        previous = error
    return error


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


@dataclass(frozen=True)
class Entries:
    """The entries of a tensor that a fit uses: the target, 0 where not used, the 0/1 mask, and their squared norm."""

    target: torch.Tensor
    mask: torch.Tensor | None
    sq_norm: float

    def error(self, cores: Sequence[torch.Tensor]) -> float:
        """The network's relative error on these entries."""
        approx = TensorNetwork(tuple(cores)).to_tensor()
        residual = approx - self.target if self.mask is None else (approx - self.target) * self.mask
        return math.sqrt(float(torch.sum(residual.double() ** 2)) / self.sq_norm) if self.sq_norm > 0 else 0.0

    def to(self, dtype: torch.dtype) -> Entries:
        """The same entries in ``dtype``."""
        return Entries(self.target.to(dtype), None if self.mask is None else self.mask.to(dtype), self.sq_norm)


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
    n_sweeps: int = 10,
    candidate_sweeps: int = 2,
    final_sweeps: int = 50,
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

    The network has one core per mode: internal cores (a Tucker core, or a
    core split into two) are not implemented, so a Tucker tensor is found as
    a star or denser network with more parameters than its Tucker form.

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
        ALS sweeps after each accepted step, for scoring each candidate, and
        at the end.
    seed : int or None
        Seed of the random slices that new bonds start from and of the holdout draw.

    Returns
    -------
    TensorNetwork
        The network, with the search in ``log`` (structure, parameters, error
        on the fitted entries, error on the held-out ones and elapsed time
        after every step; the last entry is after the polish, of the network
        returned, which with a held-out part may be an earlier step's).

    Examples
    --------
    >>> import torch, lowrank
    >>> _ = torch.manual_seed(0)
    >>> a, b = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    >>> x = torch.einsum("ir,rjk->ijk", a, b)      # mode 0 joined to the rest by a rank-3 bond
    >>> net = lowrank.decompose.tn(x, tol=1e-6)
    >>> net.relative_error(x) < 1e-6, net.edges, net.ranks[0][1]
    (True, ((0, 1), (1, 2)), 3)

    """
    start = time.perf_counter()
    observed = checked_mask(mask, x)
    if observed is not None:
        x = torch.as_tensor(x).masked_fill(~observed.to(torch.as_tensor(x).device), 0.0)
    x, work, sq_norm, scale = checked_input(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 modes for a tensor network, got shape {tuple(x.shape)}")
    tol = check_tol(tol)
    max_steps = check_positive_int(max_steps, "max_steps", minimum=0)
    n_sweeps = check_positive_int(n_sweeps, "n_sweeps")
    candidate_sweeps = check_positive_int(candidate_sweeps, "candidate_sweeps")
    final_sweeps = check_positive_int(final_sweeps, "final_sweeps", minimum=0)
    max_params = _checked_budget(max_params, x.shape)
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not 0 <= growth < math.inf:
        raise ValueError(f"growth must be a finite number >= 0, got {growth!r}")
    generator = make_generator(seed, x.device)
    deadline = math.inf if time_limit is None else start + time_limit
    observed_entries = _entries(work, None if observed is None else observed.to(work))
    fitted, held_out = observed_entries, None
    if observed is not None and holdout > 0:
        fitted, held_out = _split(work, observed_entries.mask, holdout, generator)
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
    cores[-1] = cores[-1] * scale
    return TensorNetwork(tuple(c.to(x.dtype) for c in cores), tuple(log))


def checked_mask(mask: Any, x: Any) -> torch.Tensor | None:
    """``mask`` as a boolean tensor, checked to match ``x``'s shape and to observe something."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    shape = tuple(torch.as_tensor(x).shape)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have x's shape {shape}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not bool(torch.all((mask == 0) | (mask == 1))):
            raise ValueError("mask must be boolean or hold only 0 and 1")
        mask = mask != 0
    if not bool(mask.any()):
        raise ValueError(f"mask observes no entry of the tensor of shape {shape}")
    return mask


def _entries(target: torch.Tensor, mask: torch.Tensor | None) -> Entries:
    """The entries of ``target`` where ``mask`` is 1 (all when None)."""
    if mask is not None:
        target = target * mask
    return Entries(target, mask, float(torch.sum(target.double() ** 2)))


def _split(target: torch.Tensor, mask: torch.Tensor, holdout: float,
           generator: torch.Generator) -> tuple[Entries, Entries | None]:
    """The observed entries split at random into fitted ones and a held-out ``holdout`` fraction of them."""
    draw = torch.rand(mask.shape, generator=generator, device=mask.device, dtype=torch.float64) < holdout
    held = mask * draw.to(mask)
    if not bool(held.any()) or bool(torch.equal(held, mask)):
        return _entries(target, mask), None
    return _entries(target, mask - held), _entries(target, held)


def _checked_budget(max_params: int | None, shape: Sequence[int]) -> int | None:
    """``max_params``, checked to hold at least the rank-one network."""
    if max_params is None:
        return None
    max_params = check_positive_int(max_params, "max_params")
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
    cores: list[torch.Tensor], entries: Entries, error: float, n_sweeps: int, stop_rtol: float, deadline: float
) -> tuple[list[torch.Tensor], float]:
    """All cores refitted by ALS from a network of relative ``error``, in the precision that error calls for.

    A fit in float32 that ends below ``SINGLE_PRECISION_ERROR`` goes on in the
    entries' own precision. Returns the cores in that precision and their
    error, computed in it.
    """
    fit_entries, options = _precision(entries, error)
    cores = [c.to(fit_entries.target.dtype) for c in cores]
    als(fit_entries.target, cores, fit_entries.sq_norm, n_sweeps, mask=fit_entries.mask, stop_rtol=stop_rtol,
        deadline=deadline, **options)
    cores = [c.to(entries.target.dtype) for c in cores]
    error = entries.error(cores)
    if options and error <= SINGLE_PRECISION_ERROR and time.perf_counter() <= deadline:
        als(entries.target, cores, entries.sq_norm, n_sweeps, mask=entries.mask, stop_rtol=stop_rtol,
            deadline=deadline)
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
    params = sum(c.numel() for c in cores)
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
        per_rank = cores[i].numel() // cores[i].shape[j] + cores[j].numel() // cores[j].shape[i]
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
    return SearchStep(ranks, sum(c.numel() for c in cores), error, time.perf_counter() - start, holdout_error)


def _network_input(x: Any, network: TensorNetwork, mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` as a float tensor (0 where ``mask`` is false) and ``mask`` as 0/1, checked against ``network``."""
    if not isinstance(network, TensorNetwork):
        raise TypeError(f"network must be a TensorNetwork, got {type(network).__name__}")
    observed = checked_mask(mask, x)
    x = torch.as_tensor(x)
    if observed is not None:
        x = x.masked_fill(~observed.to(x.device), 0.0)
    x = checked_input(x).x
    if tuple(x.shape) != network.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but the network represents shape {network.shape}")
    return x, None if observed is None else observed.to(device=x.device)


def tn_als(
    x: Any,
    network: TensorNetwork,
    *,
    mask: Any = None,
    n_sweeps: int = 50,
    stop_rtol: float = 1e-6,
    ridge: float = 1e-10,
) -> TensorNetwork:
    """Fit the cores of a network of fixed structure to ``x`` by alternating least squares.

    Each core update is the exact least-squares solution given the other cores
    (normal equations in float64 with a relative ``ridge``); with ``mask``,
    over the observed entries only, so this is also TT-, TR- or any-network
    completion (build the start with :meth:`TensorNetwork.from_chain`).

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        The tensor, of the network's shape.
    network : TensorNetwork
        The start: its structure is kept and its cores refitted.
    mask : torch.Tensor or numpy.ndarray, optional
        True where an entry of ``x`` is observed; the others are ignored.
    n_sweeps : int
        Largest number of sweeps over the cores.
    stop_rtol : float
        Stop when a sweep lowers the error by less than this fraction of it.
    ridge : float
        Relative Tikhonov shift of the normal equations.

    Returns
    -------
    TensorNetwork
        The fitted network, in ``x``'s dtype.

    """
    x, observed = _network_input(x, network, mask)
    n_sweeps = check_positive_int(n_sweeps, "n_sweeps")
    work = x.to(compute_dtype(x.dtype))
    entries = _entries(work, None if observed is None else observed.to(work))
    cores = [c.to(device=work.device, dtype=work.dtype) for c in network.cores]
    if entries.sq_norm > 0:
        als(entries.target, cores, entries.sq_norm, n_sweeps, mask=entries.mask, stop_rtol=stop_rtol, ridge=ridge)
    return TensorNetwork(tuple(c.to(x.dtype) for c in cores))


def tn_adam(
    x: Any,
    network: TensorNetwork,
    *,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    mask: Any = None,
    steps: int = 500,
    lr: float = 1e-2,
) -> TensorNetwork:
    """Fit the cores of a network of fixed structure by gradient descent (Adam) on any differentiable loss.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        The tensor, of the network's shape.
    network : TensorNetwork
        The start: its structure is kept and its cores trained.
    loss : callable, optional
        ``loss(approx, x) -> scalar tensor`` on the dense reconstruction and
        the target (with ``mask``, both restricted to the observed entries,
        as 1-D tensors). The default is the squared relative error
        ``||approx - x||² / ||x||²``.
    mask : torch.Tensor or numpy.ndarray, optional
        True where an entry of ``x`` is observed; the others are ignored.
    steps : int
        Adam steps.
    lr : float
        Adam's learning rate.

    Returns
    -------
    TensorNetwork
        The trained network, in ``x``'s dtype.

    """
    x, observed = _network_input(x, network, mask)
    steps = check_positive_int(steps, "steps", minimum=0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    target = x if observed is None else x[observed]
    sq_norm = float(torch.sum(target.double() ** 2)) or 1.0
    cores = [c.detach().to(device=x.device, dtype=x.dtype).clone().requires_grad_(True) for c in network.cores]
    optimizer = torch.optim.Adam(cores, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        approx = TensorNetwork(tuple(cores)).to_tensor()
        if observed is not None:
            approx = approx[observed]
        value = torch.sum((approx - target) ** 2) / sq_norm if loss is None else loss(approx, target)
        value.backward()
        optimizer.step()
    return TensorNetwork(tuple(c.detach() for c in cores))
