"""Low-rank linear layers: ``nn.Linear`` and Hugging Face ``Conv1D`` as two thin products."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lowrank.decompose import SVD, svd
from lowrank.nn.base import FactorizedModule

LINEAR_TYPES = ("Linear", "Conv1D")


def is_hf_conv1d(layer: nn.Module) -> bool:
    """Whether ``layer`` is Hugging Face's ``Conv1D`` (GPT-2 style linear, weight stored ``(in, out)``)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and hasattr(layer, "nx")


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight of an ``nn.Linear`` or a Hugging Face ``Conv1D``."""
    if is_hf_conv1d(layer):
        return layer.weight.T
    if isinstance(layer, nn.Linear):
        return layer.weight
    raise TypeError(f"expected an nn.Linear or a Hugging Face Conv1D, got {type(layer).__name__}")


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dense_type: str = "Linear") -> nn.Module:
    """An ``nn.Linear`` (or a Hugging Face ``Conv1D``) holding an ``(out, in)`` weight and a bias."""
    out_features, in_features = weight.shape
    if dense_type == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(out_features, in_features).to(weight)
        weight = weight.T
    else:
        dense = nn.Linear(in_features, out_features, bias is not None, weight.device, weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


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
        if dense_type not in LINEAR_TYPES:
            raise ValueError(f"dense_type must be one of {LINEAR_TYPES}, got {dense_type!r}")
        if not 1 <= rank:
            raise ValueError(f"rank must be at least 1, got {rank}")
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
        dense_type = "Conv1D" if is_hf_conv1d(layer) else "Linear"
        bias = None if layer.bias is None else layer.bias.detach()
        return cls.from_factorization(factorization, bias, dense_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x @ first.T) @ second.T + bias``."""
        return F.linear(F.linear(x, self.first), self.second, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, rebuilt on every access.

        For checks, export and code that reads ``layer.weight.dtype``; the forward never uses it.
        """
        return self.second @ self.first

    def dense_weight(self) -> torch.Tensor:
        """The product of the factors, ``(in, out)`` for a ``Conv1D`` and ``(out, in)`` otherwise."""
        return self.weight.T if self.dense_type == "Conv1D" else self.weight

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


def linear_rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose two factors hold at most ``ratio`` of the ``out x in`` weight's parameters (0 if none)."""
    return max(0, min(math.floor(ratio * out_features * in_features / (out_features + in_features)),
                      out_features, in_features))
