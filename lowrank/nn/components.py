"""Rank components: the slices of a factorized module's parameters that one rank index owns.

A module of rank ``r`` is a sum of ``r`` components (``LowRankLinear``'s
``second[:, i] first[i, :]``, a CP term, one channel of a Tucker-2 core and
its factor). Training methods that act on whole components (the rank
scheduler masks them, group lasso penalises them, rank dropout drops them)
read them here, through each module's
:meth:`~lowrank.nn.base.FactorizedModule.rank_axes`, instead of knowing every
module's layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowrank.checks import check_bool, check_fraction

if TYPE_CHECKING:
    from lowrank.nn.base import FactorizedModule


@dataclass(frozen=True)
class RankAxis:
    """One rank of a factorized module and the parameter slices its components own.

    Attributes
    ----------
    name : str
        The rank's name (``"rank"``, or ``"r_out"`` / ``"r_in"`` of a Tucker-2 convolution).
    size : int
        The number of components (per group for a grouped convolution).
    slices : tuple of (str, int, bool)
        ``(parameter name, dim, grouped)``: component ``i`` owns index ``i``
        of ``dim`` of that parameter, or, when ``grouped``, indices
        ``g * size + i`` for every group ``g`` (a grouped convolution stacks
        its groups' components along that dim).
    config_key : str
        The key of :meth:`~lowrank.nn.base.FactorizedModule.config` holding this rank.
    config_entry : int or None
        Its position in a list-valued key (Tucker-2's ``ranks``), None when the key holds an int.

    """

    name: str
    size: int
    slices: tuple[tuple[str, int, bool], ...]
    config_key: str = "rank"
    config_entry: int | None = None

    def indices(self, components: torch.Tensor, groups: int, grouped: bool) -> torch.Tensor:
        """The indices along a slice's dim that ``components`` own (every group's when ``grouped``)."""
        if not grouped or groups == 1:
            return components
        return (torch.arange(groups, device=components.device)[:, None] * self.size + components).flatten()


def module_groups(module: nn.Module) -> int:
    """The groups of a factorized convolution, 1 for any other module."""
    return getattr(module, "groups", 1)


def component_sums(module: FactorizedModule, axis: RankAxis, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per component of ``axis``, the mean of ``values`` over each slice it owns, summed over its slices.

    ``values`` maps parameter names to tensors of the parameters' shapes
    (squared entries, sensitivity scores); a parameter missing from it adds nothing.
    This is AdaLoRA's component score when ``values`` holds per-entry scores.
    """
    groups = module_groups(module)
    total = None
    for name, dim, grouped in axis.slices:
        if name not in values:
            continue
        value = values[name].movedim(dim, 0).flatten(1).mean(dim=1)
        if grouped and groups > 1:
            value = value.view(groups, axis.size).mean(dim=0)
        total = value if total is None else total + value
    if total is None:
        raise ValueError(f"none of the parameters of axis {axis.name!r} of {type(module).__name__} is in values")
    return total


def component_squares(module: FactorizedModule, axis: RankAxis) -> torch.Tensor:
    """The squared Euclidean norm of each component of ``axis``: all its entries, over every slice it owns.

    Differentiable (group lasso's groups are these components).
    """
    groups = module_groups(module)
    squares = None
    for name, dim, grouped in axis.slices:
        part = module.get_parameter(name).movedim(dim, 0).flatten(1).square().sum(dim=1)
        if grouped and groups > 1:
            part = part.view(groups, axis.size).sum(dim=0)
        squares = part if squares is None else squares + part
    return squares


@torch.no_grad()
def zero_components(module: FactorizedModule, axis: RankAxis, components: torch.Tensor) -> None:
    """Set every entry that ``components`` (indices of ``axis``) own to zero, in place."""
    if components.numel() == 0:
        return
    groups = module_groups(module)
    for name, dim, grouped in axis.slices:
        parameter = module.get_parameter(name)
        parameter.index_fill_(dim, axis.indices(components.to(parameter.device), groups, grouped), 0)


def active_params(module: FactorizedModule, sizes: Mapping[str, int]) -> int:
    """The parameters ``module`` would hold with ``sizes[axis]`` components on each rank axis.

    Each parameter shrinks along every dim a rank axis slices (Tucker-2's core
    along both); the bias and any parameter no axis slices keep their size.
    Only the module's ``budget_parameters()`` count (an adapter layer's own,
    not its frozen base layer's).
    """
    names = module.budget_parameters()
    scale = dict.fromkeys(names, 1.0)
    for axis in module.rank_axes():
        for name, _, _ in axis.slices:
            scale[name] *= sizes.get(axis.name, axis.size) / axis.size
    return sum(round(module.get_parameter(name).numel() * scale[name]) for name in names)


@torch.no_grad()
def keep_components(module: FactorizedModule, keep: Mapping[str, torch.Tensor]) -> FactorizedModule:
    """A new, smaller module of ``module``'s class holding only the components in ``keep``.

    Parameters
    ----------
    module : FactorizedModule
        A module with rank axes; it is not modified.
    keep : mapping of str to LongTensor
        Per axis name, the indices of the components kept (at least one); axes
        not named keep all their components.

    Returns
    -------
    FactorizedModule
        On ``module``'s device and in its dtype, with its ``requires_grad``
        flags, rank dropout and training mode; its forward equals
        ``module``'s when the dropped components are zero. A module with its
        own ``keep_components`` method (the LoRA and FLoRA layers of
        :mod:`lowrank.adapters`) builds the smaller module itself.

    """
    if hasattr(module, "keep_components"):
        return module.keep_components(keep)
    axes = {axis.name: axis for axis in module.rank_axes()}
    unknown = sorted(set(keep) - set(axes))
    if unknown:
        raise ValueError(f"{type(module).__name__} has rank axes {sorted(axes)}; got {unknown}")
    config = module.config()
    tensors = dict(module.named_parameters())
    groups = module_groups(module)
    for name, components in keep.items():
        axis = axes[name]
        components = torch.as_tensor(components, dtype=torch.long).flatten()
        if components.numel() < 1:
            raise ValueError(f"keep at least one component of axis {name!r} of {type(module).__name__}")
        if axis.config_entry is None:
            config[axis.config_key] = int(components.numel())
        else:
            config[axis.config_key] = list(config[axis.config_key])
            config[axis.config_key][axis.config_entry] = int(components.numel())
        for param, dim, grouped in axis.slices:
            index = axis.indices(components.to(tensors[param].device), groups, grouped)
            tensors[param] = tensors[param].index_select(dim, index)
    first = next(iter(tensors.values()))
    smaller = type(module)(**config, device=first.device, dtype=first.dtype)
    smaller.load_state_dict({**module.state_dict(), **tensors}, strict=True)
    for name, parameter in smaller.named_parameters():
        parameter.requires_grad_(module.get_parameter(name).requires_grad)
    smaller.rank_dropout = module.rank_dropout
    smaller.train(module.training)
    return smaller


class RankDropout(nn.Module):
    """Dropout of whole rank components during training (Tensor Dropout; Maestro's ordered dropout).

    A factorized module with this option multiplies its rank bottleneck by a
    mask drawn once per forward pass in training mode; in evaluation mode it
    does nothing.

    Parameters
    ----------
    p : float
        Without ``ordered``, the probability that each component is dropped (the
        others are scaled by ``1 / (1 - p)``, as ``nn.Dropout`` does); with
        ``ordered``, the probability that a forward pass keeps only the leading
        ``b`` components, ``b`` uniform in ``1 .. rank`` (no rescaling), which
        orders the components by importance.
    ordered : bool
        Drop trailing components only.

    """

    def __init__(self, p: float, ordered: bool = False) -> None:
        super().__init__()
        self.p = check_fraction(p, "p", low_closed=True, high_closed=False)
        self.ordered = check_bool(ordered, "ordered")

    def forward(self, h: torch.Tensor, dim: int, groups: int = 1) -> torch.Tensor:
        """``h`` times a component mask along ``dim`` (``groups`` copies of the mask side by side)."""
        if not self.training or self.p == 0:
            return h
        size = h.shape[dim] // groups
        if self.ordered:
            keep = size
            if float(torch.rand(())) < self.p:
                keep = int(torch.randint(1, size + 1, ()))
            mask = (torch.arange(size, device=h.device) < keep).to(h.dtype)
        else:
            mask = (torch.rand(size, device=h.device) >= self.p).to(h.dtype) / (1 - self.p)
        shape = [1] * h.ndim
        shape[dim] = h.shape[dim]
        return h * mask.repeat(groups).view(shape)

    def extra_repr(self) -> str:
        """The probability and whether dropout is ordered."""
        return f"p={self.p}, ordered={self.ordered}"
