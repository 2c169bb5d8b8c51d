"""Adapters on a whole model: add them, merge and unmerge them, disable them, fold them in for good."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lowrank.adapters.config import FLoRA, LoRA
from lowrank.adapters.layers import AdapterLayer, adapter_class, make_adapter
from lowrank.checks import check_bool
from lowrank.distributed import unwrap
from lowrank.nn.base import FactorizedModule
from lowrank.nn.dense import layer_kind
from lowrank.nn.surgery import swap_modules
from lowrank.targets import Target, Targets, output_heads, targets_from

# The layer kinds adapted when neither targets= nor kinds= says otherwise (PEFT's usual choice).
DEFAULT_KINDS = ("linear",)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The adapter layers of ``model`` by name, in the order of ``model.named_modules()``.

    Examples
    --------
    >>> import torch, lowrank.adapters
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> lowrank.adapters.add(model, lowrank.adapters.LoRA(rank=2), include=["0"])
    ['0']
    >>> list(lowrank.adapters.adapter_layers(model))
    ['0']

    """
    return {name: module for name, module in unwrap(model).named_modules() if isinstance(module, AdapterLayer)}


def _layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """:func:`adapter_layers`, or a ValueError when there is none."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"the {type(unwrap(model)).__name__} has no adapter layers: call lowrank.adapters.add first")
    return layers


def _select(model: nn.Module, targets: Targets) -> list[Target]:
    """The layers ``targets`` chooses for an adapter: no output head, none adapted already, none inside an adapter.

    Raises
    ------
    ValueError
        If a chosen layer carries an adapter already, or if no layer (or only
        output heads) is chosen.

    """
    heads = output_heads(model)
    adapted = {}
    inside: set[int] = set()
    for name, layer in adapter_layers(model).items():
        adapted[id(layer)] = adapted[id(layer.base_layer)] = name
        inside.update(id(module) for module in layer.modules())
    chosen, twice = [], []
    for name, module in model.named_modules():
        if id(module) in adapted:
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            if targets.matches(name, base) and adapted[id(module)] not in twice:
                twice.append(adapted[id(module)])
        elif id(module) not in inside and targets.matches(name, module):
            kind = module.kind if isinstance(module, FactorizedModule) else layer_kind(module)
            chosen.append(Target(name, module, kind, id(module) in heads))
    if twice:
        raise ValueError(f"layer(s) {', '.join(map(repr, twice))} carry an adapter already: merge_and_unload() them "
                         "first, or exclude them")
    if not chosen:
        raise ValueError(f"no layer of the {type(model).__name__} matches the targets {targets.describe()}")
    kept = [target for target in chosen if not target.head]
    if not kept:
        raise ValueError(f"the targets {targets.describe()} match only output heads "
                         f"({', '.join(t.name for t in chosen)}), which adapters never change")
    if any(target.name == "" for target in kept):
        raise ValueError(f"the model itself is the layer targeted ({type(model).__name__}): wrap it in a container "
                         "(such as nn.Sequential) so that an adapter can take its place")
    return kept


def add(
    model: nn.Module,
    config: LoRA | FLoRA,
    targets: Targets | None = None,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Put an adapter on the targeted layers of ``model``, in place, and freeze everything else.

    Each targeted layer is replaced by its adapter layer (:mod:`lowrank.adapters.layers`)
    holding it as ``base_layer``; then every parameter of the model that
    belongs to no adapter stops requiring gradients, so that
    :func:`trainable_parameters` are the only ones training changes. All layers
    are checked and built before any is swapped in: on an error the model is
    unchanged.

    Parameters
    ----------
    model : nn.Module
        The model (or its ``DistributedDataParallel`` wrapper), modified in place.
    config : LoRA or FLoRA
        The adapter.
    targets : Targets, optional
        Which layers, as in :func:`lowrank.compress`; by default every linear
        layer (``kinds=("linear",)``). Output heads (tied to an input
        embedding, or the model's ``get_output_embeddings()``) are never adapted.
    include, exclude, kinds, filter_fn
        Shortcuts for the fields of ``targets`` (see :class:`~lowrank.Targets`).
        Dense layers and the factorized modules of :mod:`lowrank.nn` are both
        targeted, the latter by the kind of layer they replaced.

    Returns
    -------
    list of str
        The names of the adapted layers.

    Raises
    ------
    ValueError
        If no layer (or only output heads) matches, a layer carries an adapter
        already, or the rank does not fit a layer (the message names it and
        its shape).
    TypeError
        If a targeted layer is of a type the adapter does not know (it is named).

    Examples
    --------
    >>> import torch, lowrank.adapters
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> lowrank.adapters.add(model, lowrank.adapters.LoRA(rank=4, alpha=8))
    ['0', '2']
    >>> sum(p.numel() for p in lowrank.adapters.trainable_parameters(model))
    208

    """
    if not isinstance(config, (LoRA, FLoRA)):
        raise TypeError(f"config must be a lowrank.adapters.LoRA or FLoRA, got {type(config).__name__}")
    model = unwrap(model)
    targets = targets_from(targets if targets is not None else Targets(kinds=DEFAULT_KINDS),
                           include=include, exclude=exclude, kinds=kinds, filter_fn=filter_fn)
    chosen = _select(model, targets)
    for target in chosen:  # every type is checked before any factor is drawn
        adapter_class(config, target.module, target.name)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:  # nothing changes the model until every layer is built (PiSSA's residuals are written after the swap)
        layers = [(target.name, make_adapter(config, target.module, target.name, prepare=False))
                  for target in chosen]
        swap_modules(model, layers)
    except Exception:
        for parameter, flag in flags:  # an adapter layer freezes its base as it is built
            parameter.requires_grad_(flag)
        raise
    for _, layer in layers:
        layer.prepare_base()
    adapter_ids = {id(p) for p in trainable_parameters(model)}
    for parameter in model.parameters():
        if id(parameter) not in adapter_ids:
            parameter.requires_grad_(False)
    return [name for name, _ in layers]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (each once), for the optimizer: ``torch.optim.AdamW(trainable_parameters(model))``."""
    seen: dict[int, nn.Parameter] = {}
    for layer in adapter_layers(model).values():
        for parameter in layer.adapter_parameters():
            seen.setdefault(id(parameter), parameter)
    return list(seen.values())


def merge(model: nn.Module, safe: bool = False) -> list[str]:
    """Fold every unmerged adapter into its base layer, all or none.

    Parameters
    ----------
    model : nn.Module
        The adapted model.
    safe : bool
        Check each merged weight and raise a ValueError if one is not finite.

    Returns
    -------
    list of str
        The names of the layers merged by this call.

    Raises
    ------
    ValueError
        If the model has no adapter, or (``safe``) a merged weight is not
        finite; the layers this call merged are unmerged first, so the model
        is as it was.
    TypeError
        If an adapter sits on a factorized module that cannot take it
        (anything but ``LowRankLinear``), after the same rollback.

    """
    check_bool(safe, "safe")
    layers = _layers(model)
    done: list[str] = []
    try:
        for name, layer in layers.items():
            if not layer.merged:
                layer.merge(safe=safe)
                done.append(name)
    except Exception:
        for name in reversed(done):
            layers[name].unmerge()
        raise
    return done


def unmerge(model: nn.Module) -> list[str]:
    """Take every merged adapter out of its base layer, restoring the base weights bit for bit.

    Returns the names of the layers unmerged.
    """
    done = []
    for name, layer in _layers(model).items():
        if layer.merged:
            layer.unmerge()
            done.append(name)
    return done


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base outputs: every adapter is off (merged ones unmerged).

    On exit the adapters are back as they were (those merged on entry merged again).

    Examples
    --------
    >>> import torch, lowrank.adapters
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> _ = lowrank.adapters.add(model, lowrank.adapters.LoRA(rank=2), include="0")
    >>> with lowrank.adapters.disabled(model):
    ...     model[0].disabled
    True

    """
    layers = list(_layers(model).values())
    flags = [layer.disabled for layer in layers]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    try:
        for layer in layers:
            layer.disabled = True
        yield model
    finally:
        for layer, flag in zip(layers, flags):
            layer.disabled = flag
        for layer in merged:
            layer.merge()


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layers back in the model, in place.

    The result holds no adapter: dense layers with ``W + ΔW``, and wider
    ``LowRankLinear`` modules where LoRA sat on one. Their parameters stay
    frozen as :func:`add` left them (``model.requires_grad_(True)`` trains
    them again). All or none, as :func:`merge`.

    Returns
    -------
    nn.Module
        ``model`` itself (unwrapped from ``DistributedDataParallel``).

    """
    model = unwrap(model)
    merge(model, safe=safe)
    layers = _layers(model)
    swap_modules(model, [(name, layer.base_layer) for name, layer in layers.items()])
    for layer in layers.values():
        layer.unload()
    return model
