"""Low-rank linear layers: ``nn.Linear`` and Hugging Face ``Conv1D`` as two thin products."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lowrank.checks import check_choice, check_ranks
from lowrank.decompose import SVD, svd
from lowrank.nn.base import FactorizedModule
from lowrank.nn.components import RankAxis
from lowrank.nn.dense import LINEAR_TYPES, bias_size, dense_linear, linear_bias, linear_type, linear_weight
from lowrank.rank.budget import budget_rank


class LowRankLinear(FactorizedModule):
    """A linear layer ``y = x W^T + b`` whose weight is ``W = second @ first``.

    ``first`` has shape ``(rank, in_features)`` and ``second`` ``(out_features, rank)``;
    the forward is two GEMMs through the ``rank``-wide bottleneck, the bias added
    by the second.

    Parameters
    ----------
    in_features, out_features : int
        The dense layer's sizes.
    rank : int
        Width of the bottleneck, ``1 <= rank``.
    bias : bool
        Whether the layer has a bias.
    dense_type : {"Linear", "Conv1D"}
        The layer type :meth:`to_dense` rebuilds (``"Conv1D"`` is Hugging Face's
        transposed linear layer).
    device, dtype
        Where and in which dtype the (uninitialised) factors are created.

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn import LowRankLinear
    >>> dense = torch.nn.Linear(64, 32)
    >>> layer = LowRankLinear.from_dense(dense, rank=8)
    >>> layer(torch.randn(5, 64)).shape, layer.num_params
    (torch.Size([5, 32]), 800)

    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dense_type: str = "Linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_choice(dense_type, LINEAR_TYPES, "dense_type")
        (rank,) = check_ranks(rank, [None], what=["a LowRankLinear"])
        self.in_features, self.out_features, self.rank, self.dense_type = in_features, out_features, rank, dense_type
        kwargs = {"device": device, "dtype": dtype}
        self.first = nn.Parameter(torch.empty(rank, in_features, **kwargs))
        self.second = nn.Parameter(torch.empty(out_features, rank, **kwargs))
        self.bias = nn.Parameter(torch.empty(out_features, **kwargs)) if bias else None

    @classmethod
    def from_factorization(
        cls, factorization: SVD, bias: torch.Tensor | None = None, dense_type: str = "Linear"
    ) -> LowRankLinear:
        """Build the layer from a truncated SVD of its ``(out, in)`` weight.

        The singular values are split evenly between the factors (``second = u
        sqrt(s)``, ``first = sqrt(s) vh``), which keeps both equally well scaled
        for training and for low-precision arithmetic.
        """
        root = factorization.s.sqrt()
        return cls.from_factors(root[:, None] * factorization.vh, factorization.u * root, bias, dense_type)

    @classmethod
    def from_factors(
        cls,
        first: torch.Tensor,
        second: torch.Tensor,
        bias: torch.Tensor | None = None,
        dense_type: str = "Linear",
        dtype: torch.dtype | None = None,
    ) -> LowRankLinear:
        """Build the layer from its factors ``first`` ``(rank, in)`` and ``second`` ``(out, rank)``.

        The layer is created on ``first``'s device, in ``dtype`` (``first``'s by default).
        """
        rank, in_features = first.shape
        layer = cls(
            in_features, second.shape[0], rank, bias is not None, dense_type,
            device=first.device, dtype=dtype or first.dtype,
        )
        with torch.no_grad():
            layer.first.copy_(first)
            layer.second.copy_(second)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(cls, layer: nn.Module, rank: int, **svd_options: Any) -> LowRankLinear:
        """Truncate an ``nn.Linear`` or Hugging Face ``Conv1D`` to ``rank``.

        Parameters
        ----------
        layer : nn.Linear or transformers Conv1D
            The dense layer; it is not modified.
        rank : int
            The rank kept, ``1 <= rank <= min(out_features, in_features)``.
        **svd_options
            Passed on to :func:`lowrank.decompose.svd` (``method=``, ``seed=``, ...).

        Returns
        -------
        LowRankLinear
            On the layer's device, in its dtype.

        """
        weight = linear_weight(layer).detach()
        factorization = svd(weight, rank, **svd_options)
        bias = linear_bias(layer)
        return cls.from_factorization(factorization, bias, linear_type(layer))

    @classmethod
    def rank_for_budget(cls, layer: nn.Module, max_params: int) -> int | None:
        """The largest rank with ``rank * (in + out) + bias <= max_params`` (None when not even rank 1 fits).

        Examples
        --------
        >>> import torch
        >>> LowRankLinear.rank_for_budget(torch.nn.Linear(32, 64), 1056)   # half of 64 * 32 + 64
        10

        """
        out_features, in_features = linear_weight(layer).shape
        rank = budget_rank(max_params, out_features + in_features, bias_size(layer), min(out_features, in_features))
        return rank or None

    @classmethod
    def rank_matrices(cls, layer: nn.Module) -> list[torch.Tensor]:
        """The ``(out, in)`` weight, whose truncation the rank is."""
        return [linear_weight(layer).detach()]

    @property
    def reported_rank(self) -> int:
        """The rank."""
        return self.rank

    def rank_axes(self) -> list[RankAxis]:
        """One axis: component ``i`` is ``second[:, i] first[i, :]``."""
        return [RankAxis("rank", self.rank, (("first", 0, False), ("second", 1, False)))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x @ first.T) @ second.T + bias``."""
        return F.linear(self._drop_components(F.linear(x, self.first), -1), self.second, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, rebuilt on every access.

        For checks, export and code that reads ``layer.weight.dtype``; the forward never uses it.
        """
        return self.second @ self.first

    def dense_weight(self) -> torch.Tensor:
        """The product of the factors, ``(in, out)`` for a ``Conv1D`` and ``(out, in)`` otherwise."""
        return self.weight.T if self.dense_type == "Conv1D" else self.weight

    def weight_norm_sq(self) -> torch.Tensor:
        """``||second @ first||_F^2`` from the two ``rank x rank`` Gram matrices."""
        return ((self.first @ self.first.T) * (self.second.T @ self.second)).sum()

    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``) with the product of the factors as weight."""
        return dense_linear(self.weight.detach(), self.bias, self.dense_type)

    def config(self) -> dict[str, Any]:
        """``in_features``, ``out_features``, ``rank``, ``bias`` and ``dense_type``."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
            "dense_type": self.dense_type,
        }

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """``tokens * rank * (in_features + out_features)`` multiply-accumulates."""
        return math.prod(input_shape[:-1]) * self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        """Sizes, rank and bias, as ``nn.Linear`` prints them."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )

