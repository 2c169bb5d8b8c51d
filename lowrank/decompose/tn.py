"""Tensor networks of learned structure: ALS fitting and greedy edge growth.

After Hashemizadeh, Liu, Miller and Rabusseau, "Adaptive Learning of Tensor
Network Structures": start from the network with every rank one, try raising
each edge's rank by one, keep the edge that lowers the error most per
parameter added, refit, and repeat until a target error, a parameter budget,
a step limit or a time limit is reached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from lowrank.decompose._checks import check_positive_int, check_tol, checked_input, make_generator
from lowrank.decompose._linalg import leading_left_subspace, unfold
from lowrank.decompose.factorizations import SearchStep, TensorNetwork, network_expression, network_subscripts


def environment(cores: Sequence[torch.Tensor], k: int, partner: int | None = None,
                rest: torch.Tensor | None = None) -> torch.Tensor:
    """Contract every core but ``k`` into a matrix ``(bonds of core k, physical modes of the others)``.

    Rows run over core ``k``'s bonds in the order of its dimensions, columns
    over the other modes in increasing order, as in the mode-``k`` unfolding.
    With ``rest`` (:func:`rest_of_pair` of ``k`` and ``partner``), only the
    partner's core is contracted with it.
    """
    ndim = len(cores)
    inputs, output = network_subscripts(ndim)
    others = [i for i in range(ndim) if i != k]
    result = "".join(inputs[k][j] for j in others) + "".join(output[j] for j in others)
    if rest is None:
        operands = [cores[i] for i in others]
        subscripts = [inputs[i] for i in others]
    else:
        operands = [rest, cores[partner]]
        subscripts = [_rest_subscripts(ndim, k, partner), inputs[partner]]
    equation = ",".join(subscripts) + "->" + result
    env = network_expression(equation, *(tuple(op.shape) for op in operands))(*operands, backend="torch")
    return env.reshape(math.prod(cores[k].shape[j] for j in others), -1)


def _rest_subscripts(ndim: int, i: int, j: int) -> str:
    """Indices of :func:`rest_of_pair`: the bonds of ``i``, then of ``j``, to the others, then their modes."""
    inputs, output = network_subscripts(ndim)
    others = [m for m in range(ndim) if m not in (i, j)]
    first, second = min(i, j), max(i, j)
    return (
        "".join(inputs[first][m] for m in others)
        + "".join(inputs[second][m] for m in others)
        + "".join(output[m] for m in others)
    )


def rest_of_pair(cores: Sequence[torch.Tensor], i: int, j: int) -> torch.Tensor:
    """Contract every core but ``i`` and ``j``: what both their environments share.

    A structure search scores a bond by refitting the two cores it joins; the
    other cores do not change meanwhile, so this contraction is done once.
    """
    ndim = len(cores)
    inputs, _ = network_subscripts(ndim)
    others = [m for m in range(ndim) if m not in (i, j)]
    equation = ",".join(inputs[m] for m in others) + "->" + _rest_subscripts(ndim, i, j)
    operands = [cores[m] for m in others]
    return network_expression(equation, *(tuple(op.shape) for op in operands))(*operands, backend="torch")


def als_update(
    target_unfolding: torch.Tensor,
    cores: list[torch.Tensor],
    k: int,
    ridge: float,
    partner: int | None = None,
    rest: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The least-squares core ``k`` given all others, and the squared error it leaves.

    Solves ``min ||X_(k) - G M||² + ridge * trace(M Mᵀ) / R * ||G||²`` through
    the normal equations in float64, where ``X_(k)`` is the mode-``k`` unfolding
    of the target and ``M`` the :func:`environment` of core ``k`` (from
    ``rest``, the contraction of all cores but ``k`` and ``partner``, if given).

    Returns
    -------
    core : torch.Tensor
        The new core ``k``, in the cores' dtype.
    sq_error : float
        ``||X_(k) - G M||²`` minus ``||X||²`` (add the target's squared norm to get the error).

    """
    env = environment(cores, k, partner, rest).double()
    gram = env @ env.T
    rhs = target_unfolding.double() @ env.T
    shift = ridge * float(torch.trace(gram)) / gram.shape[0] + 1e-300
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + shift * eye, rhs.T).T
    sq_error_offset = float(torch.sum((solution @ gram) * solution) - 2 * torch.sum(solution * rhs))
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
    stop_rtol: float = 1e-5,
    ridge: float = 1e-10,
) -> float:
    """Alternating least squares over the cores (in place); returns the final relative error.

    Parameters
    ----------
    target : torch.Tensor
        The tensor to fit.
    cores : list of torch.Tensor
        The network's cores, updated in place.
    sq_norm : float
        ``||target||²``.
    n_sweeps : int
        Largest number of sweeps over ``modes``.
    modes : sequence of int, optional
        The cores to update (all by default). Two modes are fitted from the
        contraction of the other cores, done once.
    stop_rtol : float
        Stop when a sweep lowers the error by less than this fraction of it.
    ridge : float
        Relative Tikhonov shift of the normal equations.

    """
    modes = range(len(cores)) if modes is None else modes
    unfoldings = {k: unfold(target, k) for k in modes}
    pair = len(modes) == 2 and len(cores) > 2
    rest = rest_of_pair(cores, *modes) if pair else None
    previous = math.inf
    error = math.inf
    for _ in range(n_sweeps):
        for k in modes:
            partner = (modes[1] if k == modes[0] else modes[0]) if pair else None
            cores[k], offset = als_update(unfoldings[k], cores, k, ridge, partner, rest)
        error = math.sqrt(max(sq_norm + offset, 0.0) / sq_norm) if sq_norm > 0 else 0.0
        if previous - error <= stop_rtol * error:
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


def grow(cores: Sequence[torch.Tensor], i: int, j: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The cores with bond ``(i, j)`` one larger: a zero slice in core ``i``, a small random one in core ``j``.

    The network is unchanged until ALS fits the new slices.
    """
    grown = list(cores)
    zeros_shape = list(cores[i].shape)
    zeros_shape[j] = 1
    grown[i] = torch.cat([cores[i], cores[i].new_zeros(zeros_shape)], dim=j)
    slice_shape = list(cores[j].shape)
    slice_shape[i] = 1
    scale = float(cores[j].abs().mean()) or 1.0
    noise = torch.randn(slice_shape, generator=generator, device=cores[j].device, dtype=cores[j].dtype)
    grown[j] = torch.cat([cores[j], scale * noise], dim=i)
    return grown


def tn(
    x: Any,
    *,
    tol: float | None = None,
    max_params: int | None = None,
    max_steps: int = 50,
    time_limit: float | None = None,
    n_sweeps: int = 10,
    candidate_sweeps: int = 2,
    seed: int | None = 0,
) -> TensorNetwork:
    """Learn a tensor network's structure and cores by greedy edge growth.

    Starts from the network with every rank one (fitted by ALS). Each step
    tries raising every bond's rank by one, fits only the two cores the bond
    joins (``candidate_sweeps`` ALS sweeps), keeps the bond that lowers the
    error most per parameter added, and refits every core (``n_sweeps``
    sweeps). The search stops when the error is at most ``tol``, no bond fits
    in ``max_params``, no bond lowers the error, or after ``max_steps`` steps
    or ``time_limit`` seconds.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        A tensor with at least two modes.
    tol : float, optional
        Target relative error in (0, 1).
    max_params : int, optional
        Parameter budget; at least the rank-one network's ``sum(x.shape)``.
    max_steps : int
        Largest number of accepted bond increments.
    time_limit : float, optional
        Seconds after which the search stops; a step under way when it
        expires is dropped, so the search overruns by at most one candidate fit.
    n_sweeps, candidate_sweeps : int
        ALS sweeps after each accepted step and for scoring each candidate.
    seed : int or None
        Seed of the random slices that new bonds start from.

    Returns
    -------
    TensorNetwork
        The network, with the search in ``log`` (structure, parameters, error
        and elapsed time after every step).

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
    x, work, sq_norm, scale = checked_input(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 modes for a tensor network, got shape {tuple(x.shape)}")
    tol = check_tol(tol)
    max_steps = check_positive_int(max_steps, "max_steps", minimum=0)
    n_sweeps = check_positive_int(n_sweeps, "n_sweeps")
    candidate_sweeps = check_positive_int(candidate_sweeps, "candidate_sweeps")
    rank_one_params = sum(x.shape)
    if max_params is not None:
        max_params = check_positive_int(max_params, "max_params")
        if max_params < rank_one_params:
            raise ValueError(
                f"max_params={max_params} is below the {rank_one_params} parameters of the rank-one network "
                f"of shape {tuple(x.shape)} (the sum of its dimensions)"
            )
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    generator = make_generator(seed, x.device)
    cores = rank_one_cores(work)
    error = als(work, cores, sq_norm, n_sweeps) if sq_norm > 0 else 0.0
    log = [_step(cores, error, start)]
    pairs = [(i, j) for i in range(x.ndim) for j in range(i + 1, x.ndim)]
    deadline = math.inf if time_limit is None else start + time_limit
    for _ in range(max_steps):
        if (tol is not None and error <= tol) or time.perf_counter() > deadline:
            break
        params = sum(c.numel() for c in cores)
        best, best_gain = None, 0.0
        for i, j in pairs:
            if time.perf_counter() > deadline:
                best = None  # a step cut short compares too few bonds to be trusted
                break
            if cores[i].shape[j] >= bond_bound(cores, i, j):
                continue
            added = cores[i].numel() // cores[i].shape[j] + cores[j].numel() // cores[j].shape[i]
            if max_params is not None and params + added > max_params:
                continue
            candidate = grow(cores, i, j, generator)
            candidate_error = als(work, candidate, sq_norm, candidate_sweeps, modes=(i, j), stop_rtol=0.0)
            gain = (error - candidate_error) / added
            if gain > best_gain:
                best, best_gain = candidate, gain
        if best is None:
            break
        cores = best
        error = als(work, cores, sq_norm, n_sweeps)
        log.append(_step(cores, error, start))
    cores[-1] = cores[-1] * scale
    return TensorNetwork(tuple(c.to(x.dtype) for c in cores), tuple(log))


def _step(cores: Sequence[torch.Tensor], error: float, start: float) -> SearchStep:
    ranks = tuple(tuple(c.shape) for c in cores)
    return SearchStep(ranks, sum(c.numel() for c in cores), error, time.perf_counter() - start)
