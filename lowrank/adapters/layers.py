"""Adapter layers: a frozen base layer plus a trainable low-rank update, mergeable into the base and back.

One primitive per adapter, the weight delta :meth:`AdapterLayer.delta_weight`
(``ΔW`` in the base layer's own weight layout, scaled), and the adapter's
contribution to the output :meth:`AdapterLayer.adapter_forward` (computed with
the factors); :class:`AdapterLayer` writes merge, safe merge, unmerge,
disabling and unloading once on top of them, as PEFT's ``LoraLayer`` does with
``get_delta_weight``.

=====================  ==========================================================================
class                  adapts
=====================  ==========================================================================
:class:`LoRALinear`    ``nn.Linear``, Hugging Face ``Conv1D``, the linear modules of :mod:`lowrank.nn`
:class:`LoRAEmbedding` ``nn.Embedding``, :class:`~lowrank.nn.LowRankEmbedding`
:class:`LoRAConv`      ``nn.Conv1d/2d/3d`` (every option) and the convolutions of :mod:`lowrank.nn`
:class:`FLoRALinear`   as :class:`LoRALinear`
:class:`FLoRAConv`     as :class:`LoRAConv`
=====================  ==========================================================================

On a dense layer merging writes ``W + ΔW`` into the base weight; on a
:class:`~lowrank.nn.LowRankLinear` a linear adapter merges exactly into a
wider ``LowRankLinear``; on the other factorized modules the adapter trains
on top (its shape is the module's dense shape) but cannot merge.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lowrank.adapters.config import FLoRA, LoRA
from lowrank.checks import check_bool, check_ranks
from lowrank.decompose import svd
from lowrank.nn.base import FactorizedModule, UnsupportedLayerError
from lowrank.nn.components import RankAxis
from lowrank.nn.conv.base import CONV_FUNCTIONS, CONV_TYPES, FactorizedConv, padding_amounts
from lowrank.nn.dense import is_hf_conv1d, layer_kind
from lowrank.nn.linear import LowRankLinear

HALF_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- what a layer is


def layer_layout(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"`` or ``"embedding"``: how ``module`` (dense or factorized) applies its weight; or None.

    A factorized module has the layout of the dense layer it replaced, read from
    the attributes it shares with it (``in_features``/``out_features``, the
    convolution hyper-parameters, ``num_embeddings``/``embedding_dim``).
    """
    if isinstance(module, FactorizedModule):
        kind = module.kind
        if kind == "linear" and hasattr(module, "in_features") and hasattr(module, "out_features"):
            return "linear"
        if kind in ("conv", "pointwise") and isinstance(module, FactorizedConv):
            return "conv"
        if kind == "embedding" and hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
            return "embedding"
        return None
    kind = layer_kind(module)
    return "conv" if kind == "pointwise" else kind


def dense_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of ``module``'s (dense) weight in its own layout: ``(in, out)`` for a Hugging Face ``Conv1D``."""
    if not isinstance(module, FactorizedModule):
        return tuple(module.weight.shape)
    layout = layer_layout(module)
    if layout == "linear":
        transposed = getattr(module, "dense_type", "Linear") == "Conv1D"
        return (module.in_features, module.out_features) if transposed else (module.out_features, module.in_features)
    if layout == "embedding":
        return (module.num_embeddings, module.embedding_dim)
    return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)


def describe_layer(module: nn.Module) -> str:
    """``"a Conv2d with weight shape (8, 2, 3, 3) and groups=2"``, ``"a LowRankLinear with dense shape (32, 64)"``."""
    shape = dense_shape(module)
    name = type(module).__name__
    article = "an" if name[0] in "AEIOU" else "a"
    text = f"{article} {name} with {'dense' if isinstance(module, FactorizedModule) else 'weight'} shape {shape}"
    groups = getattr(module, "groups", 1)
    return text + (f" and groups={groups}" if layer_layout(module) == "conv" and groups > 1 else "")


def _reference_parameter(module: nn.Module) -> torch.Tensor | None:
    """The base layer's first floating-point parameter, whose device and dtype the adapter follows."""
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The adapter's dtype for a base layer in ``dtype``: float32 for half precision (as PEFT), else ``dtype``."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def conv_apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """``x`` convolved by ``weight`` with the hyper-parameters of ``module`` (a dense or factorized convolution).

    Stride, padding (ints, ``"same"``, ``"valid"``), dilation, groups and the
    padding mode are those of ``module``, applied as ``nn.ConvNd`` applies them.
    """
    n = len(module.kernel_size)
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, padding_amounts(module), mode=module.padding_mode)
        padding = (0,) * n
    return CONV_FUNCTIONS[n](x, weight, bias, module.stride, padding, module.dilation, module.groups)


# ----------------------------------------------------------------------------- the base class


class AdapterLayer(nn.Module):
    """A frozen base layer and a trainable update; merge, unmerge, disabling and the forward written once.

    Subclasses define the update by two methods: :meth:`delta_weight`, the
    scaled ``ΔW`` in the base layer's own weight layout, and
    :meth:`adapter_forward`, the update's contribution to the output computed
    with the factors. The forward is ``base_layer(x) + adapter_forward(x)``
    (the sum in the base output's dtype), or ``base_layer(x)`` alone when the
    adapter is merged or :attr:`disabled`.

    Merging writes ``W + ΔW`` into the base weight (the sum formed in the
    wider of the two dtypes and rounded once) and **keeps the pre-merge
    weight**, a copy of the base weight held while merged, so that
    :meth:`unmerge` restores it bit for bit (PEFT subtracts ``ΔW`` instead,
    which rounding makes inexact). On a :class:`~lowrank.nn.LowRankLinear` a
    linear adapter merges into a wider ``LowRankLinear`` that replaces
    :attr:`base_layer` (the original object comes back on unmerge); other
    factorized modules cannot merge.

    Parameters
    ----------
    base_layer : nn.Module
        The layer adapted; its parameters are frozen (``requires_grad=False``).
    config : LoRA or FLoRA
        The adapter's settings.
    name : str
        The layer's name in its model, for messages.

    Attributes
    ----------
    base_layer : nn.Module
        The frozen layer (merged: holding ``W + ΔW``).
    config : LoRA or FLoRA
    layer_name : str
    merged : bool
        Whether ``ΔW`` is in the base layer.
    disabled : bool
        When True (and unmerged) the forward is the base layer's alone; see
        :func:`lowrank.adapters.disabled`.
    scaling : float
        The scale ``s`` of the update.

    """

    def __init__(self, base_layer: nn.Module, config: LoRA | FLoRA, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.layer_name = name
        self.scaling = config.scaling
        self.merged = False
        self.disabled = False
        self.register_buffer("_pre_merge_weight", None, persistent=False)
        self._set_unmerged(None)
        base_layer.requires_grad_(False)
        reference = _reference_parameter(base_layer)
        self._base_dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        self._device = reference.device if reference is not None else torch.device("cpu")

    # -- what subclasses define

    def delta_weight(self) -> torch.Tensor:
        """The scaled update ``ΔW`` in the base layer's own weight layout, in the adapter's dtype (differentiable)."""
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update's contribution to the output for input ``x`` (computed with the factors)."""
        raise NotImplementedError

    def merged_module(self) -> nn.Module:
        """The factorized base layer with the update folded in (a TypeError where it cannot be)."""
        raise TypeError(
            f"{type(self).__name__} {self._label()}cannot merge into {describe_layer(self.base_layer)}: only dense "
            "layers and LowRankLinear take a merged adapter (the adapter still trains on top; convert the module "
            "with .to_dense() and adapt that to merge)"
        )

    def prepare_base(self) -> None:
        """Change the frozen base as the adapter's initialisation requires (nothing, except for PiSSA)."""

    # -- written once

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (``W + ΔW`` while merged), for code that reads ``layer.weight``."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return getattr(self.base_layer, "bias", None)

    @property
    def mergeable(self) -> bool:
        """Whether :meth:`merge` can fold the update into the base layer."""
        return not isinstance(self.base_layer, FactorizedModule) or type(self.base_layer) is LowRankLinear

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's own parameters (everything but the base layer's)."""
        return [p for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    # -- rank components (lowrank.train.RankScheduler)

    def rank_axes(self) -> list[RankAxis]:
        """The adapter's ranks and the slices of its factors each rank component owns.

        See :mod:`lowrank.nn.components`. Empty here; the LoRA and FLoRA layers list theirs.
        """
        return []

    def budget_parameters(self) -> list[str]:
        """The names of the parameters a parameter budget counts: the adapter's own, not the frozen base's."""
        return [name for name, _ in self.named_parameters() if not name.startswith("base_layer.")]

    def _resized(self, sizes: Mapping[str, int]) -> None:
        """Update the attributes recording the ranks after :meth:`keep_components` sliced the factors."""
        raise NotImplementedError

    @torch.no_grad()
    def keep_components(self, keep: Mapping[str, torch.Tensor]) -> AdapterLayer:
        """A new adapter layer holding only the components in ``keep`` (per axis name, indices kept); self is unchanged.

        The new layer shares the (frozen) base layer and keeps :attr:`scaling`
        as it is (not ``alpha / new_rank``), so its forward equals this
        layer's when the dropped components are zero; its config still names
        the rank it was made with, and :func:`lowrank.adapters.save` records
        the ranks its tensors have (PEFT's format: ``rank_pattern`` and
        ``alpha_pattern``). Flags and training mode are kept.
        """
        axes = {axis.name: axis for axis in self.rank_axes()}
        unknown = sorted(set(keep) - set(axes))
        if not axes or unknown:
            raise ValueError(f"{type(self).__name__} has rank axes {sorted(axes)}; got {sorted(keep)}")
        if self.merged:
            raise RuntimeError(f"the adapter {self._label()}is merged: unmerge it before removing components")
        groups = getattr(self, "groups", 1)
        tensors = {name: self.get_parameter(name) for axis in axes.values() for name, _, _ in axis.slices}
        sliced = dict(tensors)
        sizes = {}
        for name, components in keep.items():
            axis = axes[name]
            components = torch.as_tensor(components, dtype=torch.long).flatten()
            if components.numel() < 1:
                raise ValueError(f"keep at least one component of axis {name!r} of {type(self).__name__}")
            sizes[name] = int(components.numel())
            for param, dim, grouped in axis.slices:
                index = axis.indices(components.to(sliced[param].device), groups, grouped)
                sliced[param] = sliced[param].index_select(dim, index)
        smaller = copy.copy(self)
        smaller._parameters = dict(self._parameters)
        smaller._buffers = dict(self._buffers)
        smaller._non_persistent_buffers_set = set(self._non_persistent_buffers_set)
        smaller._modules = {name: module if name == "base_layer" else copy.deepcopy(module)
                            for name, module in self._modules.items()}
        for name, tensor in sliced.items():
            owner, _, leaf = name.rpartition(".")
            target = smaller.get_submodule(owner) if owner else smaller
            setattr(target, leaf, nn.Parameter(tensor.detach().clone(), requires_grad=tensors[name].requires_grad))
        smaller._resized(sizes)
        return smaller

    def _set_unmerged(self, module: nn.Module | None) -> None:
        """Keep the factorized base a merge replaced, unregistered (it is no submodule while merged)."""
        object.__setattr__(self, "_unmerged_module", module)

    def _label(self) -> str:
        """``"of layer 'name' "`` (empty without a name), for messages."""
        return f"of layer {self.layer_name!r} " if self.layer_name else ""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_layer(x) + adapter_forward(x)``, or the base alone when merged or disabled."""
        if self.merged or self.disabled:
            if self.merged and self.disabled:
                raise RuntimeError(f"the adapter {self._label()}is merged: unmerge it before disabling it "
                                   "(lowrank.adapters.disabled does)")
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The forward with the (unmerged) adapter: ``base_layer(x) + adapter_forward(x)``."""
        result = self.base_layer(x, *args, **kwargs)
        return (result + self.adapter_forward(x)).to(result.dtype)

    def merge(self, safe: bool = False) -> None:
        """Fold the update into the base layer (nothing if merged already).

        Parameters
        ----------
        safe : bool
            Check the merged weights first and raise a ValueError, leaving the
            layer untouched, if any is not finite.

        Raises
        ------
        TypeError
            If the base layer is a factorized module other than ``LowRankLinear``.
        RuntimeError
            If the adapter is disabled.

        """
        check_bool(safe, "safe")
        if self.merged:
            return
        if self.disabled:
            raise RuntimeError(f"the adapter {self._label()}is disabled: enable it before merging")
        with torch.no_grad():
            if isinstance(self.base_layer, FactorizedModule):
                module = self.merged_module()
                if safe and not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                    raise ValueError(self._non_finite_message())
                module.requires_grad_(False)
                self._set_unmerged(self.base_layer)
                self.base_layer = module
            else:
                weight = self.base_layer.weight
                delta = self.delta_weight()
                wide = torch.promote_types(weight.dtype, delta.dtype)
                merged = (weight.to(wide) + delta.to(wide)).to(weight.dtype)
                if safe and not bool(torch.isfinite(merged).all()):
                    raise ValueError(self._non_finite_message())
                self._pre_merge_weight = weight.detach().clone()
                weight.copy_(merged)
        self.merged = True

    def _non_finite_message(self) -> str:
        """The safe-merge refusal."""
        return (f"merging the {type(self.config).__name__} adapter {self._label()}into "
                f"{describe_layer(self.base_layer)} gives non-finite weights; the layer is left unmerged")

    def unmerge(self) -> None:
        """Restore the base layer exactly as it was before :meth:`merge` (nothing if not merged)."""
        if not self.merged:
            return
        with torch.no_grad():
            if self._unmerged_module is not None:
                original, merged = self._unmerged_module, _reference_parameter(self.base_layer)
                reference = _reference_parameter(original)
                if merged is not None and reference is not None and (
                        reference.device, reference.dtype) != (merged.device, merged.dtype):
                    original.to(merged.device, merged.dtype)  # the model was moved while merged
                self.base_layer = original
                self._set_unmerged(None)
            else:
                self.base_layer.weight.copy_(self._pre_merge_weight)
                self._pre_merge_weight = None
        self.merged = False

    def unload(self) -> nn.Module:
        """The base layer, to put in the adapter's place (the merged one if merged); the adapter forgets it."""
        self._pre_merge_weight = None
        self._set_unmerged(None)
        return self.base_layer

    def _to_adapter(self, module: nn.Module) -> nn.Module:
        """``module`` (built on the CPU in float32) on the base's device, rounded to its dtype as PEFT does.

        PEFT creates the factors in float32 on the CPU, moves them to the base
        layer's device and dtype, and then upcasts half-precision ones to
        float32; doing the same gives the same numbers for the same seed.
        """
        module = module.to(self._device, self._base_dtype)
        return module.to(adapter_dtype(self._base_dtype))

    def extra_repr(self) -> str:
        """Scaling and state."""
        return f"scaling={self.scaling:g}, merged={self.merged}, disabled={self.disabled}"


# ----------------------------------------------------------------------------- LoRA


def _check_rank(rank: int, bound: int, name: str, module: nn.Module, per_group: bool = False) -> int:
    """``rank`` if it is at most ``bound``; the error names the layer and its shape."""
    where = f"layer {name!r} ({describe_layer(module)})" if name else describe_layer(module)
    (rank,) = check_ranks(rank, [bound], name="LoRA rank" + (" (per group)" if per_group else ""), what=[where])
    return rank


def _pissa_factors(matrix: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``scaling · B A`` the top-``rank`` part of ``matrix``, ``sqrt(S / scaling)`` on each side."""
    factorization = svd(matrix.to(torch.promote_types(matrix.dtype, torch.float32)), rank)
    root = (factorization.s / scaling).sqrt()
    return factorization.u * root, root[:, None] * factorization.vh


class LoRALayer(AdapterLayer):
    """What every LoRA layer shares: rank, scaling, dropout, the init and PiSSA's residual.

    The factors are created as PEFT creates them (``lora_A`` and ``lora_B``
    as modules with their default initialisation, then ``lora_A``
    re-initialised and ``lora_B`` zeroed), in float32 on the CPU, then moved
    to the base layer's device and dtype (and kept in float32 for a
    half-precision base, as PEFT's ``autocast_adapter_dtype``): after the same
    ``torch.manual_seed`` the factors equal PEFT's.

    With ``init="pissa"`` the constructor computes the factors from the base
    weight; :meth:`prepare_base` writes the residual ``W - ΔW`` into the
    frozen base (the constructor calls it unless ``prepare=False``, which
    :func:`lowrank.adapters.add` passes so that nothing changes before every
    layer is built).
    """

    def __init__(self, base_layer: nn.Module, config: LoRA, name: str = "") -> None:
        if not isinstance(config, LoRA):
            raise TypeError(f"config must be a lowrank.adapters.LoRA, got {type(config).__name__}")
        super().__init__(base_layer, config, name)
        self.rank = config.rank
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self._pissa_pending = False
        if config.init == "pissa" and isinstance(base_layer, FactorizedModule):
            raise UnsupportedLayerError(
                f"init='pissa' {self._label()}needs a dense weight to split, not {describe_layer(base_layer)}")

    def _finish_init(self, prepare: bool) -> None:
        """Apply PiSSA's factors (subclasses set them in ``_pissa``), and its residual unless ``prepare`` is False."""
        if self.config.init == "pissa":
            with torch.no_grad():
                self._pissa()
            self._pissa_pending = True
            if prepare:
                self.prepare_base()

    def _init_factors(self, lora_A: nn.Module, lora_B: nn.Module, prepare: bool) -> None:  # noqa: N803
        """Initialise ``lora_A`` / ``lora_B`` as PEFT does (B zero), keep them as the adapter, apply PiSSA."""
        if self.config.init == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / self.rank)
        else:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)
        self.lora_A = self._to_adapter(lora_A)
        self.lora_B = self._to_adapter(lora_B)
        self._finish_init(prepare)

    def _pissa(self) -> None:
        """Set the factors from the base weight's top singular triplets."""
        raise NotImplementedError

    def prepare_base(self) -> None:
        """Write PiSSA's residual ``W - ΔW`` into the frozen base weight, once (nothing for the other inits)."""
        if not self._pissa_pending:
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            wide = torch.promote_types(weight.dtype, torch.float32)
            weight.copy_((weight.to(wide) - self.delta_weight().to(wide)).to(weight.dtype))
        self._pissa_pending = False

    def extra_repr(self) -> str:
        """Rank, scaling and state."""
        return f"rank={self.rank}, " + super().extra_repr()


class _LinearMerge:
    """Merging a linear update ``ΔW = left @ right`` into a ``LowRankLinear``: ``[second, left] @ [first; right]``."""

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)``, ``(out, k)`` and ``(k, in)``, with ``left @ right`` the scaled ``(out, in)`` update."""
        raise NotImplementedError

    def merged_module(self) -> nn.Module:
        """A ``LowRankLinear`` of rank ``rank + k`` computing the base layer plus the update, exactly."""
        base = self.base_layer
        if type(base) is not LowRankLinear:
            return AdapterLayer.merged_module(self)
        left, right = self.delta_factors()
        dtype = base.first.dtype
        return LowRankLinear.from_factors(
            torch.cat([base.first.detach(), right.detach().to(dtype)]),
            torch.cat([base.second.detach(), left.detach().to(dtype)], dim=1),
            None if base.bias is None else base.bias.detach(),
            base.dense_type,
        )


class LoRALinear(_LinearMerge, LoRALayer):
    """LoRA on a linear layer: ``y = base(x) + s · B(A(dropout(x)))``.

    ``lora_A`` is an ``nn.Linear(in, rank)`` and ``lora_B`` an
    ``nn.Linear(rank, out)`` (no biases), PEFT's modules and key names. The
    base is an ``nn.Linear``, a Hugging Face ``Conv1D`` (whose ``ΔW`` is
    transposed, its layout ``(in, out)``) or a linear module of
    :mod:`lowrank.nn`. On a :class:`~lowrank.nn.LowRankLinear` merging
    replaces the base by ``LowRankLinear.from_factors([first; A], [second,
    s·B])`` of rank ``rank + r``, exact; on the others (``TTLinear``,
    ``TNLinear``, ``DLRTLinear``) merging is a TypeError.

    Parameters
    ----------
    base_layer : nn.Module
        The layer adapted.
    config : LoRA
        ``rank`` at most ``min(out, in)``.
    name : str
        The layer's name, for messages.
    prepare : bool
        Write PiSSA's residual into the base now (see :class:`LoRALayer`).

    Examples
    --------
    >>> import torch
    >>> from lowrank.adapters import LoRA, LoRALinear
    >>> layer = LoRALinear(torch.nn.Linear(16, 8), LoRA(rank=4, alpha=8))
    >>> layer.lora_A.weight.shape, layer.lora_B.weight.shape, layer.delta_weight().abs().max().item()
    (torch.Size([4, 16]), torch.Size([8, 4]), 0.0)

    """

    def __init__(self, base_layer: nn.Module, config: LoRA, name: str = "", *, prepare: bool = True) -> None:
        super().__init__(base_layer, config, name)
        shape = dense_shape(base_layer)
        self.transposed = is_hf_conv1d(base_layer) or getattr(base_layer, "dense_type", None) == "Conv1D"
        self.in_features, self.out_features = shape if self.transposed else shape[::-1]
        _check_rank(self.rank, min(shape), name, base_layer)
        lora_A = nn.Linear(self.in_features, self.rank, bias=False)  # noqa: N806 (PEFT's names)
        lora_B = nn.Linear(self.rank, self.out_features, bias=False)  # noqa: N806
        self._init_factors(lora_A, lora_B, prepare)

    def _pissa(self) -> None:
        weight = self.base_layer.weight
        b, a = _pissa_factors(weight.T if self.transposed else weight, self.rank, self.scaling)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)

    def rank_axes(self) -> list[RankAxis]:
        """Component ``i``: row ``i`` of ``A`` and column ``i`` of ``B``."""
        return [RankAxis("rank", self.rank, (("lora_A.weight", 0, False), ("lora_B.weight", 1, False)))]

    def _resized(self, sizes: Mapping[str, int]) -> None:
        self.rank = sizes.get("rank", self.rank)
        self.lora_A.out_features = self.lora_B.in_features = self.rank

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s · B, A)``."""
        return self.lora_B.weight * self.scaling, self.lora_A.weight

    def delta_weight(self) -> torch.Tensor:
        """``s · B A``, transposed for a ``Conv1D``."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.transposed else delta

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B(A(dropout(x)))``, never forming ``ΔW``."""
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class LoRAEmbedding(LoRALayer):
    """LoRA on an embedding table: ``y = base(i) + s · (A^T[i]) B^T``, ``ΔW = s · (B A)^T`` ``(num, dim)``.

    As PEFT: ``lora_embedding_A`` ``(rank, num_embeddings)`` starts at zero
    and ``lora_embedding_B`` ``(embedding_dim, rank)`` standard normal (the
    ``"gaussian"`` init is the same for embeddings). The lookup into ``A^T``
    uses the base's ``padding_idx`` and ``scale_grad_by_freq``. Embeddings with
    ``max_norm`` (which renormalise their table in place) are refused.

    Examples
    --------
    >>> import torch
    >>> from lowrank.adapters import LoRA, LoRAEmbedding
    >>> layer = LoRAEmbedding(torch.nn.Embedding(100, 16), LoRA(rank=4))
    >>> layer.lora_embedding_A.shape, layer(torch.tensor([[1, 2, 3]])).shape
    (torch.Size([4, 100]), torch.Size([1, 3, 16]))

    """

    def __init__(self, base_layer: nn.Module, config: LoRA, name: str = "", *, prepare: bool = True) -> None:
        super().__init__(base_layer, config, name)
        if getattr(base_layer, "max_norm", None) is not None:
            raise UnsupportedLayerError(
                f"LoRA {self._label()}cannot adapt an embedding with max_norm={base_layer.max_norm} "
                "(it renormalises its table in place during the forward)")
        self.num_embeddings, self.embedding_dim = dense_shape(base_layer)
        _check_rank(self.rank, min(self.num_embeddings, self.embedding_dim), name, base_layer)
        self.padding_idx = base_layer.padding_idx
        self.scale_grad_by_freq = base_layer.scale_grad_by_freq
        a = torch.randn(self.rank, self.num_embeddings)  # PEFT draws both before its init: same seed, same numbers
        b = torch.randn(self.embedding_dim, self.rank)
        nn.init.zeros_(a)
        nn.init.normal_(b)
        dtype = adapter_dtype(self._base_dtype)
        self.lora_embedding_A = nn.Parameter(a.to(self._device, self._base_dtype).to(dtype))
        self.lora_embedding_B = nn.Parameter(b.to(self._device, self._base_dtype).to(dtype))
        self._finish_init(prepare)

    def rank_axes(self) -> list[RankAxis]:
        """Component ``i``: row ``i`` of ``A`` and column ``i`` of ``B``."""
        return [RankAxis("rank", self.rank, (("lora_embedding_A", 0, False), ("lora_embedding_B", 1, False)))]

    def _resized(self, sizes: Mapping[str, int]) -> None:
        self.rank = sizes.get("rank", self.rank)

    def _pissa(self) -> None:
        b, a = _pissa_factors(self.base_layer.weight.T, self.rank, self.scaling)
        self.lora_embedding_A.copy_(a)
        self.lora_embedding_B.copy_(b)

    def delta_weight(self) -> torch.Tensor:
        """``s · (B A)^T``, ``(num_embeddings, embedding_dim)``."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``s · (A^T[x]) B^T``: a lookup into the ``rank``-wide table, then the projection."""
        rows = F.embedding(x, self.lora_embedding_A.T, self.padding_idx, None, 2.0, self.scale_grad_by_freq)
        return (rows @ self.lora_embedding_B.T) * self.scaling


class LoRAConv(LoRALayer):
    """LoRA on a convolution, every option kept, and exactly mergeable for grouped and depthwise ones.

    ``lora_A`` is a convolution with the base's kernel, stride, padding
    (ints, ``"same"``, ``"valid"``), dilation, padding mode and ``groups``,
    mapping ``in`` channels to ``groups · rank``; ``lora_B`` a ``1 × … × 1``
    convolution with ``groups`` groups from ``groups · rank`` to ``out``
    channels. For group ``g``, ``ΔW_g = s · B_g A_g``: the update has the
    layout of the grouped weight ``(out, in / groups, *kernel)``, so merging is
    exact for grouped and depthwise convolutions (which PEFT cannot merge) and
    ``rank`` is per group, at most ``min(out / groups, in / groups · prod(kernel))``.
    Without groups the modules are PEFT's (same shapes, names and seeded init).

    Examples
    --------
    >>> import torch
    >>> from lowrank.adapters import LoRA, LoRAConv
    >>> conv = torch.nn.Conv2d(8, 16, 3, padding="same", dilation=2, groups=2, padding_mode="reflect")
    >>> layer = LoRAConv(conv, LoRA(rank=2))
    >>> layer.lora_A, layer.delta_weight().shape
    (Conv2d(8, 4, kernel_size=(3, 3), stride=(1, 1), padding=same, dilation=(2, 2), groups=2, bias=False, padding_mode=reflect), torch.Size([16, 4, 3, 3]))

    """  # noqa: E501

    def __init__(self, base_layer: nn.Module, config: LoRA, name: str = "", *, prepare: bool = True) -> None:
        super().__init__(base_layer, config, name)
        b = base_layer
        self.in_channels, self.out_channels, self.groups = b.in_channels, b.out_channels, b.groups
        self.kernel_size = tuple(b.kernel_size)
        g, r = self.groups, self.rank
        _check_rank(r, min(b.out_channels // g, b.in_channels // g * math.prod(self.kernel_size)), name, b, g > 1)
        conv = CONV_TYPES[len(self.kernel_size)]
        lora_A = conv(b.in_channels, g * r, self.kernel_size, b.stride, b.padding, b.dilation,  # noqa: N806
                      groups=g, bias=False, padding_mode=b.padding_mode)
        lora_B = conv(g * r, b.out_channels, 1, groups=g, bias=False)  # noqa: N806
        self._init_factors(lora_A, lora_B, prepare)

    def rank_axes(self) -> list[RankAxis]:
        """Component ``i``: output channel ``g · rank + i`` of ``A`` for every group ``g``, channel ``i`` of ``B``.

        (Each group's ``1 × 1`` kernel of ``B`` reads its own ``rank`` channels.)
        """
        return [RankAxis("rank", self.rank, (("lora_A.weight", 0, True), ("lora_B.weight", 1, False)))]

    def _resized(self, sizes: Mapping[str, int]) -> None:
        self.rank = sizes.get("rank", self.rank)
        self.lora_A.out_channels = self.lora_B.in_channels = self.groups * self.rank

    def _pissa(self) -> None:
        g, r = self.groups, self.rank
        groups = self.base_layer.weight.reshape(g, self.out_channels // g, -1)
        factors = [_pissa_factors(matrix, r, self.scaling) for matrix in groups]
        self.lora_B.weight.copy_(torch.cat([b for b, _ in factors]).reshape(self.lora_B.weight.shape))
        self.lora_A.weight.copy_(torch.cat([a for _, a in factors]).reshape(self.lora_A.weight.shape))

    def delta_weight(self) -> torch.Tensor:
        """``s · B_g A_g`` for every group, ``(out, in / groups, *kernel)``."""
        g, r = self.groups, self.rank
        a = self.lora_A.weight.reshape(g, r, -1)
        b = self.lora_B.weight.reshape(g, -1, r)
        return (b @ a).reshape(self.out_channels, self.in_channels // g, *self.kernel_size) * self.scaling

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B(A(dropout(x)))``: the ``rank``-wide convolution, then the grouped ``1 × 1`` one."""
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


# ----------------------------------------------------------------------------- FLoRA


def tucker_product(core: torch.Tensor, factors: list[torch.Tensor] | nn.ParameterList) -> torch.Tensor:
    """``core ×₁ factors[0] ×₂ factors[1] …`` (each factor ``(n_i, r_i)``)."""
    out = core
    for i, factor in enumerate(factors):
        out = torch.tensordot(factor, out, dims=([1], [i])).movedim(0, i)
    return out


class FLoRALayer(AdapterLayer):
    """What the FLoRA layers share: the core ``G`` (zero at first) and one factor per weight mode.

    ``flora_core`` has one dimension per mode of the weight, of the mode's
    rank; ``flora_factors[i]`` is ``(n_i, r_i)`` with random orthonormal
    columns (drawn in float32 on the CPU, as the LoRA factors), so that
    ``||ΔW||_F = s ||G||_F`` and a learning rate means the same for every
    layer shape. ``ΔW = s · G ×₁ A₁ ×₂ A₂ …``.
    """

    def __init__(self, base_layer: nn.Module, config: FLoRA, modes: tuple[int, ...], name: str = "") -> None:
        if not isinstance(config, FLoRA):
            raise TypeError(f"config must be a lowrank.adapters.FLoRA, got {type(config).__name__}")
        super().__init__(base_layer, config, name)
        self.modes = modes
        where = f"layer {name!r} ({describe_layer(base_layer)})" if name else describe_layer(base_layer)
        if isinstance(config.rank, int):
            self.ranks = tuple(min(config.rank, n) for n in modes)
        elif len(config.rank) != len(modes):
            raise ValueError(f"FLoRA.rank gives {len(config.rank)} ranks {list(config.rank)} but {where} has "
                             f"{len(modes)} weight modes {modes}")
        else:
            self.ranks = check_ranks(config.rank, modes, name="FLoRA rank",
                                     what=[f"mode {i} (size {n}) of {where}" for i, n in enumerate(modes)])
        dtype = adapter_dtype(self._base_dtype)
        factors = []
        for n, r in zip(modes, self.ranks):
            factor = torch.empty(n, r)
            nn.init.orthogonal_(factor)
            factors.append(nn.Parameter(factor.to(self._device, self._base_dtype).to(dtype)))
        self.flora_core = nn.Parameter(torch.zeros(self.ranks, device=self._device, dtype=dtype))
        self.flora_factors = nn.ParameterList(factors)
        self.flora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def rank_axes(self) -> list[RankAxis]:
        """One axis per weight mode, ``"mode0"``, ``"mode1"`` ….

        Component ``j`` of mode ``i`` is the core's slice ``j`` along dim ``i``
        and column ``j`` of factor ``i``.
        """
        return [RankAxis(f"mode{i}", r, (("flora_core", i, False), (f"flora_factors.{i}", 1, False)),
                         config_key="rank", config_entry=i)
                for i, r in enumerate(self.ranks)]

    def _resized(self, sizes: Mapping[str, int]) -> None:
        self.ranks = tuple(sizes.get(f"mode{i}", r) for i, r in enumerate(self.ranks))

    def core_weight(self) -> torch.Tensor:
        """``s · G ×₁ A₁ ×₂ A₂ …`` in the modes' order."""
        return tucker_product(self.flora_core, list(self.flora_factors)) * self.scaling

    def extra_repr(self) -> str:
        """Ranks, scaling and state."""
        return f"ranks={self.ranks}, " + super().extra_repr()


class FLoRALinear(_LinearMerge, FLoRALayer):
    """FLoRA on a linear layer: ``ΔW = s · A_out G A_in^T`` with ``G`` ``(r_out, r_in)``.

    The forward runs ``s · ((x A_in) G^T) A_out^T`` and never forms ``ΔW``.
    Bases as :class:`LoRALinear` (merging into a ``LowRankLinear`` adds
    ``r_out`` to its rank).

    Examples
    --------
    >>> import torch
    >>> from lowrank.adapters import FLoRA, FLoRALinear
    >>> layer = FLoRALinear(torch.nn.Linear(16, 8), FLoRA(rank=4))
    >>> layer.flora_core.shape, [tuple(f.shape) for f in layer.flora_factors]
    (torch.Size([4, 4]), [(8, 4), (16, 4)])

    """

    def __init__(self, base_layer: nn.Module, config: FLoRA, name: str = "") -> None:
        shape = dense_shape(base_layer)
        transposed = is_hf_conv1d(base_layer) or getattr(base_layer, "dense_type", None) == "Conv1D"
        out_features, in_features = shape[::-1] if transposed else shape
        super().__init__(base_layer, config, (out_features, in_features), name)
        self.transposed, self.in_features, self.out_features = transposed, in_features, out_features

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s · A_out, G A_in^T)``."""
        a_out, a_in = self.flora_factors
        return a_out * self.scaling, self.flora_core @ a_in.T

    def delta_weight(self) -> torch.Tensor:
        """``s · A_out G A_in^T``, transposed for a ``Conv1D``."""
        delta = self.core_weight()
        return delta.T if self.transposed else delta

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``s · ((dropout(x) A_in) G^T) A_out^T``."""
        a_out, a_in = self.flora_factors
        x = self.flora_dropout(x.to(a_in.dtype))
        return ((x @ a_in) @ self.flora_core.T) @ a_out.T * self.scaling


class FLoRAConv(FLoRALayer):
    """FLoRA on a convolution: a Tucker update over the kernel's own modes ``(out, in / groups, k₁, …)``.

    The modes are those of the grouped weight, so grouped and depthwise
    convolutions are handled as the dense layer itself handles them (a
    depthwise kernel's input mode has size 1, hence rank 1), and every
    option (stride, padding strings and modes, dilation) applies to ``ΔW`` as
    to ``W``.

    Cost: the forward forms ``ΔW`` (``prod(ranks) · sum(n_i)`` multiply-adds
    at most, small against the convolution) and, on a dense base without
    dropout in float32/float64, runs **one** convolution with ``W + ΔW``;
    otherwise (half precision, where ``W + ΔW`` would round the update away,
    dropout, a factorized base, or forward hooks on the base) it adds a second
    convolution with ``ΔW``, as costly as the base layer's.

    Examples
    --------
    >>> import torch
    >>> from lowrank.adapters import FLoRA, FLoRAConv
    >>> layer = FLoRAConv(torch.nn.Conv2d(8, 16, 3, groups=4), FLoRA(rank=4))
    >>> layer.modes, layer.ranks
    ((16, 2, 3, 3), (4, 2, 3, 3))

    """

    def __init__(self, base_layer: nn.Module, config: FLoRA, name: str = "") -> None:
        super().__init__(base_layer, config, dense_shape(base_layer), name)

    def delta_weight(self) -> torch.Tensor:
        """``s · G ×₁ A_out ×₂ A_in ×₃ A_k₁ …``, ``(out, in / groups, *kernel)``."""
        return self.core_weight()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``dropout(x)`` convolved by ``ΔW`` with the base's hyper-parameters."""
        delta = self.delta_weight()
        return conv_apply(self.base_layer, self.flora_dropout(x.to(delta.dtype)), delta)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """One convolution with ``W + ΔW`` where that is exact enough (see the class), else the base plus the update."""
        base = self.base_layer
        fused = (
            not args and not kwargs and isinstance(self.flora_dropout, nn.Identity)
            and type(base) in CONV_TYPES.values() and base.weight.dtype in (torch.float32, torch.float64)
            and not base._forward_hooks and not base._forward_pre_hooks
        )
        if not fused:
            return super().adapted_forward(x, *args, **kwargs)
        return conv_apply(base, x, base.weight + self.delta_weight().to(base.weight.dtype), base.bias)


# ----------------------------------------------------------------------------- dispatch

ADAPTER_CLASSES: dict[type, dict[str, type[AdapterLayer]]] = {
    LoRA: {"linear": LoRALinear, "embedding": LoRAEmbedding, "conv": LoRAConv},
    FLoRA: {"linear": FLoRALinear, "conv": FLoRAConv},
}


def adapter_class(config: LoRA | FLoRA, module: nn.Module, name: str = "") -> type[AdapterLayer]:
    """The adapter layer class that puts ``config`` on ``module``.

    Raises
    ------
    TypeError
        If ``config`` is no adapter config, or ``module`` no layer an adapter knows.
    UnsupportedLayerError
        If this adapter does not adapt that kind of layer (FLoRA on an
        embedding, anything on ``MultiheadAttention``'s ``out_proj``).

    """
    if type(config) not in ADAPTER_CLASSES:
        raise TypeError(f"config must be a lowrank.adapters.LoRA or FLoRA, got {type(config).__name__}")
    where = f"layer {name!r}" if name else "the layer"
    layout = layer_layout(module)
    if layout is None:
        raise TypeError(f"{where} is a {type(module).__name__}, which no adapter adapts (they adapt nn.Linear, "
                        "Hugging Face Conv1D, nn.Conv1d/2d/3d, nn.Embedding and the modules of lowrank.nn)")
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":
        raise UnsupportedLayerError(f"{where} is a MultiheadAttention's out_proj, whose weight the attention reads "
                                    "directly: an adapter there would be ignored")
    classes = ADAPTER_CLASSES[type(config)]
    if layout not in classes:
        raise UnsupportedLayerError(f"{type(config).__name__} does not adapt {where}, {describe_layer(module)} "
                                    f"(it adapts {' and '.join(classes)} layers)")
    return classes[layout]


def make_adapter(config: LoRA | FLoRA, module: nn.Module, name: str = "", *, prepare: bool = True) -> AdapterLayer:
    """The adapter layer putting ``config`` on ``module`` (see :func:`adapter_class`); ``module`` becomes its base."""
    cls = adapter_class(config, module, name)
    if issubclass(cls, LoRALayer):
        return cls(module, config, name, prepare=prepare)
    return cls(module, config, name)
