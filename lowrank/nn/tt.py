"""Tensor-train (TT-matrix) linear layers: the weight stored as a train of small cores."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank.checks import check_choice, check_int, check_ranks
from lowrank.decompose import TTMatrix, tt_matrix
from lowrank.decompose.tt import tt_bounds
from lowrank.nn.base import FactorizedModule
from lowrank.nn.dense import LINEAR_TYPES, bias_size, dense_linear, linear_bias, linear_type, linear_weight
from lowrank.nn.tensorize import factor_shape, paired_sizes, tensorized_shapes
from lowrank.rank.budget import largest_fitting

# How many multiply-accumulates writing one element of an intermediate is worth when plans are compared:
# the sweep's GEMMs are thin and its intermediates large, so on CPU a plan's time follows its memory
# traffic as much as its arithmetic (64, opt_einsum's "combo" factor, fits this sweep's timings on CPU).
_WRITE_COST = 64


@dataclass(frozen=True)
class _Plan:
    """One contraction order: merge contiguous groups of cores, then sweep the input through the groups.

    Attributes
    ----------
    groups : tuple of tuple of int
        Contiguous groups of core indices, at least two (one group would be the dense weight).
    reverse : bool
        Sweep from the last group to the first.
    merge_macs, merge_writes : int
        Multiply-accumulates and elements written by merging the groups' cores, for any batch.
    sweep_macs, sweep_writes : int
        Multiply-accumulates and elements written by the sweep, per input row.

    """

    groups: tuple[tuple[int, ...], ...]
    reverse: bool
    merge_macs: int
    merge_writes: int
    sweep_macs: int
    sweep_writes: int

    def macs(self, batch: int) -> int:
        """Multiply-accumulates of a forward over ``batch`` rows."""
        return self.merge_macs + batch * self.sweep_macs

    def cost(self, batch: int) -> int:
        """Multiply-accumulates plus ``_WRITE_COST`` per element written, over ``batch`` rows."""
        return self.macs(batch) + _WRITE_COST * (self.merge_writes + batch * self.sweep_writes)


def _plans(ranks: Sequence[int], out_shape: Sequence[int], in_shape: Sequence[int]) -> list[_Plan]:
    """Every grouping of the cores into at least two contiguous groups, swept in either direction.

    A group ``a..b`` is merged left to right into a core ``(r_a, M, N, r_{b+1})`` with
    ``M = prod m_k`` and ``N = prod n_k`` over the group. Sweeping left to right,
    the state before group ``g`` holds, per row, the outputs of the groups done and
    the inputs of those to come: contracting it with group ``g`` costs
    ``prod(M_<g) * prod(N_>g) * R_g M_g N_g R_{g+1}`` and writes
    ``prod(M_<=g) * prod(N_>g) * R_{g+1}`` elements (the mirror image from the right).
    """
    d = len(in_shape)
    plans = []
    for cuts in itertools.product((False, True), repeat=d - 1):
        if not any(cuts):
            continue
        bounds = [0, *(k + 1 for k, cut in enumerate(cuts) if cut), d]
        spans = list(zip(bounds[:-1], bounds[1:]))
        merge_macs = merge_writes = 0
        for a, b in spans:
            for j in range(a + 1, b):
                done = ranks[a] * math.prod(out_shape[a:j]) * math.prod(in_shape[a:j])
                merge_macs += done * ranks[j] * out_shape[j] * in_shape[j] * ranks[j + 1]
                merge_writes += done * out_shape[j] * in_shape[j] * ranks[j + 1]
        outs = [math.prod(out_shape[a:b]) for a, b in spans]
        ins = [math.prod(in_shape[a:b]) for a, b in spans]
        step = [ranks[a] * m * n * ranks[b] for (a, b), m, n in zip(spans, outs, ins)]
        groups = tuple(tuple(range(a, b)) for a, b in spans)
        g_all = range(len(spans))
        # Right to left first: on ties its GEMMs measured faster (its plain GEMM meets the input).
        plans.append(
            _Plan(
                groups,
                True,
                merge_macs,
                merge_writes,
                sum(math.prod(ins[:g]) * math.prod(outs[g + 1 :]) * step[g] for g in g_all),
                sum(math.prod(ins[:g]) * math.prod(outs[g:]) * ranks[a] for g, (a, _) in zip(g_all, spans)),
            )
        )
        plans.append(
            _Plan(
                groups,
                False,
                merge_macs,
                merge_writes,
                sum(math.prod(outs[:g]) * math.prod(ins[g + 1 :]) * step[g] for g in g_all),
                sum(math.prod(outs[: g + 1]) * math.prod(ins[g + 1 :]) * ranks[b] for g, (_, b) in zip(g_all, spans)),
            )
        )
    return plans


def _merge(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract neighbouring cores ``(r, m, n, r')`` into one ``(r_first, prod m, prod n, r'_last)``."""
    out = cores[0]
    for core in cores[1:]:
        r, m, n, _ = out.shape
        _, m2, n2, r2 = core.shape
        out = torch.tensordot(out, core, dims=1).transpose(2, 3).reshape(r, m * m2, n * n2, r2)
    return out


# Below this many columns per matrix a batched GEMM runs slower (2-5x on CPU at 4 to 8 columns) than
# transposing the batch into one tall GEMM and back; from 16 columns on it runs 1.3-2x faster.
_BATCHED_MIN_COLUMNS = 16


def _multiply_each(matrix: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """``matrix @ state[p]`` for every ``p``: ``(M, K)`` and ``(P, K, C)`` give ``(P, M, C)``."""
    if state.shape[2] >= _BATCHED_MIN_COLUMNS:
        return torch.matmul(matrix, state)
    batch, inner, columns = state.shape
    tall = state.transpose(1, 2).reshape(batch * columns, inner) @ matrix.T
    return tall.reshape(batch, columns, matrix.shape[0]).transpose(1, 2)


def _sweep_left(x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x`` ``(B, N)`` through cores ``(R_g, M_g, N_g, R_{g+1})`` from the first: ``(B, M)``.

    Before core ``g`` the state is laid out ``(B, M_<g, R_g, N_g, N_>g)``: one
    matrix ``(R_g N_g, prod N_>g)`` per leading index, each multiplied by the
    core as a ``(M_g R_{g+1}, R_g N_g)`` matrix, which leaves the state laid out
    for core ``g + 1`` without a copy (unless the matrices are too narrow for a
    batched GEMM); the last core is one GEMM over all rows.
    """
    rows, state = x.shape[0], x
    ins = [core.shape[2] for core in cores]
    for g, core in enumerate(cores[:-1]):
        r, m, n, r2 = core.shape
        state = _multiply_each(
            core.permute(1, 3, 0, 2).reshape(m * r2, r * n), state.reshape(rows, r * n, math.prod(ins[g + 1 :]))
        )
        rows *= m
    r, m, n, _ = cores[-1].shape
    return state.reshape(rows, r * n) @ cores[-1].permute(0, 2, 1, 3).reshape(r * n, m)


def _sweep_right(x: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x`` ``(B, N)`` through the cores from the last: ``(B, M)``.

    The mirror image of :func:`_sweep_left`: before core ``g`` the state is laid
    out ``(B, N_<g, N_g, R_{g+1}, M_>g)``; the last core is one GEMM on the input.
    """
    ins, outs = [core.shape[2] for core in cores], [core.shape[1] for core in cores]
    r, m, n, _ = cores[-1].shape
    state = x.reshape(x.shape[0] * math.prod(ins[:-1]), n) @ cores[-1].permute(2, 3, 0, 1).reshape(n, r * m)
    for g in range(len(cores) - 2, -1, -1):
        r, m, n, r2 = cores[g].shape
        rows = x.shape[0] * math.prod(ins[:g])
        state = _multiply_each(cores[g].reshape(r * m, n * r2), state.reshape(rows, n * r2, math.prod(outs[g + 1 :])))
    return state.reshape(x.shape[0], math.prod(outs))


def _bucket(batch: int) -> int:
    """``batch`` rounded up to a power of two (at least 1): the batch size a plan is chosen for."""
    return 1 << (max(batch, 1) - 1).bit_length()


class TTLinear(FactorizedModule):
    """A linear layer ``y = x W^T + b`` whose weight is a tensor-train matrix.

    The ``(out_features, in_features)`` weight, viewed as a tensor
    ``(m_1, ..., m_d, n_1, ..., n_d)`` with ``out_features = prod m_k`` and
    ``in_features = prod n_k``, is the train of cores ``cores[k]`` of shape
    ``(r_k, m_k, n_k, r_{k+1})``, ``r_0 = r_d = 1`` (the layout of
    :func:`lowrank.decompose.tt_matrix`, Novikov et al. 2015).

    The forward never forms the dense weight: it merges contiguous groups of
    cores (at least two groups) and sweeps the input through the groups, one
    (batched) GEMM per group, with a layout that needs no copy of the
    intermediate state. The grouping and the direction are chosen, for the
    batch size rounded up to a power of two, to minimise multiply-accumulates
    plus memory traffic (the intermediates are larger than the input), and the
    choice is cached on the module.

    Parameters
    ----------
    in_shape, out_shape : sequence of int
        The factorisations ``(n_1, ..., n_d)`` of ``in_features`` and
        ``(m_1, ..., m_d)`` of ``out_features``, of equal length ``d >= 2``.
    rank : int or sequence of int
        The rank of every internal bond, or of each of the ``d - 1`` bonds.
    bias : bool
        Whether the layer has a bias.
    dense_type : {"Linear", "Conv1D"}
        The layer type :meth:`to_dense` rebuilds (``"Conv1D"`` is Hugging
        Face's transposed linear layer).
    device, dtype
        Where and in which dtype the (uninitialised) cores are created.

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn.tt import TTLinear
    >>> dense = torch.nn.Linear(64, 32)
    >>> layer = TTLinear.from_dense(dense, 4, out_shape=(4, 8), in_shape=(8, 8))
    >>> layer.ranks, layer.num_params
    ((1, 4, 1), 416)
    >>> layer(torch.randn(2, 5, 64)).shape
    torch.Size([2, 5, 32])

    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        rank: int | Sequence[int],
        bias: bool = True,
        dense_type: str = "Linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_shape, out_shape = factor_shape(in_shape, "in_shape"), factor_shape(out_shape, "out_shape")
        if len(in_shape) != len(out_shape):
            raise ValueError(f"in_shape {in_shape} and out_shape {out_shape} must have the same length")
        check_choice(dense_type, LINEAR_TYPES, "dense_type")
        self.in_shape, self.out_shape, self.dense_type = in_shape, out_shape, dense_type
        self.in_features, self.out_features = math.prod(in_shape), math.prod(out_shape)
        bonds = len(in_shape) - 1
        self.ranks = (1, *check_ranks(rank, [None] * bonds, what=[f"bond {k}" for k in range(1, bonds + 1)]), 1)
        kwargs = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], m, n, self.ranks[k + 1], **kwargs))
            for k, (m, n) in enumerate(zip(out_shape, in_shape))
        )
        self.bias = nn.Parameter(torch.empty(self.out_features, **kwargs)) if bias else None
        self._plans = _plans(self.ranks, out_shape, in_shape)
        self._chosen: dict[int, _Plan] = {}

    @classmethod
    def from_factorization(
        cls, factorization: TTMatrix, bias: torch.Tensor | None = None, dense_type: str = "Linear"
    ) -> TTLinear:
        """Build the layer from a TT-matrix of its ``(out_features, in_features)`` weight.

        Parameters
        ----------
        factorization : TTMatrix
            Cores ``(r_k, m_k, n_k, r_{k+1})``, rows ``m`` the output features
            (as :func:`lowrank.decompose.tt_matrix` returns for the weight).
        bias : torch.Tensor, optional
            The ``(out_features,)`` bias; None for a layer without one.
        dense_type : {"Linear", "Conv1D"}
            The layer type :meth:`to_dense` rebuilds.

        Returns
        -------
        TTLinear
            On the factorization's device, in its dtype.

        """
        if not isinstance(factorization, TTMatrix):
            raise TypeError(f"factorization must be a lowrank TTMatrix, got {type(factorization).__name__}")
        layer = cls(
            factorization.col_shape,
            factorization.row_shape,
            factorization.ranks[1:-1],
            bias is not None,
            dense_type,
            device=factorization.device,
            dtype=factorization.dtype,
        )
        with torch.no_grad():
            for core, value in zip(layer.cores, factorization.cores):
                core.copy_(value)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(
        cls,
        layer: nn.Module,
        rank: int | Sequence[int] | None = None,
        *,
        out_shape: Sequence[int] | None = None,
        in_shape: Sequence[int] | None = None,
        d: int | None = None,
        tol: float | None = None,
        **tt_options: Any,
    ) -> TTLinear:
        """Decompose an ``nn.Linear`` or Hugging Face ``Conv1D`` weight by TT-SVD.

        Parameters
        ----------
        layer : nn.Linear or transformers Conv1D
            The dense layer; it is not modified.
        rank : int or sequence of int, optional
            The rank of every bond or of each of the ``d - 1`` bonds, at most
            the rank of the unfolding it cuts (see :func:`lowrank.decompose.tt_matrix`).
        out_shape, in_shape : sequence of int, optional
            Factorisations of ``out_features`` and ``in_features``; a missing
            one is :func:`lowrank.nn.tensorize.balanced_factorization` of the features into ``d``.
        d : int, optional
            Number of cores when a shape is not given: the length of the given
            shape, else 3.
        tol : float, optional
            Relative error target in (0, 1) instead of (or, with ``rank``, on top of) fixed ranks.
        **tt_options
            Passed on to :func:`lowrank.decompose.tt_matrix` (``seed=``, ``clip=``).

        Returns
        -------
        TTLinear
            On the layer's device, in its dtype, with the layer's bias.

        Raises
        ------
        ValueError
            If a shape does not multiply to its feature count, the shapes'
            lengths differ from each other or from ``d``, or a rank is out of range.

        """
        weight = linear_weight(layer).detach()
        out_shape, in_shape = tensorized_shapes(tuple(weight.shape), out_shape, in_shape, d)
        factorization = tt_matrix(weight, out_shape, in_shape, rank, tol=tol, **tt_options)
        bias = linear_bias(layer)
        return cls.from_factorization(factorization, bias, linear_type(layer))

    @classmethod
    def rank_for_budget(
        cls,
        layer: nn.Module,
        max_params: int,
        *,
        out_shape: Sequence[int] | None = None,
        in_shape: Sequence[int] | None = None,
        d: int | None = None,
    ) -> int | None:
        """The largest rank, the same on every bond, whose cores and bias hold at most ``max_params`` parameters.

        The shapes are those :meth:`from_dense` picks for the same arguments,
        and the rank is at most the smallest bond's bound, so that
        ``TTLinear.from_dense(layer, TTLinear.rank_for_budget(layer, p))`` works.

        Examples
        --------
        >>> import torch
        >>> TTLinear.rank_for_budget(torch.nn.Linear(768, 3072, bias=False), 117964)   # 5% of the weight
        29

        """
        out_shape, in_shape = tensorized_shapes(tuple(linear_weight(layer).shape), out_shape, in_shape, d)
        sizes = paired_sizes(out_shape, in_shape)
        budget = check_int(max_params, "max_params", minimum=0) - bias_size(layer)

        def cost(rank: int) -> int:
            return sizes[0] * rank + sum(sizes[1:-1]) * rank**2 + sizes[-1] * rank

        return largest_fitting(cost, budget, min(tt_bounds(sizes))) or None

    @property
    def reported_rank(self) -> tuple[int, ...]:
        """The ``d - 1`` internal ranks."""
        return tuple(self.ranks[1:-1])

    def _plan(self, batch: int) -> _Plan:
        """The cheapest plan for ``batch`` rows, chosen once per power of two."""
        bucket = _bucket(batch)
        if bucket not in self._chosen:
            self._chosen[bucket] = min(self._plans, key=lambda plan: plan.cost(bucket))
        return self._chosen[bucket]

    def contraction_order(self, batch: int) -> tuple[tuple[tuple[int, ...], ...], bool]:
        """The forward's contraction order on ``batch`` input rows.

        Returns
        -------
        groups : tuple of tuple of int
            Contiguous groups of core indices (at least two); the cores of each
            group are merged first.
        reverse : bool
            Whether the input meets the groups from the last one (else from the first).

        """
        plan = self._plan(batch)
        return plan.groups, plan.reverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sweep ``x`` (``(..., in_features)``) through the cores, then add the bias."""
        lead = x.shape[:-1]
        plan = self._plan(math.prod(lead))
        cores = [_merge([self.cores[k] for k in group]) for group in plan.groups]
        out = (_sweep_right if plan.reverse else _sweep_left)(x.reshape(-1, self.in_features), cores)
        out = out.reshape(*lead, self.out_features)
        return out if self.bias is None else out + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, rebuilt on every access.

        For checks, export and code that reads ``layer.weight.dtype``; the forward never uses it.
        """
        return TTMatrix(tuple(self.cores)).to_matrix()

    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``) with the rebuilt weight and the bias."""
        return dense_linear(self.weight.detach(), self.bias, self.dense_type)

    def config(self) -> dict[str, Any]:
        """``in_shape``, ``out_shape``, ``rank`` (the ``d - 1`` internal ranks), ``bias`` and ``dense_type``."""
        return {
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "rank": list(self.ranks[1:-1]),
            "bias": self.bias is not None,
            "dense_type": self.dense_type,
        }

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of the forward's contraction order on an input of ``input_shape``.

        Merging the cores of each group costs the same for every batch; the
        sweep costs, per row and group ``g`` (left to right),
        ``prod(M_<g) * prod(N_>g) * R_g M_g N_g R_{g+1}``, with ``M_g``, ``N_g``
        the products of the group's ``m_k``, ``n_k`` and ``R_g`` its outer ranks.
        """
        if not input_shape or input_shape[-1] != self.in_features:
            raise ValueError(f"input_shape must end in in_features={self.in_features}, got {tuple(input_shape)}")
        batch = math.prod(input_shape[:-1])
        return self._plan(batch).macs(batch)

    def extra_repr(self) -> str:
        """Shapes, ranks and bias."""
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}, ranks={self.ranks}, bias={self.bias is not None}"
