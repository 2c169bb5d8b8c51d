"""Result containers of the decompositions.

Each container holds the factors and nothing else, and can rebuild the dense
tensor (``to_tensor()``), count its parameters (``num_params``) and report its
ranks (``ranks``), in the spirit of tensorly's ``CPTensor`` / ``TuckerTensor``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import opt_einsum
import torch

from lowrank.decompose._linalg import mode_product


class Factorization:
    """Common interface of all result containers."""

    def to_tensor(self) -> torch.Tensor:
        """Rebuild the dense tensor the factors represent."""
        raise NotImplementedError

    @property
    def factor_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the factorization stores."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the represented dense tensor."""
        raise NotImplementedError

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks of the factorization."""
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        """Number of stored parameters."""
        return sum(t.numel() for t in self.factor_tensors)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the factors."""
        return self.factor_tensors[0].dtype

    @property
    def device(self) -> torch.device:
        """The device of the factors."""
        return self.factor_tensors[0].device

    def relative_error(self, x: torch.Tensor) -> float:
        """Return ``||x - self.to_tensor()||_F / ||x||_F``, computed in float64."""
        x64 = torch.as_tensor(x).to(device=self.device, dtype=torch.float64)
        diff = torch.linalg.vector_norm(x64 - self.to_tensor().to(torch.float64))
        return float(diff / torch.linalg.vector_norm(x64))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, ranks={self.ranks}, "
            f"num_params={self.num_params}, dtype={self.dtype})"
        )


@dataclass(frozen=True, repr=False)
class SVD(Factorization):
    """Truncated SVD ``u @ diag(s) @ vh`` of a matrix.

    Attributes
    ----------
    u : torch.Tensor
        Left singular vectors, shape ``(m, r)``, orthonormal columns.
    s : torch.Tensor
        Singular values in decreasing order, shape ``(r,)``.
    vh : torch.Tensor
        Right singular vectors, shape ``(r, n)``, orthonormal rows.

    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def __post_init__(self) -> None:
        r = self.s.shape[0]
        if self.u.ndim != 2 or self.vh.ndim != 2 or self.u.shape[1] != r or self.vh.shape[0] != r:
            raise ValueError(
                f"SVD factors do not fit: u {tuple(self.u.shape)}, s {tuple(self.s.shape)}, vh {tuple(self.vh.shape)}"
            )

    def to_tensor(self) -> torch.Tensor:
        """Return ``u @ diag(s) @ vh``."""
        return (self.u * self.s) @ self.vh

    @property
    def factor_tensors(self) -> tuple[torch.Tensor, ...]:
        """``(u, s, vh)``."""
        return (self.u, self.s, self.vh)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(m, n)``."""
        return (self.u.shape[0], self.vh.shape[1])

    @property
    def ranks(self) -> tuple[int, ...]:
        """``(r,)``."""
        return (self.s.shape[0],)

    @property
    def rank(self) -> int:
        """The number of kept singular triplets."""
        return self.s.shape[0]


@dataclass(frozen=True, repr=False)
class Tucker(Factorization):
    """Tucker decomposition: a core multiplied along some modes by factor matrices.

    Attributes
    ----------
    core : torch.Tensor
        The core tensor. Along a decomposed mode its size is that mode's rank;
        along any other mode it has the size of the original tensor.
    factors : tuple of torch.Tensor
        One factor of shape ``(dim, rank)`` per decomposed mode, orthonormal columns.
    modes : tuple of int
        The decomposed modes, in the order of ``factors``. All modes for a full
        Tucker decomposition; a subset for a partial one (Tucker-2 of a conv kernel
        uses ``modes=(0, 1)``).

    """

    core: torch.Tensor
    factors: tuple[torch.Tensor, ...]
    modes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.factors) != len(self.modes):
            raise ValueError(f"Tucker has {len(self.factors)} factors for {len(self.modes)} modes {self.modes}")
        for mode, factor in zip(self.modes, self.factors):
            if factor.ndim != 2 or factor.shape[1] != self.core.shape[mode]:
                raise ValueError(
                    f"Tucker factor of mode {mode} has shape {tuple(factor.shape)}, "
                    f"expected (dim, {self.core.shape[mode]})"
                )

    def to_tensor(self) -> torch.Tensor:
        """Multiply the core by every factor along its mode."""
        out = self.core
        for mode, factor in zip(self.modes, self.factors):
            out = mode_product(out, factor, mode)
        return out

    @property
    def factor_tensors(self) -> tuple[torch.Tensor, ...]:
        """``(core, *factors)``."""
        return (self.core, *self.factors)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the represented tensor."""
        shape = list(self.core.shape)
        for mode, factor in zip(self.modes, self.factors):
            shape[mode] = factor.shape[0]
        return tuple(shape)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The rank of each decomposed mode, in the order of ``modes``."""
        return tuple(self.core.shape[m] for m in self.modes)


@dataclass(frozen=True, repr=False)
class CP(Factorization):
    """CP (CANDECOMP/PARAFAC) decomposition ``sum_r weights[r] * a_r ⊗ b_r ⊗ ...``.

    Attributes
    ----------
    weights : torch.Tensor
        Weight of each rank-one component, shape ``(rank,)``.
    factors : tuple of torch.Tensor
        One factor of shape ``(dim, rank)`` per mode.

    """

    weights: torch.Tensor
    factors: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        rank = self.weights.shape[0]
        if any(f.ndim != 2 or f.shape[1] != rank for f in self.factors):
            shapes = [tuple(f.shape) for f in self.factors]
            raise ValueError(f"CP factors {shapes} do not all have {rank} columns")

    def to_tensor(self) -> torch.Tensor:
        """Sum the rank-one components."""
        out = self.factors[0] * self.weights
        for factor in self.factors[1:]:
            # (prod of previous dims, rank) x (dim, rank) -> (prod * dim, rank)
            out = (out[:, None, :] * factor[None, :, :]).reshape(-1, self.rank)
        return out.sum(dim=1).reshape(self.shape)

    @property
    def factor_tensors(self) -> tuple[torch.Tensor, ...]:
        """``(weights, *factors)``."""
        return (self.weights, *self.factors)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the represented tensor."""
        return tuple(f.shape[0] for f in self.factors)

    @property
    def rank(self) -> int:
        """The number of rank-one components."""
        return self.weights.shape[0]

    @property
    def ranks(self) -> tuple[int, ...]:
        """``(rank,)``."""
        return (self.rank,)


def contract_chain(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract cores ``(r_k, *dims_k, r_{k+1})`` left to right into ``(r_0, prod dims, r_N)``."""
    out = cores[0].reshape(cores[0].shape[0], -1, cores[0].shape[-1])
    for core in cores[1:]:
        r_left, r_right = core.shape[0], core.shape[-1]
        out = (out.reshape(-1, r_left) @ core.reshape(r_left, -1)).reshape(out.shape[0], -1, r_right)
    return out


@dataclass(frozen=True, repr=False)
class _Chain(Factorization):
    """Cores joined in a line or a ring, each by its last bond to the next one's first."""

    cores: tuple[torch.Tensor, ...]

    @property
    def factor_tensors(self) -> tuple[torch.Tensor, ...]:
        """The cores."""
        return self.cores

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the represented tensor."""
        return tuple(c.shape[1] for c in self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The bond sizes ``(r_0, r_1, ..., r_N)``, boundary bonds included."""
        return tuple(c.shape[0] for c in self.cores) + (self.cores[-1].shape[-1],)


@dataclass(frozen=True, repr=False)
class TT(_Chain):
    """Tensor-train (matrix product state) decomposition.

    Attributes
    ----------
    cores : tuple of torch.Tensor
        Core ``k`` has shape ``(r_k, n_k, r_{k+1})`` with ``r_0 = r_N = 1``.
    """

    def __post_init__(self) -> None:
        _check_chain(self.cores, closed=False, core_ndim=3)

    def to_tensor(self) -> torch.Tensor:
        """Contract the train."""
        return contract_chain(self.cores).reshape(self.shape)


@dataclass(frozen=True, repr=False)
class TTMatrix(_Chain):
    """Tensor-train matrix: a matrix of shape ``(prod m_k, prod n_k)`` stored as a train.

    Attributes
    ----------
    cores : tuple of torch.Tensor
        Core ``k`` has shape ``(r_k, m_k, n_k, r_{k+1})`` with ``r_0 = r_N = 1``.
    """

    def __post_init__(self) -> None:
        _check_chain(self.cores, closed=False, core_ndim=4)

    def to_tensor(self) -> torch.Tensor:
        """Return the dense tensor of shape ``(m_1, ..., m_d, n_1, ..., n_d)``."""
        d = len(self.cores)
        interleaved = contract_chain(self.cores).reshape(
            [size for c in self.cores for size in (c.shape[1], c.shape[2])]
        )
        return interleaved.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2))

    def to_matrix(self) -> torch.Tensor:
        """Return the dense matrix of shape ``(prod m_k, prod n_k)``."""
        return self.to_tensor().reshape(math.prod(self.row_shape), math.prod(self.col_shape))

    @property
    def row_shape(self) -> tuple[int, ...]:
        """``(m_1, ..., m_d)``."""
        return tuple(c.shape[1] for c in self.cores)

    @property
    def col_shape(self) -> tuple[int, ...]:
        """``(n_1, ..., n_d)``."""
        return tuple(c.shape[2] for c in self.cores)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(m_1, ..., m_d, n_1, ..., n_d)``."""
        return self.row_shape + self.col_shape


@dataclass(frozen=True, repr=False)
class TR(_Chain):
    """Tensor-ring decomposition: a closed train whose end ranks are equal.

    Attributes
    ----------
    cores : tuple of torch.Tensor
        Core ``k`` has shape ``(r_k, n_k, r_{k+1})`` with ``r_N = r_0``; ``ranks``
        lists ``(r_0, ..., r_{N-1}, r_0)``.
    """

    def __post_init__(self) -> None:
        _check_chain(self.cores, closed=True, core_ndim=3)

    def to_tensor(self) -> torch.Tensor:
        """Contract the ring (the trace over the closing bond)."""
        chain = contract_chain(self.cores)
        return torch.diagonal(chain, dim1=0, dim2=2).sum(-1).reshape(self.shape)


def _check_chain(cores: Sequence[torch.Tensor], *, closed: bool, core_ndim: int) -> None:
    """Check that neighbouring cores share their bond sizes."""
    if len(cores) == 0:
        raise ValueError("a train needs at least one core")
    for k, core in enumerate(cores):
        if core.ndim != core_ndim:
            raise ValueError(f"core {k} must have {core_ndim} dimensions, got shape {tuple(core.shape)}")
    for k in range(len(cores) - 1):
        if cores[k].shape[-1] != cores[k + 1].shape[0]:
            raise ValueError(
                f"core {k} (shape {tuple(cores[k].shape)}) does not connect to core {k + 1} "
                f"(shape {tuple(cores[k + 1].shape)})"
            )
    if closed and cores[-1].shape[-1] != cores[0].shape[0]:
        raise ValueError(
            f"ring does not close: last core ends in rank {cores[-1].shape[-1]}, first starts with {cores[0].shape[0]}"
        )
    if not closed and (cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1):
        raise ValueError(
            f"a train's boundary ranks must be 1, got {cores[0].shape[0]} and {cores[-1].shape[-1]}"
        )


def network_subscripts(ndim: int) -> tuple[list[str], str]:
    """Einsum subscripts of a fully connected network over ``ndim`` modes.

    Core ``k`` carries the physical index of mode ``k`` at position ``k`` and,
    at every position ``j != k``, the bond it shares with core ``j``. Returns
    the subscripts of the cores and of the dense output.
    """
    physical = [opt_einsum.get_symbol(k) for k in range(ndim)]
    bond = {}
    for i in range(ndim):
        for j in range(i + 1, ndim):
            bond[i, j] = bond[j, i] = opt_einsum.get_symbol(ndim + len(bond) // 2)
    cores = ["".join(physical[k] if j == k else bond[k, j] for j in range(ndim)) for k in range(ndim)]
    return cores, "".join(physical)


@functools.lru_cache(maxsize=256)
def network_expression(equation: str, *shapes: tuple[int, ...], optimize: str = "greedy") -> Any:
    """An ``opt_einsum`` contraction expression for ``equation`` on operands of ``shapes``, its path found once.

    The greedy path search takes microseconds where an optimal one takes tens of milliseconds for the eight
    or more operands of a network, and a structure search meets a new set of shapes at every candidate;
    a layer, which contracts the same shapes at every forward, can afford ``optimize="dp"``.
    """
    return opt_einsum.contract_expression(equation, *shapes, optimize=optimize)


@dataclass(frozen=True)
class SearchStep:
    """One accepted step of a structure search: the network's ranks, parameters and relative error after it.

    ``holdout_error`` is the relative error on the held-out entries of a
    completion search (None otherwise).
    """

    ranks: tuple[tuple[int, ...], ...]
    params: int
    error: float
    seconds: float
    holdout_error: float | None = None


@dataclass(frozen=True, repr=False)
class TensorNetwork(Factorization):
    """A tensor network: one core per mode, optional internal cores, any pair of cores joined by a bond.

    With ``N`` modes and ``I`` internal cores the network has ``M = N + I``
    cores of ``M`` dimensions each. Dimension ``k`` of core ``k`` is its own
    index: the physical mode ``n_k`` for ``k < N``, and a dimension of size
    one for an internal core (which carries no mode of the tensor).
    Dimension ``j != k`` is the bond to core ``j``, whose size is the rank of
    edge ``(k, j)``; rank 1 means no edge. A tensor train is the network
    whose only bonds join neighbours, a tensor ring adds the closing bond, a
    fully connected network (FCTN) has them all, and a Tucker network joins
    each mode's core to one internal core.

    Attributes
    ----------
    cores : tuple of torch.Tensor
        ``M`` cores of ``M`` dimensions each, the ``n_internal`` internal
        ones last.
    log : tuple of SearchStep
        The structure search that produced the network (empty if none did).
    n_internal : int
        How many of the cores are internal.
    """

    cores: tuple[torch.Tensor, ...]
    log: tuple[SearchStep, ...] = ()
    n_internal: int = 0

    def __post_init__(self) -> None:
        ndim = len(self.cores)
        if not 0 <= self.n_internal < ndim:
            raise ValueError(f"n_internal must be in [0, {ndim}) for {ndim} cores, got {self.n_internal}")
        for k, core in enumerate(self.cores):
            if core.ndim != ndim:
                raise ValueError(f"core {k} must have {ndim} dimensions (one per core), got shape {tuple(core.shape)}")
            if k >= ndim - self.n_internal and core.shape[k] != 1:
                raise ValueError(f"internal core {k} must have size 1 in its own dimension {k}, got shape "
                                 f"{tuple(core.shape)}")
        for i in range(ndim):
            for j in range(i + 1, ndim):
                if self.cores[i].shape[j] != self.cores[j].shape[i]:
                    raise ValueError(
                        f"the bond between cores {i} and {j} has size {self.cores[i].shape[j]} in core {i} "
                        f"but {self.cores[j].shape[i]} in core {j}"
                    )

    def to_tensor(self) -> torch.Tensor:
        """Contract the network (the path is found once per shape and cached)."""
        inputs, output = network_subscripts(len(self.cores))
        equation = ",".join(inputs) + "->" + output[: self.n_modes]
        return network_expression(equation, *(tuple(c.shape) for c in self.cores))(*self.cores, backend="torch")

    @property
    def factor_tensors(self) -> tuple[torch.Tensor, ...]:
        """The cores."""
        return self.cores

    @property
    def n_modes(self) -> int:
        """The number of modes of the represented tensor (of cores that are not internal)."""
        return len(self.cores) - self.n_internal

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the represented tensor."""
        return tuple(self.cores[k].shape[k] for k in range(self.n_modes))

    @property
    def ranks(self) -> tuple[tuple[int, ...], ...]:
        """The symmetric rank matrix: entry ``(i, j)`` is the bond size between cores ``i`` and ``j``.

        The diagonal holds the mode sizes (1 for an internal core).
        """
        return tuple(tuple(core.shape) for core in self.cores)

    @property
    def edges(self) -> tuple[tuple[int, int], ...]:
        """The pairs ``(i, j)``, ``i < j``, joined by a bond of rank above 1."""
        ndim = len(self.cores)
        return tuple((i, j) for i in range(ndim) for j in range(i + 1, ndim) if self.cores[i].shape[j] > 1)

    @classmethod
    def from_tucker(cls, tucker: Tucker) -> TensorNetwork:
        """The network of a Tucker decomposition of all modes: its core becomes one internal core.

        Core ``k`` is the factor of mode ``k``, ``(n_k, r_k)``, with its bond
        at position ``N`` (the internal core), whose bond to core ``k`` has
        size ``r_k``.
        """
        ndim = tucker.core.ndim
        if sorted(tucker.modes) != list(range(ndim)):
            raise ValueError(f"from_tucker needs a Tucker decomposition of every mode, got modes {tucker.modes}")
        factors = dict(zip(tucker.modes, tucker.factors))
        network_cores = []
        for k in range(ndim):
            shape = [1] * (ndim + 1)
            shape[k], shape[ndim] = factors[k].shape
            network_cores.append(factors[k].reshape(shape))
        network_cores.append(tucker.core.unsqueeze(-1))
        return cls(tuple(network_cores), n_internal=1)

    @classmethod
    def from_chain(cls, chain: TT | TR) -> TensorNetwork:
        """The network of a tensor train or a tensor ring (of at least three cores).

        Core ``k`` of the chain, ``(r_k, n_k, r_{k+1})``, becomes an ``N``-way
        core with its bonds at positions ``k - 1`` and ``k + 1`` (modulo ``N``
        for a ring) and size one everywhere else.
        """
        ndim = len(chain.cores)
        if isinstance(chain, TR) and ndim < 3:
            raise ValueError(f"a ring of {ndim} cores has two bonds between the same cores; need at least 3")
        network_cores = []
        for k, core in enumerate(chain.cores):
            # (network position, chain dimension) of the mode and of the bonds; bonds of size one
            # (an open train's ends) need no position
            placed = sorted([(k, 1)] + [
                (position, dim) for position, dim in (((k - 1) % ndim, 0), ((k + 1) % ndim, 2)) if core.shape[dim] > 1
            ])
            shape = [1] * ndim
            for position, dim in placed:
                shape[position] = core.shape[dim]
            order = [dim for _, dim in placed]
            network_cores.append(core.permute(order + [d for d in range(3) if d not in order]).reshape(shape))
        return cls(tuple(network_cores))
