"""Tensor-network linear layers: the tensorised weight held by a network whose structure was searched."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import opt_einsum
import torch
from torch import nn

from lowrank.checks import check_choice, check_int
from lowrank.decompose import TensorNetwork, tn
from lowrank.decompose.factorizations import network_expression, network_subscripts
from lowrank.nn.base import FactorizedModule
from lowrank.nn.dense import LINEAR_TYPES, bias_size, dense_linear, linear_bias, linear_type, linear_weight
from lowrank.nn.tensorize import factor_shape, paired_sizes, tensorize_weight, tensorized_shapes


def _checked_bonds(bonds: Sequence[Sequence[int]], d: int) -> tuple[tuple[int, int, int], ...]:
    """``bonds`` as sorted ``(i, j, rank)`` triples with ``0 <= i < j < d``, each pair once, ranks >= 1."""
    checked = {}
    for bond in bonds:
        if len(bond) != 3 or any(isinstance(v, bool) or not isinstance(v, int) for v in bond):
            raise ValueError(f"each bond must be three ints (i, j, rank), got {bond!r}")
        i, j, rank = sorted(bond[:2]) + [bond[2]]
        if not 0 <= i < j < d or rank < 1 or (i, j) in checked:
            raise ValueError(f"bond {tuple(bond)!r} must join two different cores among {d} once, with rank >= 1")
        checked[i, j] = rank
    return tuple((i, j, rank) for (i, j), rank in sorted(checked.items()))


class TNLinear(FactorizedModule):
    """A linear layer ``y = x W^T + b`` whose weight is a tensor network of searched structure.

    The ``(out_features, in_features)`` weight, viewed as the ``d``-way tensor
    of :func:`tensorize_weight` (mode ``k`` pairs ``m_k`` outputs with ``n_k``
    inputs), is a :class:`lowrank.decompose.TensorNetwork`: one core per mode
    and ``n_internal`` internal cores, joined by the ``bonds`` a structure
    search (:func:`lowrank.decompose.tn`) found. The forward contracts the
    input with the cores along a path found once per batch size by
    ``opt_einsum``'s dynamic programming (the cheapest order for that batch:
    it may merge cores first when the batch is large).

    Parameters
    ----------
    in_shape, out_shape : sequence of int
        Factorisations ``(n_1, ..., n_d)`` of ``in_features`` and
        ``(m_1, ..., m_d)`` of ``out_features``, of equal length ``d >= 2``.
    bonds : sequence of (int, int, int)
        The network's edges ``(i, j, rank)``; pairs not listed have rank 1.
        Cores ``0 .. d-1`` hold the modes, cores ``d .. d + n_internal - 1``
        are internal.
    bias : bool
        Whether the layer has a bias.
    dense_type : {"Linear", "Conv1D"}
        The layer type :meth:`to_dense` rebuilds.
    device, dtype
        Where and in which dtype the (uninitialised) cores are created.
    n_internal : int
        Number of internal cores (which carry no mode).

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn import TNLinear
    >>> layer = TNLinear(in_shape=(4, 4, 4), out_shape=(2, 4, 4), bonds=[(0, 1, 3), (1, 2, 2), (0, 2, 2)])
    >>> [tuple(core.shape) for core in layer.cores]
    [(8, 3, 2), (3, 16, 2), (2, 2, 16)]
    >>> layer(torch.randn(5, 64)).shape
    torch.Size([5, 32])

    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        bonds: Sequence[Sequence[int]],
        bias: bool = True,
        dense_type: str = "Linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        n_internal: int = 0,
    ) -> None:
        super().__init__()
        in_shape, out_shape = factor_shape(in_shape, "in_shape"), factor_shape(out_shape, "out_shape")
        if len(in_shape) != len(out_shape):
            raise ValueError(f"in_shape {in_shape} and out_shape {out_shape} must have the same length")
        check_choice(dense_type, LINEAR_TYPES, "dense_type")
        check_int(n_internal, "n_internal", minimum=0)
        d = len(in_shape)
        n_cores = d + n_internal
        self.in_shape, self.out_shape, self.dense_type = in_shape, out_shape, dense_type
        self.n_internal = n_internal
        self.in_features, self.out_features = math.prod(in_shape), math.prod(out_shape)
        self.bonds = _checked_bonds(bonds, n_cores)
        sizes = paired_sizes(out_shape, in_shape) + [1] * n_internal
        ranks = [[sizes[i] if i == j else 1 for j in range(n_cores)] for i in range(n_cores)]
        for i, j, rank in self.bonds:
            ranks[i][j] = ranks[j][i] = rank
        kwargs = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(nn.Parameter(torch.empty(row, **kwargs)) for row in ranks)
        self.bias = nn.Parameter(torch.empty(self.out_features, **kwargs)) if bias else None
        inputs, _ = network_subscripts(n_cores)
        first_free = n_cores * n_cores  # beyond the letters of the network's indices
        out_letters = [opt_einsum.get_symbol(first_free + k) for k in range(d)]
        in_letters = [opt_einsum.get_symbol(first_free + d + k) for k in range(d)]
        batch = opt_einsum.get_symbol(first_free + 2 * d)
        # core k's mode letter split into (output, input) letters; the input and output get a batch letter;
        # an internal core's own letter (of size one) is summed away
        cores = [
            spec.replace(spec[k], out_letters[k] + in_letters[k]) if k < d else spec for k, spec in enumerate(inputs)
        ]
        self._equation = ",".join([batch + "".join(in_letters), *cores]) + "->" + batch + "".join(out_letters)

    @classmethod
    def from_network(
        cls,
        network: TensorNetwork,
        out_shape: Sequence[int],
        in_shape: Sequence[int],
        bias: torch.Tensor | None = None,
        dense_type: str = "Linear",
    ) -> TNLinear:
        """Build the layer from a network of its tensorised weight (see :func:`tensorize_weight`).

        Parameters
        ----------
        network : TensorNetwork
            Mode ``k`` of size ``out_shape[k] * in_shape[k]``.
        out_shape, in_shape : sequence of int
            The factorisations of the output and input features.
        bias : torch.Tensor, optional
            The ``(out_features,)`` bias; None for a layer without one.
        dense_type : {"Linear", "Conv1D"}
            The layer type :meth:`to_dense` rebuilds.

        Returns
        -------
        TNLinear
            On the network's device, in its dtype.

        """
        if not isinstance(network, TensorNetwork):
            raise TypeError(f"network must be a lowrank TensorNetwork, got {type(network).__name__}")
        sizes = tuple(paired_sizes(out_shape, in_shape))
        if network.shape != sizes or len(out_shape) != len(in_shape):
            raise ValueError(
                f"the network's shape {network.shape} must be the paired sizes {sizes} of out_shape "
                f"{tuple(out_shape)} and in_shape {tuple(in_shape)}"
            )
        bonds = [(i, j, network.ranks[i][j]) for i, j in network.edges]
        layer = cls(in_shape, out_shape, bonds, bias is not None, dense_type, network.device, network.dtype,
                    network.n_internal)
        with torch.no_grad():
            for core, value in zip(layer.cores, network.cores):
                core.copy_(value)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(
        cls,
        layer: nn.Module,
        rank: int | None = None,
        *,
        out_shape: Sequence[int] | None = None,
        in_shape: Sequence[int] | None = None,
        d: int | None = None,
        tol: float | None = None,
        **search_options: Any,
    ) -> TNLinear:
        """Search a network for an ``nn.Linear`` or Hugging Face ``Conv1D`` weight.

        A network's rank is its structure, which the search finds; what it is
        given is the budget: ``rank`` is the most parameters its cores may hold.

        Parameters
        ----------
        layer : nn.Linear or transformers Conv1D
            The dense layer; it is not modified.
        rank : int, optional
            The most parameters the cores may hold (the bias is not counted;
            :meth:`rank_for_budget` gives it for a budget that counts it).
        out_shape, in_shape : sequence of int, optional
            Factorisations of ``out_features`` and ``in_features``; a missing
            one is :func:`lowrank.nn.tensorize.balanced_factorization` of the features into ``d``.
        d : int, optional
            Number of cores when a shape is not given (default 3).
        tol : float, optional
            Relative weight error at which the search stops. At least one of
            ``rank`` and ``tol`` is required.
        **search_options
            Passed on to :func:`lowrank.decompose.tn` (``growth=``, ``time_limit=``, ``seed=``, ...).

        Returns
        -------
        TNLinear
            On the layer's device, in its dtype, with the layer's bias.

        """
        if rank is None and tol is None:
            raise ValueError("give rank= (a budget for the cores) or tol= (a relative weight error), or both")
        weight = linear_weight(layer).detach()
        out_shape, in_shape = tensorized_shapes(tuple(weight.shape), out_shape, in_shape, d)
        network = tn(tensorize_weight(weight, out_shape, in_shape), tol=tol, max_params=rank, **search_options)
        bias = linear_bias(layer)
        return cls.from_network(network, out_shape, in_shape, bias, linear_type(layer))

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
        """The cores' budget when the layer (cores and bias) may hold ``max_params`` parameters.

        None when it cannot hold even the network with every rank one (one
        ``m_k * n_k`` core per mode).

        Examples
        --------
        >>> import torch
        >>> layer = torch.nn.Linear(64, 64)   # tensorised as (4, 4, 4) x (4, 4, 4): three cores of 16 at least
        >>> TNLinear.rank_for_budget(layer, 1000), TNLinear.rank_for_budget(layer, 100)
        (936, None)

        """
        out_shape, in_shape = tensorized_shapes(tuple(linear_weight(layer).shape), out_shape, in_shape, d)
        budget = check_int(max_params, "max_params", minimum=0) - bias_size(layer)
        return budget if budget >= sum(paired_sizes(out_shape, in_shape)) else None

    @property
    def reported_rank(self) -> tuple[int, ...]:
        """The rank of every bond, in the order of :attr:`bonds`."""
        return tuple(rank for _, _, rank in self.bonds)

    @property
    def network(self) -> TensorNetwork:
        """The cores as a :class:`lowrank.decompose.TensorNetwork` of the tensorised weight."""
        return TensorNetwork(tuple(self.cores), n_internal=self.n_internal)

    def _operand_shapes(self, rows: int) -> list[tuple[int, ...]]:
        """Shapes of the forward's operands: the input ``(rows, *in_shape)``, then each core with its mode split."""
        shapes = [(rows, *self.in_shape)]
        for k, core in enumerate(self.cores):
            mode = (self.out_shape[k], self.in_shape[k]) if k < len(self.in_shape) else (1,)
            shapes.append((*core.shape[:k], *mode, *core.shape[k + 1:]))
        return shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Contract ``x`` (``(..., in_features)``) with the cores, then add the bias."""
        lead = x.shape[:-1]
        rows = math.prod(lead)
        shapes = self._operand_shapes(rows)
        operands = [x.reshape(shapes[0])] + [core.reshape(shape) for core, shape in zip(self.cores, shapes[1:])]
        out = network_expression(self._equation, *shapes, optimize="dp")(*operands, backend="torch")
        out = out.reshape(*lead, self.out_features)
        return out if self.bias is None else out + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, rebuilt on every access (never used by the forward)."""
        d = len(self.in_shape)
        tensor = self.network.to_tensor().reshape([s for m, n in zip(self.out_shape, self.in_shape) for s in (m, n)])
        return tensor.permute([*range(0, 2 * d, 2), *range(1, 2 * d, 2)]).reshape(self.out_features, self.in_features)

    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``) with the rebuilt weight and the bias."""
        return dense_linear(self.weight.detach(), self.bias, self.dense_type)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments: shapes, ``bonds`` (``[i, j, rank]`` lists), bias, dense type, ``n_internal``."""
        return {
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "bonds": [list(bond) for bond in self.bonds],
            "bias": self.bias is not None,
            "dense_type": self.dense_type,
            "n_internal": self.n_internal,
        }

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of the forward's contraction path on an input of ``input_shape``.

        Each pairwise contraction of the path costs the product of the sizes of
        all the indices of its two operands. A step on one operand only sums
        away an internal core's own index of size one, which multiplies
        nothing (``opt_einsum``'s own cost counts it, and counts two operations
        per multiply-accumulate).
        """
        if not input_shape or input_shape[-1] != self.in_features:
            raise ValueError(f"input_shape must end in in_features={self.in_features}, got {tuple(input_shape)}")
        shapes = self._operand_shapes(math.prod(input_shape[:-1]))
        _, info = opt_einsum.contract_path(self._equation, *shapes, shapes=True, optimize="dp")
        total = 0
        for step in info.contraction_list:
            operands = step[2].split("->")[0].split(",")
            if len(operands) > 1:
                total += math.prod(info.size_dict[index] for index in set("".join(operands)))
        return total

    def extra_repr(self) -> str:
        """Shapes, bonds and bias."""
        return (
            f"in_shape={self.in_shape}, out_shape={self.out_shape}, bonds={self.bonds}, "
            f"n_internal={self.n_internal}, bias={self.bias is not None}"
        )
