"""Which factorized module replaces which layer: method names, per layer kind, mapped to module classes.

Every job that factorizes a layer (compression, and later training and
adapters) looks its method up here and calls the same three class methods of
the module class (:meth:`~lowrank.nn.base.FactorizedModule.from_dense`,
:meth:`~lowrank.nn.base.FactorizedModule.rank_for_budget`,
:meth:`~lowrank.nn.base.FactorizedModule.rank_matrices`) through a
:class:`Method`, instead of branching on method names.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank.nn.base import FactorizedModule
from lowrank.nn.conv import CPConv, SVDConv, Tucker2Conv
from lowrank.nn.dense import count_params
from lowrank.nn.dlrt import DLRTLinear
from lowrank.nn.embedding import LowRankEmbedding
from lowrank.nn.fused import FusedLowRankLinear
from lowrank.nn.linear import LowRankLinear
from lowrank.nn.tn import TNLinear
from lowrank.nn.tt import TTLinear
from lowrank.rank import FixedRank, ParamFraction, RankPolicy
from lowrank.rank.budget import fraction_budget


@dataclass(frozen=True)
class Method:
    """A factorization method: the module class that replaces a layer, and the options it is built with.

    Attributes
    ----------
    name : str
        The method's name (``"svd"``, ``"tucker2"``, ...).
    module : type of FactorizedModule
        The class whose class methods do the work.
    options : mapping
        Options that shape the module, passed to all three class methods
        (``scheme=`` of :class:`~lowrank.nn.SVDConv`).
    fit_options : mapping
        Options of the decomposition only, passed to ``from_dense``.
    budget_only : bool
        Whether the module's "rank" is a parameter budget within which its
        structure is searched (:class:`~lowrank.nn.TNLinear`): then only
        budgets (``ratio``, :class:`~lowrank.rank.ParamFraction`) choose it.

    """

    name: str
    module: type[FactorizedModule]
    options: Mapping[str, Any] = field(default_factory=dict)
    fit_options: Mapping[str, Any] = field(default_factory=dict)
    budget_only: bool = False

    def from_dense(self, layer: nn.Module, rank: Any) -> FactorizedModule:
        """``module.from_dense(layer, rank)`` with this method's options."""
        return self.module.from_dense(layer, rank, **self.options, **self.fit_options)

    def rank_for_budget(self, layer: nn.Module, max_params: int) -> Any:
        """``module.rank_for_budget(layer, max_params)`` with this method's options (None: nothing fits)."""
        return self.module.rank_for_budget(layer, max_params, **self.options)

    def choose_rank(
        self, layer: nn.Module, policy: RankPolicy, spectra: Sequence[torch.Tensor] | None = None
    ) -> Any:
        """The rank ``policy`` gives ``layer`` under this method; None when no rank of at least 1 fits.

        A :class:`~lowrank.rank.ParamFraction` is a budget: the largest rank
        whose module (factors and bias) holds at most that fraction of the
        layer's parameters (bias included), clamped by the policy's bounds.
        A policy that reads singular values reads those of the module's
        :meth:`~lowrank.nn.base.FactorizedModule.rank_matrices` (float64),
        one rank per matrix, or the ``spectra`` given instead (such as a
        whitened weight's); a :class:`~lowrank.rank.FixedRank` applies as it
        is where the module has no such matrices. Every rank is clamped to the
        policy's ``min_rank``/``max_rank`` and to the largest the module takes.

        Raises
        ------
        ValueError
            If the policy cannot choose this method's rank: one that reads
            singular values for a module without rank matrices, or any but a
            budget for a searched structure.

        """
        if isinstance(policy, ParamFraction):
            rank = self.rank_for_budget(layer, fraction_budget(policy.fraction, count_params(layer)))
            return rank if rank is None or self.budget_only else self._clamp(layer, policy, rank)
        if self.budget_only:
            raise ValueError(f"method {self.name!r} searches a structure within a parameter budget: give ratio= "
                             f"(or rank=ParamFraction(...)), not {policy}")
        matrices = self.module.rank_matrices(layer, **self.options)
        if matrices:
            if spectra is None:
                spectra = [torch.linalg.svdvals(m.double()) if policy.needs_spectrum else None for m in matrices]
            ranks = tuple(policy.choose(s, tuple(m.shape)) for s, m in zip(spectra, matrices))
            if min(ranks) < 1:
                return None
            return ranks[0] if len(ranks) == 1 else ranks
        if not isinstance(policy, FixedRank):
            raise ValueError(f"{policy} picks ranks from singular values, which method {self.name!r} has none of")
        return self._clamp(layer, policy, policy.rank)

    def _clamp(self, layer: nn.Module, policy: RankPolicy, rank: Any) -> Any:
        """``rank`` (an int, or one per entry) within the policy's bounds and the largest the module takes.

        The largest is the rank an unlimited budget gives (see ``rank_for_budget``).
        """
        largest = self.rank_for_budget(layer, sys.maxsize)
        if isinstance(largest, int):
            return policy.clamp(rank, largest)
        ranks = (rank,) * len(largest) if isinstance(rank, int) else rank
        return tuple(policy.clamp(r, upper) for r, upper in zip(ranks, largest))


# Per layer kind, the methods that apply to it; the first is what method="auto" picks.
METHODS: dict[str, dict[str, Method]] = {
    "linear": {
        "svd": Method("svd", LowRankLinear),
        "tt": Method("tt", TTLinear),
        # the search stops growing at a relative error below which a float32 weight is held as well as it can
        # be, and raises a bond by half its rank per step: one rank at a time would take hundreds of steps to
        # fill the budget of a transformer-sized layer (see lowrank.decompose.tn)
        "tn": Method("tn", TNLinear, fit_options={"tol": 1e-6, "growth": 0.5}, budget_only=True),
    },
    "conv": {
        "tucker2": Method("tucker2", Tucker2Conv),
        "cp": Method("cp", CPConv),
        "svd-channel": Method("svd-channel", SVDConv, {"scheme": "channel"}),
        "svd-spatial": Method("svd-spatial", SVDConv, {"scheme": "spatial"}),
    },
    "pointwise": {"svd-channel": Method("svd-channel", SVDConv, {"scheme": "channel"})},
    "embedding": {"svd": Method("svd", LowRankEmbedding)},
}

# Every factorized module class by name, as a saved plan records it (DLRTLinear is no compression method: the
# training method lowrank.train.DLRT makes it, and a checkpoint taken while training holds it; nor is
# FusedLowRankLinear: lowrank.nn.fuse_shared_inputs makes it from LowRankLinear layers).
MODULES: dict[str, type[FactorizedModule]] = {
    cls.__name__: cls
    for cls in (LowRankLinear, LowRankEmbedding, Tucker2Conv, CPConv, SVDConv, TTLinear, TNLinear, DLRTLinear,
                FusedLowRankLinear)
}


def module_class(name: str) -> type[FactorizedModule]:
    """The factorized module class called ``name`` (as recorded in a saved plan)."""
    if name not in MODULES:
        raise ValueError(f"unknown factorized module {name!r}; known: {', '.join(MODULES)}")
    return MODULES[name]


def resolve_methods(method: str | Mapping[str, str], kinds: Iterable[str]) -> dict[str, Method]:
    """One :class:`Method` per layer kind from ``"auto"``, a method name, or a ``{kind: method}`` mapping.

    Parameters
    ----------
    method : str or mapping
        ``"auto"`` (the first method of each kind in :data:`METHODS`); one
        method name, applied to every kind of ``kinds`` that has it (the others
        keep ``"auto"``); or ``{kind: name}``, ``"auto"`` allowed as a name.
    kinds : iterable of str
        The layer kinds targeted (a single name must apply to one of them).

    Returns
    -------
    dict of str to Method
        A method for every kind of :data:`METHODS`.

    Examples
    --------
    >>> methods = resolve_methods({"conv": "cp"}, ["linear", "conv"])
    >>> methods["linear"].module.__name__, methods["conv"].module.__name__
    ('LowRankLinear', 'CPConv')

    """
    chosen = {kind: next(iter(methods.values())) for kind, methods in METHODS.items()}
    if isinstance(method, Mapping):
        for kind, name in method.items():
            if kind not in METHODS:
                raise ValueError(f"method keys must be layer kinds {tuple(METHODS)}; got {kind!r}")
            if name != "auto" and name not in METHODS[kind]:
                raise ValueError(f"method for {kind} layers must be one of {tuple(METHODS[kind])}; got {name!r}")
            if name != "auto":
                chosen[kind] = METHODS[kind][name]
        return chosen
    if method == "auto":
        return chosen
    kinds = list(kinds)
    fits = [kind for kind in kinds if method in METHODS[kind]]
    if not fits:
        allowed = sorted({name for kind in kinds for name in METHODS[kind]})
        raise ValueError(f"method must be 'auto' or one of {allowed} for the targeted layers; got {method!r}")
    chosen.update({kind: METHODS[kind][method] for kind in fits})
    return chosen
