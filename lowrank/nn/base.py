"""The interface every factorized module shares."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank.nn.components import RankAxis, RankDropout

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
      cost (:meth:`flops`);
    - where it has rank components, lists them (:meth:`rank_axes`, see
      :mod:`lowrank.nn.components`) and can drop them at random in training
      (:meth:`set_rank_dropout`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.rank_dropout: RankDropout | None = None

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

    @property
    def kind(self) -> str:
        """The kind of layer it replaced, as :func:`lowrank.nn.dense.layer_kind` names it."""
        return "linear"

    def rank_axes(self) -> list[RankAxis]:
        """The module's ranks and the parameter slices each rank component owns.

        Empty for modules whose ranks are no sum of components (tensor trains
        and networks, whose bond ranks are internal).
        """
        return []

    def budget_parameters(self) -> list[str]:
        """The names of the parameters a parameter budget counts (all of the module's).

        See :func:`~lowrank.nn.components.active_params`.
        """
        return [name for name, _ in self.named_parameters()]

    def set_rank_dropout(self, p: float, ordered: bool = False) -> None:
        """Drop whole rank components during training with probability ``p`` (0 turns it off).

        See :class:`~lowrank.nn.components.RankDropout`. The option is not part
        of :meth:`config`: it changes training, not the module's structure.

        Raises
        ------
        ValueError
            If the module has no rank components (:meth:`rank_axes` is empty).

        """
        if not self.rank_axes():
            raise ValueError(f"{type(self).__name__} has no rank components to drop")
        self.rank_dropout = RankDropout(p, ordered) if p else None

    def _drop_components(self, h: torch.Tensor, dim: int, groups: int = 1) -> torch.Tensor:
        """``h`` (a rank bottleneck along ``dim``) through the rank dropout, if the module has one."""
        return h if self.rank_dropout is None else self.rank_dropout(h, dim, groups)

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

    def weight_norm_sq(self) -> torch.Tensor:
        """``||W||_F^2`` of the dense weight the factors make, differentiable (Frobenius decay's term).

        Modules whose factors allow it compute it from small Gram matrices
        instead of rebuilding ``W`` (the ``weight`` property every module has).
        """
        return self.weight.square().sum()

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
