"""Low-rank embedding tables: a lookup into an ``r``-wide table, then a projection."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lowrank.checks import check_ranks
from lowrank.decompose import svd
from lowrank.nn.base import FactorizedModule, UnsupportedLayerError
from lowrank.nn.components import RankAxis
from lowrank.rank.budget import budget_rank


class LowRankEmbedding(FactorizedModule):
    """An embedding whose ``(num_embeddings, embedding_dim)`` table is ``table @ projection.T``.

    The forward looks the indices up in ``table`` (``num_embeddings x rank``) and
    multiplies the rows by ``projection.T`` (``rank x embedding_dim``).

    Parameters
    ----------
    num_embeddings, embedding_dim : int
        The dense table's shape.
    rank : int
        Width of the low-rank table.
    padding_idx : int, optional
        As in ``nn.Embedding``: that row receives no gradient.
    scale_grad_by_freq, sparse : bool
        As in ``nn.Embedding`` (for the lookup into ``table``).
    device, dtype
        Where and in which dtype the (uninitialised) factors are created.

    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        (rank,) = check_ranks(rank, [None], what=["a LowRankEmbedding"])
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx, self.scale_grad_by_freq, self.sparse = padding_idx, scale_grad_by_freq, sparse
        self.table = nn.Parameter(torch.empty(num_embeddings, rank, device=device, dtype=dtype))
        self.projection = nn.Parameter(torch.empty(embedding_dim, rank, device=device, dtype=dtype))

    @classmethod
    def from_dense(cls, layer: nn.Embedding, rank: int, **svd_options: Any) -> LowRankEmbedding:
        """Truncate an ``nn.Embedding``'s table to ``rank`` by SVD.

        A zero padding row stays exactly zero. ``max_norm`` renormalises rows of
        the dense table in place during the forward, which has no low-rank
        equivalent, so such embeddings are refused.
        """
        if not isinstance(layer, nn.Embedding):
            raise TypeError(f"expected an nn.Embedding, got {type(layer).__name__}")
        if layer.max_norm is not None:
            raise UnsupportedLayerError(f"an embedding with max_norm={layer.max_norm} has no low-rank equivalent")
        factorization = svd(layer.weight.detach(), rank, **svd_options)
        module = cls(
            layer.num_embeddings, layer.embedding_dim, factorization.rank, layer.padding_idx,
            layer.scale_grad_by_freq, layer.sparse, device=factorization.device, dtype=factorization.dtype,
        )
        with torch.no_grad():
            module.table.copy_(factorization.u * factorization.s)
            module.projection.copy_(factorization.vh.T)
        return module

    @classmethod
    def rank_for_budget(cls, layer: nn.Embedding, max_params: int) -> int | None:
        """The largest rank with ``rank * (num_embeddings + embedding_dim) <= max_params`` (None: none fits)."""
        rows, cols = layer.weight.shape
        return budget_rank(max_params, rows + cols, max_rank=min(rows, cols)) or None

    @classmethod
    def rank_matrices(cls, layer: nn.Embedding) -> list[torch.Tensor]:
        """The ``(num_embeddings, embedding_dim)`` table, whose truncation the rank is."""
        return [layer.weight.detach()]

    @property
    def reported_rank(self) -> int:
        """The rank."""
        return self.rank

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Look up ``table`` rows and project them to ``embedding_dim``."""
        rows = F.embedding(indices, self.table, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)
        return F.linear(self._drop_components(rows, -1), self.projection)

    @property
    def kind(self) -> str:
        """``"embedding"``."""
        return "embedding"

    def rank_axes(self) -> list[RankAxis]:
        """One axis: component ``i`` is ``table[:, i] projection[:, i]^T``."""
        return [RankAxis("rank", self.rank, (("table", 1, False), ("projection", 1, False)))]

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(num_embeddings, embedding_dim)`` table, rebuilt on every access (not used in forward)."""
        return self.table @ self.projection.T

    def weight_norm_sq(self) -> torch.Tensor:
        """``||table @ projection.T||_F^2`` from the two ``rank x rank`` Gram matrices."""
        return ((self.table.T @ self.table) * (self.projection.T @ self.projection)).sum()

    def to_dense(self) -> nn.Embedding:
        """An ``nn.Embedding`` holding ``table @ projection.T``."""
        weight = self.weight.detach()
        return nn.Embedding.from_pretrained(
            weight, freeze=False, padding_idx=self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
        )

    def config(self) -> dict[str, Any]:
        """The shape, rank and lookup options."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "rank": self.rank,
            "padding_idx": self.padding_idx,
            "scale_grad_by_freq": self.scale_grad_by_freq,
            "sparse": self.sparse,
        }

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """``indices * rank * embedding_dim`` multiply-accumulates (the projection; the lookup is free)."""
        return math.prod(input_shape) * self.rank * self.embedding_dim

    def extra_repr(self) -> str:
        """Shape, rank and padding index."""
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, padding_idx={self.padding_idx}"
