"""Saving and loading adapters: PEFT's LoRA format, or lowrank's own for every adapter.

``save(model, "adapter/", format="peft")`` writes what
``peft.PeftModel.from_pretrained(base, "adapter/")`` loads: ``adapter_config.json``
(``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
``rank_pattern``/``alpha_pattern`` for the layers that differ, ...) and
``adapter_model.safetensors`` with PEFT's keys
``base_model.model.<module>.lora_A.weight`` (``lora_embedding_A`` for
embeddings), the adapter name left out as PEFT leaves it out. What PEFT
cannot represent is refused, naming the layer: FLoRA, LoRA on a grouped
convolution (per-group ranks) or on a module of :mod:`lowrank.nn`, LoRA on a
convolution with dilation or a padding mode PEFT's forward ignores.

``save(model, "adapter/", format="lowrank")`` (the default) saves every
adapter: ``lowrank_adapters.json``, the plan (per adapted layer its adapter
class, config, ranks, scale and the base layer it was made for), and
``lowrank_adapters.safetensors``, the adapter tensors alone. Both formats are
written into a temporary directory that is renamed at the end (an
interrupted save leaves nothing), and nothing is ever pickled.

``load(model, "adapter/")`` reads either format, adds the adapters to the base
model with each layer's own config and loads their tensors; a base that is not
the one the adapter was saved for (a layer missing, another shape) is named
in the error before the model changes.

PiSSA: the adapter is saved, not the residual base weights. Both
``load`` and PEFT's ``from_pretrained`` (told ``init_lora_weights="pissa"``)
recompute the residual from the **original** base weights, so load a PiSSA
adapter into the original model; to keep the residual model itself, save the
whole model with :func:`lowrank.save`, which stores the adapters with it.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lowrank import __version__
from lowrank.adapters.config import FLoRA, LoRA
from lowrank.adapters.layers import (
    AdapterLayer,
    FLoRALayer,
    LoRAConv,
    LoRAEmbedding,
    LoRALayer,
    adapter_class,
    dense_shape,
    describe_layer,
    layer_layout,
    make_adapter,
)
from lowrank.adapters.model import adapter_layers, trainable_parameters
from lowrank.checks import check_bool, check_choice, is_int, is_real
from lowrank.distributed import unwrap
from lowrank.io import read_state_dict, staged_directory
from lowrank.nn.base import FactorizedModule
from lowrank.nn.dense import is_hf_conv1d
from lowrank.nn.surgery import swap_modules

FORMATS = ("lowrank", "peft")
PLAN_NAME = "lowrank_adapters.json"
WEIGHTS_NAME = "lowrank_adapters.safetensors"
PLAN_FORMAT = "lowrank-adapters"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# PEFT's LoRA tensors (the adapter name removed), which are also the names of our LoRA parameters.
PEFT_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
# LoraConfig fields naming features lowrank's LoRA does not have: a file setting any of them is refused.
PEFT_UNSUPPORTED = (
    "use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "layer_replication", "target_parameters",
    "use_qalora", "alora_invocation_tokens", "velora_config", "use_bdlora", "arrow_config", "kasa_config",
    "monteclora_config", "megatron_config",
)
# PEFT initialisations that change the base weights, which only re-running them (not the saved adapter) restores.
PEFT_BASE_CHANGING_INITS = ("olora", "corda", "loftq", "lora_ga")
# A tensor key of lowrank's format: the adapted module, then the adapter's parameter.
TENSOR_KEY = re.compile(r"^(.*)\.(lora_A\.weight|lora_B\.weight|lora_embedding_[AB]|flora_core|flora_factors\.\d+)$")
ADAPTER_CLASS_NAMES = ("LoRALinear", "LoRAEmbedding", "LoRAConv", "FLoRALinear", "FLoRAConv")


# ----------------------------------------------------------------------------- describing a layer


def _base_of(layer: AdapterLayer) -> nn.Module:
    """The layer's own base: the factorized module a merge replaced, if merged into a wider one."""
    return layer._unmerged_module if layer._unmerged_module is not None else layer.base_layer


def base_signature(module: nn.Module) -> dict[str, Any]:
    """What an adapter's shapes depend on: the layout, the weight shape as ``(out, in, …)`` and the groups.

    A Hugging Face ``Conv1D`` (layout ``(in, out)``) has the signature of the
    ``nn.Linear`` it stands for, so an adapter moves between the two.
    """
    layout = layer_layout(module)
    shape = dense_shape(module)
    if layout == "linear" and (is_hf_conv1d(module) or getattr(module, "dense_type", None) == "Conv1D"):
        shape = shape[::-1]
    groups = int(getattr(module, "groups", 1)) if layout == "conv" else 1
    return {"layout": layout, "shape": [int(n) for n in shape], "groups": groups}


def layer_ranks(layer: AdapterLayer) -> tuple[int, ...]:
    """The ranks the layer's tensors have: ``(r,)`` for LoRA (per group on a grouped conv), the core's for FLoRA."""
    if isinstance(layer, FLoRALayer):
        return tuple(layer.flora_core.shape)
    if isinstance(layer, LoRAEmbedding):
        return (layer.lora_embedding_A.shape[0],)
    rank = layer.lora_A.weight.shape[0]
    return (rank // layer.groups if isinstance(layer, LoRAConv) else rank,)


def _adapter_tensors(layer: AdapterLayer) -> dict[str, nn.Parameter]:
    """The adapter's own parameters by their name in the layer (``lora_A.weight``, ``flora_factors.0`` …)."""
    return {name: p for name, p in layer.named_parameters() if not name.startswith("base_layer.")}


def adapter_plan(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every adapter layer of ``model`` by name: its class, config, ranks, scale and the base it was made for.

    This is what ``lowrank_adapters.json`` and the ``"adapters"`` of
    :func:`lowrank.save`'s plan record; :func:`attach_plan` puts the adapters back.

    Examples
    --------
    >>> import torch, lowrank.adapters
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> _ = lowrank.adapters.add(model, lowrank.adapters.LoRA(rank=2), include="0")
    >>> entry = adapter_plan(model)["0"]
    >>> entry["class"], entry["ranks"], entry["base"]
    ('LoRALinear', [2], {'layout': 'linear', 'shape': [4, 8], 'groups': 1})

    """
    plan = {}
    for name, layer in adapter_layers(model).items():
        base = _base_of(layer)
        plan[name] = {
            "class": type(layer).__name__,
            "config": layer.config.to_dict(),
            "ranks": list(layer_ranks(layer)),
            "scaling": layer.scaling,
            "base": base_signature(base),
            "base_description": describe_layer(base),
        }
    return plan


# ----------------------------------------------------------------------------- adapters back onto a model


@dataclass(frozen=True)
class _Spec:
    """One adapter to put on a model: where, with which config, and what the file says about it."""

    name: str
    config: LoRA | FLoRA
    scaling: float | None = None  # the recorded scale, if it must override the config's
    cls: str | None = None  # the recorded adapter class
    base: dict[str, Any] | None = None  # the recorded base signature
    description: str | None = None  # the recorded base, in words
    peft: bool = False  # read from a PEFT file


def config_from_dict(data: object, where: str = "the adapter") -> LoRA | FLoRA:
    """The :class:`LoRA` or :class:`FLoRA` that ``config.to_dict()`` gave (checked as a new one is)."""
    if not isinstance(data, dict) or data.get("type") not in ("LoRA", "FLoRA"):
        raise ValueError(f"{where}: {data!r} is no adapter config (a dict with 'type': 'LoRA' or 'FLoRA')")
    fields = {key: value for key, value in data.items() if key != "type"}
    if data["type"] == "FLoRA" and isinstance(fields.get("rank"), list):
        fields["rank"] = tuple(fields["rank"])
    try:
        return (LoRA if data["type"] == "LoRA" else FLoRA)(**fields)
    except TypeError as error:
        raise ValueError(f"{where}: the adapter config {data!r} has unknown fields ({error})") from error


def _spec_from_entry(name: str, entry: object, source: str | Path) -> _Spec:
    """The spec of one entry of a plan, its config given the recorded ranks and scale."""
    where = f"{source}: adapter of layer {name!r}"
    if not isinstance(entry, dict) or not {"class", "config", "ranks", "scaling", "base"} <= set(entry):
        raise ValueError(f"{where}: the entry needs 'class', 'config', 'ranks', 'scaling' and 'base', got {entry!r}")
    if entry["class"] not in ADAPTER_CLASS_NAMES:
        raise ValueError(f"{where}: unknown adapter class {entry['class']!r} (known: {', '.join(ADAPTER_CLASS_NAMES)})")
    config = config_from_dict(entry["config"], where)
    ranks, scaling, base = entry["ranks"], entry["scaling"], entry["base"]
    if not isinstance(ranks, list) or not ranks or not all(is_int(r) and r >= 1 for r in ranks):
        raise ValueError(f"{where}: 'ranks' must be a list of ints >= 1, got {ranks!r}")
    if not is_real(scaling) or not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"{where}: 'scaling' must be a finite number > 0, got {scaling!r}")
    if not isinstance(base, dict) or not {"layout", "shape", "groups"} <= set(base):
        raise ValueError(f"{where}: 'base' must record 'layout', 'shape' and 'groups', got {base!r}")
    ranks = tuple(int(r) for r in ranks)
    if isinstance(config, LoRA):  # ranks set after adding (a rank schedule) are the tensors' own
        expected = (config.rank,)
    elif isinstance(config.rank, int):
        expected = tuple(min(config.rank, n) for n in base["shape"])
    else:
        expected = config.rank
    if ranks != expected:
        if isinstance(config, LoRA) and config.init == "pissa":
            raise ValueError(f"{where}: a PiSSA adapter whose rank changed after adding ({config.rank} -> {ranks[0]}) "
                             "cannot be restored from the original base; save the model with lowrank.save")
        config = replace(config, rank=ranks[0] if isinstance(config, LoRA) else ranks)
    return _Spec(name, config, float(scaling), entry["class"], base, entry.get("base_description"))


def _build(model: nn.Module, specs: list[_Spec], source: str | Path) -> list[tuple[str, AdapterLayer]]:
    """The adapter layers of ``specs`` on the layers of ``model``, every layer checked first; the model unchanged.

    Raises
    ------
    ValueError
        If a layer is missing, carries an adapter already, or is not the
        layer the adapter was made for (the message names both).
    TypeError
        If the adapter does not adapt the layer found there.

    """
    modules = dict(model.named_modules())
    inside = {id(m) for layer in adapter_layers(model).values() for m in layer.modules()}
    missing = [spec.name for spec in specs if not spec.name or spec.name not in modules]
    if missing:
        raise ValueError(f"{source} adapts layer {missing[0]!r}, which the {type(model).__name__} does not have"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + ": the adapter was saved for another model")
    for spec in specs:
        module = modules[spec.name]
        if id(module) in inside:
            raise ValueError(f"layer {spec.name!r} of the {type(model).__name__} carries an adapter already (or is "
                             "inside one): merge_and_unload() it first, or load into a model without adapters")
        adapter_class(spec.config, module, spec.name)
        if spec.base is not None:
            signature = base_signature(module)
            if any(signature[key] != spec.base[key] for key in ("layout", "shape", "groups")):
                raise ValueError(f"{source}: layer {spec.name!r} of the model is {describe_layer(module)}, but the "
                                 f"adapter was made for {spec.description or spec.base}: another base model")
        if spec.peft and layer_layout(module) == "conv" and module.groups > 1:
            raise ValueError(f"{source}: layer {spec.name!r} is {describe_layer(module)}: PEFT's LoRA on a grouped "
                             "convolution has one dense lora_A, which lowrank's LoRAConv (per-group ranks) cannot hold")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:  # an adapter layer freezes its base as it is built; the draws of the init leave the global RNG as it was
        with torch.random.fork_rng(devices=[]):
            layers = [(spec.name, make_adapter(spec.config, modules[spec.name], spec.name, prepare=False))
                      for spec in specs]
        for spec, (name, layer) in zip(specs, layers):
            if spec.cls is not None and type(layer).__name__ != spec.cls:
                raise ValueError(f"{source}: the adapter of layer {name!r} is a {spec.cls}, but on the model's "
                                 f"{describe_layer(layer.base_layer)} it would be a {type(layer).__name__}")
    except Exception:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        raise
    for spec, (name, layer) in zip(specs, layers):
        if spec.scaling is not None:
            layer.scaling = spec.scaling
        if spec.peft and isinstance(layer, LoRAConv):
            base = layer.base_layer
            if any(d != 1 for d in base.dilation) or base.padding_mode != "zeros":
                warnings.warn(f"layer {name!r} is {describe_layer(base)} with dilation={tuple(base.dilation)}, "
                              f"padding_mode={base.padding_mode!r}, which PEFT's conv LoRA ignores (PEFT issue #3697) "
                              "and lowrank applies: outputs differ from PEFT's", UserWarning, stacklevel=3)
    return layers


def _install(model: nn.Module, layers: list[tuple[str, AdapterLayer]], prepare: bool) -> None:
    """Swap the layers in (all or none), write PiSSA's residuals if ``prepare``, and freeze all but the adapters."""
    swap_modules(model, layers)
    for _, layer in layers:
        if prepare:
            layer.prepare_base()
        elif isinstance(layer, LoRALayer):
            layer._pissa_pending = False  # the base holds its residual already (read from the checkpoint)
    adapter_ids = {id(p) for p in trainable_parameters(model)}
    for parameter in model.parameters():
        if id(parameter) not in adapter_ids:
            parameter.requires_grad_(False)


def attach_plan(model: nn.Module, plan: Mapping[str, Any], source: str | Path = "the plan") -> list[str]:
    """Put the adapters recorded by :func:`adapter_plan` on ``model``, their tensors left as drawn.

    The base weights are not touched (no PiSSA residual is computed): this is
    for :func:`lowrank.load`, which then reads every tensor, bases and
    adapters, from its checkpoint. Returns the names of the adapted layers.
    """
    model = unwrap(model)
    if not isinstance(plan, Mapping):
        raise ValueError(f"{source}: the adapters must be a mapping of layer names to entries, got {plan!r}")
    layers = _build(model, [_spec_from_entry(name, entry, source) for name, entry in plan.items()], source)
    _install(model, layers, prepare=False)
    return [name for name, _ in layers]


def _check_tensors(layers: list[tuple[str, AdapterLayer]], tensors: Mapping[str, torch.Tensor], prefix: str,
                   source: str | Path) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """Each adapter parameter with its tensor from the file, every key and shape checked."""
    pairs, missing = {}, []
    for name, layer in layers:
        for key, parameter in _adapter_tensors(layer).items():
            full = f"{prefix}{name}.{key}"
            if full not in tensors:
                missing.append(full)
                continue
            tensor = tensors[full]
            if tuple(tensor.shape) != tuple(parameter.shape):
                raise ValueError(
                    f"{source}: tensor {full!r} has shape {tuple(tensor.shape)}, but the adapter on layer {name!r} of "
                    f"the model ({describe_layer(layer.base_layer)}) takes {tuple(parameter.shape)}: the adapter was "
                    "saved for another base model")
            pairs[full] = (parameter, tensor)
    if missing:
        raise ValueError(f"{source} lacks the adapter tensor(s) {', '.join(map(repr, missing[:5]))}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    unknown = [key for key in tensors if key not in pairs]
    if unknown:
        raise ValueError(f"{source} holds tensor(s) no adapter takes: {', '.join(map(repr, unknown[:5]))}")
    return pairs


# ----------------------------------------------------------------------------- PEFT's format


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching the end of ``name``, or ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _pattern_key(name: str, names: list[str]) -> str:
    """A ``rank_pattern`` key that PEFT matches to ``name`` alone among ``names``: the name, or ``^`` + escaped."""
    if all(bool(re.match(rf"(.*\.)?({name})$", other)) == (other == name) for other in names):
        return name
    return "^" + re.escape(name)


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str] | str:
    """``target_modules`` choosing exactly ``adapted`` in PEFT: the names, or a regex if a name ends another's."""
    names = [n for n, _ in model.named_modules() if not any(n.startswith(a + ".") for a in adapted)]
    chosen = {n for n in names if n in adapted or any(n.endswith("." + a) for a in adapted)}
    if chosen == set(adapted):
        return list(adapted)
    return "(?:" + "|".join(re.escape(n) for n in adapted) + ")"


def _peft_alpha(layer: LoRALayer) -> float:
    """The ``lora_alpha`` that gives the layer's scale in PEFT (``alpha / r`` or ``alpha / sqrt(r)``)."""
    (rank,) = layer_ranks(layer)
    config = layer.config
    if LoRA(rank=rank, alpha=config.alpha, rslora=config.rslora).scaling == layer.scaling:
        return config.alpha
    alpha = layer.scaling * (math.sqrt(rank) if config.rslora else rank)
    if LoRA(rank=rank, alpha=alpha, rslora=config.rslora).scaling != layer.scaling:
        raise ValueError(f"the scale {layer.scaling!r} of layer {layer.layer_name!r} (rank {rank}) is no "
                         "lora_alpha / r of PEFT's; save with format='lowrank'")
    return alpha


def _plain(number: float) -> float | int:
    """``16.0`` -> ``16``, as PEFT writes ``lora_alpha``."""
    return int(number) if float(number).is_integer() else number


def peft_config(model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` of ``model``'s LoRA adapters, for ``peft.PeftModel.from_pretrained``.

    ``r`` and ``lora_alpha`` are the most common rank and alpha;
    ``rank_pattern`` and ``alpha_pattern`` name the layers that differ.

    Raises
    ------
    ValueError
        If an adapter has no PEFT equivalent (each is named, with the reason):
        FLoRA; LoRA on a module of :mod:`lowrank.nn`, on a grouped convolution
        (per-group ranks) or on a convolution with dilation or a padding mode
        (PEFT's forward ignores them, PEFT issue #3697); layers that differ in
        dropout, rsLoRA or PiSSA (PEFT has one setting for all).

    """
    model = unwrap(model)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"the {type(model).__name__} has no adapter layers: call lowrank.adapters.add first")
    problems = []
    for name, layer in layers.items():
        base = _base_of(layer)
        if isinstance(layer, FLoRALayer):
            problems.append(f"layer {name!r} carries FLoRA, which PEFT does not have")
        elif isinstance(base, FactorizedModule):
            problems.append(f"layer {name!r} is {describe_layer(base)}, a lowrank.nn module PEFT cannot wrap")
        elif isinstance(layer, LoRAConv) and base.groups > 1:
            problems.append(f"layer {name!r} is {describe_layer(base)}: its LoRA has per-group ranks, PEFT's one "
                            "dense lora_A")
        elif isinstance(layer, LoRAConv) and (any(d != 1 for d in base.dilation) or base.padding_mode != "zeros"):
            problems.append(f"layer {name!r} is a {type(base).__name__} with dilation={tuple(base.dilation)} and "
                            f"padding_mode={base.padding_mode!r}, which PEFT's conv LoRA ignores (PEFT issue #3697)")
    lora = {name: layer for name, layer in layers.items() if isinstance(layer, LoRALayer)}
    for field, label in (("dropout", "lora_dropout"), ("rslora", "use_rslora")):
        values = {getattr(layer.config, field) for layer in lora.values()}
        if len(values) > 1:
            shown = ", ".join(f"{name!r}: {getattr(layer.config, field)!r}" for name, layer in lora.items())
            problems.append(f"PEFT has one {label} for every layer, these differ ({shown})")
    if len({layer.config.init == "pissa" for layer in lora.values()}) > 1:
        problems.append("PEFT has one init_lora_weights for every layer, and only some layers use PiSSA")
    if problems:
        raise ValueError("cannot save in PEFT's format: " + "; ".join(problems)
                         + ". format='lowrank' saves every adapter (lowrank.adapters.load reads it)")
    names = list(lora)
    ranks = {name: layer_ranks(layer)[0] for name, layer in lora.items()}
    alphas = {name: _plain(_peft_alpha(layer)) for name, layer in lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    configs = [layer.config for layer in lora.values()]
    inits = {config.init for config in configs}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _target_modules(model, names),
        "exclude_modules": None,
        "lora_dropout": configs[0].dropout,
        "fan_in_fan_out": any(is_hf_conv1d(layer.base_layer) for layer in lora.values()),
        "bias": "none",
        "use_rslora": configs[0].rslora,
        "modules_to_save": None,
        "init_lora_weights": "pissa" if inits == {"pissa"} else "gaussian" if inits == {"gaussian"} else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {_pattern_key(n, names): ranks[n] for n in names if ranks[n] != r},
        "alpha_pattern": {_pattern_key(n, names): alphas[n] for n in names if alphas[n] != alpha},
        "use_dora": False,
        "lora_bias": False,
    }


def _peft_modules(keys: list[str], source: str | Path) -> dict[str, dict[str, str]]:
    """PEFT's tensor keys grouped by module: ``{module: {"lora_A.weight": key, …}}``."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        suffix = next((s for s in PEFT_TENSORS if key.endswith("." + s)), None)
        if not key.startswith(PEFT_PREFIX) or suffix is None:
            raise ValueError(f"{source}: tensor {key!r} is not a LoRA factor ({PEFT_PREFIX}<module>.<"
                             f"{'|'.join(PEFT_TENSORS)}>); lowrank reads plain LoRA adapters only (no DoRA, biases "
                             "or saved modules)")
        modules.setdefault(key[len(PEFT_PREFIX):-len(suffix) - 1], {})[suffix] = key
    for name, parts in modules.items():
        if set(parts) not in ({"lora_A.weight", "lora_B.weight"}, {"lora_embedding_A", "lora_embedding_B"}):
            raise ValueError(f"{source}: the LoRA of module {name!r} has the tensors {sorted(parts)}, not one A and "
                             "one B")
    return modules


def read_peft_config(directory: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA adapter, refused if it uses what lowrank's LoRA does not have."""
    path = directory / PEFT_CONFIG_NAME
    config = _read_json(path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path}: peft_type {peft_type!r} is not supported: lowrank.adapters reads PEFT's LoRA "
                         "adapters (peft_type 'LORA') and its own format")
    unsupported = [f"{key}={config[key]!r}" for key in PEFT_UNSUPPORTED if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in PEFT_BASE_CHANGING_INITS:
        unsupported.append(f"init_lora_weights={init!r} (it changes the base weights)")
    if unsupported:
        raise ValueError(f"{path}: this LoRA uses {', '.join(unsupported)}, which lowrank.adapters does not have")
    return config


def _peft_specs(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], source: Path) -> list[_Spec]:
    """One LoRA spec per module with tensors in the file, ranks and alphas from the config's patterns."""
    init = config.get("init_lora_weights", True)
    pissa = isinstance(init, str) and init.lower().startswith("pissa")
    gaussian = isinstance(init, str) and init.lower() == "gaussian"
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    specs = []
    for name, parts in _peft_modules(list(shapes), source).items():
        first = parts.get("lora_A.weight") or parts["lora_embedding_A"]
        rank = _pattern_value(rank_pattern, name, config.get("r", 8))
        if shapes[first][0] != rank:
            raise ValueError(f"{source}: tensor {first!r} has rank {shapes[first][0]}, but adapter_config.json gives "
                             f"r={rank!r} for module {name!r}")
        try:
            lora = LoRA(rank=rank, alpha=_pattern_value(alpha_pattern, name, config.get("lora_alpha", 8)),
                        dropout=config.get("lora_dropout", 0.0), rslora=config.get("use_rslora", False),
                        init="pissa" if pissa else "gaussian" if gaussian else "default")
        except ValueError as error:
            raise ValueError(f"{source}: the LoRA of module {name!r}: {error}") from error
        specs.append(_Spec(name, lora, peft=True))
    if not specs:
        raise ValueError(f"{source} holds no LoRA tensor")
    return specs


# ----------------------------------------------------------------------------- files


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def adapter_format(directory: str | Path) -> str:
    """``"lowrank"`` or ``"peft"``: which format the adapter directory holds (a FileNotFoundError if neither)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    if (directory / PLAN_NAME).is_file():
        return "lowrank"
    if (directory / PEFT_CONFIG_NAME).is_file():
        return "peft"
    raise FileNotFoundError(f"{directory} holds neither {PLAN_NAME} (lowrank.adapters.save) nor {PEFT_CONFIG_NAME} "
                            "(PEFT's save_pretrained)")


def _weights_path(directory: Path, kind: str) -> Path:
    """The tensor file of an adapter directory of format ``kind``."""
    if kind == "lowrank":
        path = directory / WEIGHTS_NAME
    else:
        path = next((directory / n for n in PEFT_WEIGHTS_NAMES if (directory / n).is_file()),
                    directory / PEFT_WEIGHTS_NAMES[0])
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the adapter directory {directory} has no tensors")
    return path


def read_plan(directory: str | Path) -> dict[str, Any]:
    """The ``lowrank_adapters.json`` of an adapter directory, checked."""
    path = Path(directory) / PLAN_NAME
    plan = _read_json(path)
    if plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("adapters"), dict) or not plan["adapters"]:
        raise ValueError(f"{path} is not a lowrank adapter plan (no 'format': {PLAN_FORMAT!r} and 'adapters')")
    return plan


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a ``.safetensors`` file, read from its header."""
    if path.suffix != ".safetensors":
        return {key: tuple(t.shape) for key, t in read_state_dict(path).items()}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {path}: truncated or not a safetensors file ({error})") from error


def save(model: nn.Module, directory: str | Path, format: str = "lowrank", *, overwrite: bool = False) -> Path:
    """Write the adapters of ``model`` (not its base weights) to ``directory``.

    Parameters
    ----------
    model : nn.Module
        A model with adapters (:func:`lowrank.adapters.add`), merged or not.
    directory : str or Path
        The directory to create; refused if it exists, unless ``overwrite``.
    format : {"lowrank", "peft"}
        ``"lowrank"``: ``lowrank_adapters.json`` (per adapted layer its
        adapter class, config, ranks, scale and base layer) and
        ``lowrank_adapters.safetensors``; every adapter. ``"peft"``:
        ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT's
        ``save_pretrained`` writes them, for LoRA that PEFT can represent
        (see :func:`peft_config`).
    overwrite : bool
        Replace an existing ``directory``.

    Returns
    -------
    Path
        The directory written (atomically: an interrupted save leaves nothing).

    Raises
    ------
    ValueError
        If the model has no adapter, or (``"peft"``) an adapter has no PEFT
        equivalent (named, with the reason).
    FileExistsError
        If ``directory`` exists and ``overwrite`` is False.

    Notes
    -----
    A PiSSA adapter is saved without its residual base: :func:`load` (and
    PEFT, told ``init_lora_weights="pissa"``) recomputes it from the original
    base weights, so load it into the original model. :func:`lowrank.save`
    saves a whole model with its adapters and residuals.

    Examples
    --------
    >>> import tempfile, pathlib, torch, lowrank.adapters
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> _ = lowrank.adapters.add(model, lowrank.adapters.LoRA(rank=2, alpha=4), include="0")
    >>> path = lowrank.adapters.save(model, pathlib.Path(tempfile.mkdtemp()) / "adapter", format="peft")
    >>> sorted(p.name for p in path.iterdir())
    ['adapter_config.json', 'adapter_model.safetensors']
    >>> fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> lowrank.adapters.load(fresh, path)
    ['0']
    >>> import shutil; shutil.rmtree(path.parent)

    """
    check_choice(format, FORMATS, "format")
    check_bool(overwrite, "overwrite")
    model = unwrap(model)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"the {type(model).__name__} has no adapter layers: call lowrank.adapters.add first")
    if format == "peft":
        config, prefix = peft_config(model), PEFT_PREFIX
        config_name, weights_name = PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAMES[0]
    else:
        config, prefix = {"format": PLAN_FORMAT, "version": __version__, "model_class": type(model).__name__,
                          "adapters": adapter_plan(model)}, ""
        config_name, weights_name = PLAN_NAME, WEIGHTS_NAME
    tensors = {f"{prefix}{name}.{key}": p.detach().cpu().contiguous()
               for name, layer in layers.items() for key, p in _adapter_tensors(layer).items()}
    with staged_directory(directory, overwrite) as staging:
        save_file(tensors, str(staging / weights_name), metadata={"format": "pt"})
        (staging / config_name).write_text(json.dumps(config, indent=2))
    return Path(directory)


def load(model: nn.Module, directory: str | Path) -> list[str]:
    """Add the adapters saved in ``directory`` to ``model`` and load their tensors, in place.

    Reads lowrank's format (``lowrank_adapters.json``) or a LoRA adapter saved
    by PEFT (``adapter_config.json`` with ``peft_type: "LORA"`` and
    ``adapter_model.safetensors``; each module's rank and alpha from
    ``rank_pattern`` and ``alpha_pattern`` as PEFT reads them). Every layer and
    tensor is checked before the model changes; then, as
    :func:`lowrank.adapters.add` does, only the adapters require gradients.
    Adapters come back unmerged; the global random state is left as it was.

    Parameters
    ----------
    model : nn.Module
        The base model the adapter was trained on (for PiSSA, the original
        one: the residual is recomputed), without adapters on those layers.
    directory : str or Path
        An adapter directory of either format.

    Returns
    -------
    list of str
        The names of the adapted layers.

    Raises
    ------
    FileNotFoundError
        If ``directory`` holds neither format, or lacks its tensor file.
    ValueError
        If the model is not the adapter's base (a layer missing or of another
        shape: the layer and both shapes are named), a tensor is missing or
        extra, or the PEFT adapter is not a plain LoRA (its ``peft_type`` or
        option is named).

    """
    model = unwrap(model)
    directory = Path(directory)
    kind = adapter_format(directory)
    weights = _weights_path(directory, kind)
    if kind == "lowrank":
        plan = read_plan(directory)
        source = directory / PLAN_NAME
        specs, prefix = [_spec_from_entry(name, entry, source) for name, entry in plan["adapters"].items()], ""
    else:
        config = read_peft_config(directory)
        specs, prefix = _peft_specs(config, _shapes(weights), weights), PEFT_PREFIX
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    specs.sort(key=lambda spec: order.get(spec.name, len(order)))  # PEFT's files list them alphabetically
    tensors = read_state_dict(weights)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        layers = _build(model, specs, directory)
        pairs = _check_tensors(layers, tensors, prefix, weights)
    except Exception:
        for parameter, flag in flags:  # the bases were frozen as the layers were built
            parameter.requires_grad_(flag)
        raise
    _install(model, layers, prepare=True)
    with torch.no_grad():
        for parameter, tensor in pairs.values():
            parameter.copy_(tensor)
    return [name for name, _ in layers]


def summary(directory: str | Path) -> dict[str, Any]:
    """What an adapter directory holds, for ``lowrank info``: its format, config and one row per adapted module.

    Each row has ``module``, ``adapter`` (the adapter class), ``rank`` (an
    int, or FLoRA's per-mode list), ``alpha`` and ``parameters`` (trainable
    parameters), read from the plan or config and the tensor file's header.
    """
    directory = Path(directory)
    kind = adapter_format(directory)
    shapes = _shapes(_weights_path(directory, kind))
    rows = []
    if kind == "lowrank":
        plan = read_plan(directory)
        counts = Counter()
        for key, shape in shapes.items():
            match = TENSOR_KEY.match(key)
            counts[match.group(1) if match else key] += math.prod(shape)
        for name, entry in plan["adapters"].items():
            spec = _spec_from_entry(name, entry, directory / PLAN_NAME)
            count = counts[name]
            ranks = entry["ranks"]
            rows.append({"module": name, "adapter": entry["class"], "rank": ranks[0] if len(ranks) == 1 else ranks,
                         "alpha": spec.config.alpha, "parameters": count})
        return {"format": "lowrank", "config": plan, "adapters": rows}
    config = read_peft_config(directory)
    for spec, (name, parts) in zip(_peft_specs(config, shapes, directory),
                                   _peft_modules(list(shapes), directory).items()):
        first = parts.get("lora_A.weight") or parts["lora_embedding_A"]
        adapter = "LoRAEmbedding" if "lora_embedding_A" in parts else "LoRAConv" if len(shapes[first]) > 2 \
            else "LoRALinear"
        rows.append({"module": name, "adapter": adapter, "rank": spec.config.rank, "alpha": spec.config.alpha,
                     "parameters": sum(math.prod(shapes[key]) for key in parts.values())})
    return {"format": "peft", "config": config, "adapters": rows}


__all__ = ["adapter_format", "adapter_plan", "attach_plan", "load", "peft_config", "save", "summary"]
