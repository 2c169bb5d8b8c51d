"""Fitting a tensor network of fixed structure: contraction environments, ALS and Adam.

The structure search that grows a network is in :mod:`lowrank.decompose.tn_search`;
the edits it makes to a network's structure in :mod:`lowrank.decompose.tn_edits`.
Internally a network with internal cores is fitted to the target with one
trailing dimension of size one per internal core (an internal core's own
dimension), so that every core, internal or not, is updated the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowrank.checks import check_int, check_positive
from lowrank.decompose._inputs import checked_input, compute_dtype
from lowrank.decompose._linalg import unfold
from lowrank.decompose.factorizations import TensorNetwork, network_expression, network_subscripts

# The relative Tikhonov shift of ALS's float64 normal equations: a multiple of the Gram matrix's mean
# eigenvalue, enough to keep a bond grown beyond the data's rank solvable. An internal core's Gram matrix
# is the Kronecker product of its neighbours' and can have a condition number of 1e10 and more; a shift
# of 1e-10 there raised a planted Tucker network's error from 2e-5 to 1e-3 in one update.
RIDGE = 1e-13
# Sweeps over which :func:`als` measures its rate of decrease to judge whether it can reach ``stop_error``.
RATE_WINDOW = 10

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
    ridge: float = RIDGE,
    gram_dtype: torch.dtype = torch.float64,
    deadline: float = math.inf,
    stop_error: float = 0.0,
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
    stop_error : float
        Stop once the error is at most ``stop_error``, or once the rate of
        decrease of the last ``RATE_WINDOW`` sweeps, kept up, would not reach
        it within ``n_sweeps``.

    """
    modes = range(len(cores)) if modes is None else modes
    unfoldings = {k: unfold(target, k) for k in modes}
    mask_unfoldings = {k: None if mask is None else unfold(mask, k) for k in modes}
    errors, error = [math.inf], math.inf
    for sweep in range(n_sweeps):
        for k in modes:
            cores[k], offset = als_update(unfoldings[k], cores, k, ridge, mask_unfoldings[k], gram_dtype)
        error = math.sqrt(max(sq_norm + offset, 0.0) / sq_norm) if sq_norm > 0 else 0.0
        if errors[-1] - error <= stop_rtol * error or time.perf_counter() > deadline or error <= stop_error:
            break
        errors.append(error)
        window = min(RATE_WINDOW, len(errors) - 2)
        if stop_error > 0 and window > 0:
            rate = math.log(errors[-1 - window] / error) / window  # log of the decrease per sweep
            if (n_sweeps - sweep - 1) * rate < math.log(error / stop_error):
                break
    return error


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

    def padded(self, ndim: int) -> Entries:
        """The same entries with trailing dimensions of size one up to ``ndim``: a target for ``ndim`` cores.

        An internal core's own dimension has size one, so a network of ``N``
        modes and ``I`` internal cores is fitted to the target with ``I``
        trailing dimensions of size one.
        """
        def pad(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(*t.shape, *([1] * (ndim - t.ndim)))

        return Entries(pad(self.target), None if self.mask is None else pad(self.mask), self.sq_norm)


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


def entries_of(target: torch.Tensor, mask: torch.Tensor | None) -> Entries:
    """The entries of ``target`` where ``mask`` is 1 (all when None)."""
    if mask is not None:
        target = target * mask
    return Entries(target, mask, float(torch.sum(target.double() ** 2)))


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
    ridge: float = RIDGE,
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
    n_sweeps = check_int(n_sweeps, "n_sweeps")
    work = x.to(compute_dtype(x.dtype))
    cores = [c.to(device=work.device, dtype=work.dtype) for c in network.cores]
    entries = entries_of(work, None if observed is None else observed.to(work)).padded(len(cores))
    if entries.sq_norm > 0:
        als(entries.target, cores, entries.sq_norm, n_sweeps, mask=entries.mask, stop_rtol=stop_rtol, ridge=ridge)
    return TensorNetwork(tuple(c.to(x.dtype) for c in cores), n_internal=network.n_internal)


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
    steps = check_int(steps, "steps", minimum=0)
    lr = check_positive(lr, "lr")
    target = x if observed is None else x[observed]
    sq_norm = float(torch.sum(target.double() ** 2)) or 1.0
    cores = [c.detach().to(device=x.device, dtype=x.dtype).clone().requires_grad_(True) for c in network.cores]
    optimizer = torch.optim.Adam(cores, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        approx = TensorNetwork(tuple(cores), n_internal=network.n_internal).to_tensor()
        if observed is not None:
            approx = approx[observed]
        value = torch.sum((approx - target) ** 2) / sq_norm if loss is None else loss(approx, target)
        value.backward()
        optimizer.step()
    return TensorNetwork(tuple(c.detach() for c in cores), n_internal=network.n_internal)
