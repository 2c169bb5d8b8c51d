"""The interface every factorized module shares."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# What a module's rank is: an int (a matrix rank, a CP rank, a TT bond rank), or one int per entry
# (Tucker-2's (r_out, r_in), a TT's bonds).
Rank = int | tuple[int, ...]


class FactorizedModule(nn.Module):
    """Base class of the factorized layers in :mod:`lowrank.nn`.

    A factorized module replaces one dense layer and computes its forward pass
    with the factors (never rebuilding the dense weight). Every subclass

    - is built empty from plain shapes and ranks (``cls(**module.config())``
      rebuilds a module of the same structure, which is how :func:`lowrank.load`
      re-applies a saved plan before loading the factors);
    - builds itself from a dense layer at a rank, ``cls.from_dense(layer, rank)``,
      and says which rank fits a parameter budget, ``cls.rank_for_budget(layer,
      max_params)``, the two class methods every job uses to factorize a layer
      (see :mod:`lowrank.nn.registry`);
    - names the matrices whose singular values a rank policy reads
      (``cls.rank_matrices(layer)``);
    - rebuilds an equivalent dense layer with :meth:`to_dense`;
    - counts its parameters (:attr:`num_params`) and estimates its forward
      cost (:meth:`flops`).
    """

    @classmethod
    def from_dense(cls, layer: nn.Module, rank: Any, **options: Any) -> FactorizedModule:
        """The factorized replacement of ``layer`` at ``rank``, on its device and in its dtype.

        ``options`` go to the decomposition; ``layer`` is not modified.
        """
        raise NotImplementedError

    @classmethod
    def rank_for_budget(cls, layer: nn.Module, max_params: int, **options: Any) -> Any:
        """The largest rank whose module (factors and bias) holds at most ``max_params`` parameters.

        None when not even the smallest rank fits. ``options`` are those of
        :meth:`from_dense` that change the module's size.
        """
        raise NotImplementedError

    @classmethod
    def rank_matrices(cls, layer: nn.Module, **options: Any) -> list[torch.Tensor]:
        """The matrices whose truncation ranks are this module's ranks, one per rank entry.

        A rank policy reads their singular values (:meth:`lowrank.rank.RankPolicy.choose`).
        Empty when the rank is no matrix's truncation (CP, tensor trains and
        networks), where only fixed ranks and budgets apply.
        """
        return []

    def config(self) -> dict[str, Any]:
        """The keyword arguments of ``__init__`` that rebuild this module's structure (JSON-able)."""
        raise NotImplementedError

    @property
    def reported_rank(self) -> Rank:
        """The rank a compression report shows for this module."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """An equivalent dense layer of the type this module replaced, with the same hyper-parameters."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The weight of :meth:`to_dense`, in the dense layer's own layout (for checks, not used in forward)."""
        return self.to_dense().weight

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulate operations of one forward pass on an input of ``input_shape``.

        ``input_shape`` includes the batch dimensions (for a convolution, the
        full ``(N, C, *spatial)`` shape).
        """
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        """Number of parameters (factors and bias)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the factors."""
        return next(self.parameters()).dtype


class UnsupportedLayerError(ValueError):
    """A layer whose structure a factorized module cannot represent (e.g. a depthwise conv for Tucker-2).

    :func:`lowrank.compress` leaves such a layer dense and records the message
    as its skip reason; any other error aborts the compression.
    """
