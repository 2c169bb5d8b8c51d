"""Low-rank linear layers that share their input, their first factors run as one GEMM.

The query, key and value projections of an attention block (and the gate and
up projections of a gated MLP) all read the same hidden states. Once each is a
:class:`~lowrank.nn.LowRankLinear`, their thin first factors can be stacked and
applied in one GEMM, whose output is split among them: fewer, larger matrix
products, which BLAS runs faster than three thin ones.

The model's own code still calls each projection on its own. A
:class:`FusedLowRankLinear` keeps its own parameters (saved under the same names
as a ``LowRankLinear``'s), and the layers of one group share a
:class:`SharedInput`: the first member called with a new input computes every
member's bottleneck at once, and the others take theirs from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lowrank.nn.linear import LowRankLinear
from lowrank.nn.surgery import swap_modules


class SharedInput:
    """The bottlenecks of a group of :class:`FusedLowRankLinear` for the input they were last called on.

    Parameters
    ----------
    members : sequence of FusedLowRankLinear
        The group, in the order of their ``siblings``.

    Notes
    -----
    A member called with the input held here takes its part; a member called with
    another input (or a second time, or after the input or a first factor was
    changed in place, or in another gradient mode) computes the whole group's
    bottlenecks anew.
    If that happens while parts are still untaken, the members evidently do not
    share their inputs in this model (cross-attention's query and key), and from
    then on each computes its own.
    """

    def __init__(self, members: Sequence[FusedLowRankLinear]) -> None:
        self.members = list(members)
        self.shared = True
        self._clear()

    def __getstate__(self) -> dict[str, Any]:
        """The group without the bottlenecks it holds (so that copies and pickles carry no activations)."""
        return {"members": self.members, "shared": self.shared}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copied or unpickled group, holding nothing."""
        self.members, self.shared = state["members"], state["shared"]
        self._clear()

    def _clear(self) -> None:
        self._input: torch.Tensor | None = None
        self._key: tuple = ()
        self._parts: tuple[torch.Tensor, ...] = ()
        self._taken: set[int] = set()

    def _key_of(self, x: torch.Tensor) -> tuple:
        """What the held bottlenecks depend on besides ``x`` itself: its version, the factors' versions, grad mode.

        An inference tensor (made under ``torch.inference_mode``) has no version
        counter, and cannot be changed in place outside that mode anyway.
        """
        version = None if x.is_inference() else x._version
        return (version, torch.is_grad_enabled(), *(m.first._version for m in self.members))

    def bottleneck(self, member: FusedLowRankLinear, x: torch.Tensor) -> torch.Tensor:
        """``x @ member.first.T``, computed with the whole group's first factors where that saves work.

        A layer that is not this group's member at its place (a replica made by
        ``nn.DataParallel``, a copy made alone, a layer rebuilt after its
        components were pruned) computes its own.
        """
        position = member.position
        if not self.shared or position >= len(self.members) or self.members[position] is not member:
            return F.linear(x, member.first)
        key = self._key_of(x)
        if self._input is not x or self._key != key or position in self._taken:
            if self._input is not None and len(self._taken) < len(self.members):
                self.shared = False
                self._clear()
                return F.linear(x, member.first)
            stacked = torch.cat([m.first for m in self.members])
            self._parts = F.linear(x, stacked).split([m.rank for m in self.members], dim=-1)
            self._input, self._key, self._taken = x, key, set()
        self._taken.add(position)
        part = self._parts[position]
        if len(self._taken) == len(self.members):
            self._clear()
        return part


class FusedLowRankLinear(LowRankLinear):
    """A :class:`~lowrank.nn.LowRankLinear` whose first factor runs in one GEMM with its siblings'.

    Parameters
    ----------
    in_features, out_features, rank, bias, dense_type, device, dtype
        As for :class:`~lowrank.nn.LowRankLinear`.
    siblings : sequence of str
        The names, under the same parent module, of the layers of its group, in
        the order their first factors are stacked.
    position : int
        This layer's place in ``siblings``.

    Notes
    -----
    Until it is linked to its siblings (:func:`fuse_shared_inputs`, or
    :func:`link_shared_inputs` after a load), the layer computes as a plain
    ``LowRankLinear``. The output is the same either way.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dense_type: str = "Linear",
        siblings: Sequence[str] = (),
        position: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, bias, dense_type, device, dtype)
        if not 0 <= position < len(siblings):
            raise ValueError(f"position {position} is not a place in siblings {list(siblings)}")
        self.siblings, self.position = list(siblings), position
        self.shared_input: SharedInput | None = None

    @classmethod
    def from_low_rank(cls, layer: LowRankLinear, siblings: Sequence[str], position: int) -> FusedLowRankLinear:
        """The same layer as member ``position`` of ``siblings``, its parameters (the very tensors) and mode taken over.

        Hooks registered on ``layer`` are not carried over.
        """
        fused = cls(layer.in_features, layer.out_features, layer.rank, layer.bias is not None, layer.dense_type,
                    siblings, position, device="meta")
        fused.first, fused.second, fused.bias = layer.first, layer.second, layer.bias
        fused.rank_dropout = layer.rank_dropout
        fused.train(layer.training)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x @ first.T) @ second.T + bias``, the first product shared with the siblings."""
        h = F.linear(x, self.first) if self.shared_input is None else self.shared_input.bottleneck(self, x)
        return F.linear(self._drop_components(h, -1), self.second, self.bias)

    def config(self) -> dict[str, Any]:
        """``LowRankLinear``'s config, with ``siblings`` and ``position``."""
        return {**super().config(), "siblings": self.siblings, "position": self.position}


def link_shared_inputs(model: nn.Module) -> list[list[str]]:
    """Link the :class:`FusedLowRankLinear` layers of ``model`` to their siblings, so each group runs one GEMM.

    A group is linked when every sibling it names is a ``FusedLowRankLinear`` of
    the same parent, naming the same siblings; :func:`lowrank.load` calls this.

    Parameters
    ----------
    model : nn.Module
        Modified in place.

    Returns
    -------
    list of list of str
        The full names of each group's layers.

    """
    groups: dict[tuple[str, tuple[str, ...]], dict[int, tuple[str, FusedLowRankLinear]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FusedLowRankLinear):
            parent, _, leaf = name.rpartition(".")
            if module.siblings[module.position] == leaf:
                groups.setdefault((parent, tuple(module.siblings)), {})[module.position] = (name, module)
    linked = []
    for (_, siblings), members in groups.items():
        if len(members) == len(siblings):
            ordered = [members[i][1] for i in range(len(siblings))]
            shared = SharedInput(ordered)
            for member in ordered:
                member.shared_input = shared
            linked.append([members[i][0] for i in range(len(siblings))])
    return linked


def _remember_input(calls: dict[str, torch.Tensor], name: str, _: nn.Module, inputs: tuple[Any, ...]) -> None:
    """A forward pre-hook: keep the first input of layer ``name``'s first call."""
    calls.setdefault(name, inputs[0])


def fuse_shared_inputs(model: nn.Module, *args: Any, **kwargs: Any) -> list[list[str]]:
    """Fuse the first factors of the sibling low-rank layers that read the same input.

    ``model(*args, **kwargs)`` is run once, without gradients, to see which
    :class:`~lowrank.nn.LowRankLinear` layers of one parent module are called on
    the very same input tensor (query, key and value; gate and up); each such
    group is replaced by :class:`FusedLowRankLinear` layers holding the same
    parameters, linked to run their first factors as one GEMM. The outputs do
    not change. The model saves and loads (:func:`lowrank.save`,
    :func:`lowrank.load`) like any other.

    Parameters
    ----------
    model : nn.Module
        A model with ``LowRankLinear`` layers (from :func:`lowrank.compress`),
        modified in place.
    *args, **kwargs
        An example input of the model (a tokenized batch for a Hugging Face model).

    Returns
    -------
    list of list of str
        The names of the layers of each group fused (empty if none share an input).

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn import LowRankLinear, fuse_shared_inputs
    >>> class Attention(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.q, self.k = (LowRankLinear.from_dense(torch.nn.Linear(16, 16), 4) for _ in range(2))
    ...     def forward(self, x):
    ...         return self.q(x) * self.k(x)
    >>> fuse_shared_inputs(Attention(), torch.randn(3, 16))
    [['q', 'k']]

    """
    calls: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module) is LowRankLinear:
            handles.append(module.register_forward_pre_hook(partial(_remember_input, calls, name)))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    by_input: dict[tuple[str, int], list[str]] = {}
    for name, x in calls.items():
        by_input.setdefault((name.rpartition(".")[0], id(x)), []).append(name)
    groups = [names for names in by_input.values() if len(names) > 1]
    replacements = []
    for names in groups:
        siblings = [name.rpartition(".")[2] for name in names]
        replacements += [(name, FusedLowRankLinear.from_low_rank(model.get_submodule(name), siblings, i))
                         for i, name in enumerate(names)]
    swap_modules(model, replacements)
    link_shared_inputs(model)
    return groups
