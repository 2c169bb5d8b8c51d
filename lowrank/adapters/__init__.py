"""Low-rank adapters: LoRA and FLoRA on dense and factorized layers, mergeable, with PEFT's conventions.

``add(model, LoRA(rank=8, alpha=16), include=["*query", "*value"])`` wraps
the targeted layers (chosen as :func:`lowrank.compress` chooses them:
``targets=``, ``include=``, ``exclude=``, ``kinds=``, ``filter_fn=``; by
default every linear layer but the output heads) in adapter layers and
freezes every other parameter; :func:`trainable_parameters` are what the
optimizer trains. :func:`merge` folds the updates into the base weights and
:func:`unmerge` restores them bit for bit; ``merge(model, safe=True)``
refuses non-finite results and leaves the model untouched; within
``with disabled(model):`` the model computes its base outputs;
:func:`merge_and_unload` puts plain layers back with the updates folded in.

:class:`LoRA` (Hu et al., 2021; PEFT's initialisation, rsLoRA scaling,
PiSSA) adapts ``nn.Linear``, Hugging Face ``Conv1D``, ``nn.Embedding`` and
``nn.Conv1d/2d/3d`` with every option (groups, dilation, stride, padding
strings and modes), merging exactly for grouped and depthwise convolutions
too. :class:`FLoRA` (Si et al., 2024) adapts linear layers and convolutions
with a Tucker update over the weight's own modes, so a kernel keeps its N-D
structure. Both train on top of the factorized modules of :mod:`lowrank.nn`;
on a :class:`~lowrank.nn.LowRankLinear` they merge exactly into a wider one.

The one primitive of each adapter is its weight delta,
:meth:`AdapterLayer.delta_weight`; merging, unmerging, disabling and
unloading are written once on top of it (:mod:`lowrank.adapters.layers`).
A LoRA layer's factors are the modules ``lora_A`` and ``lora_B`` (for
embeddings the tensors ``lora_embedding_A`` and ``lora_embedding_B``), so
``<module>.lora_A.weight`` is PEFT's ``base_model.model.<module>.lora_A.weight``.

:func:`save` writes the adapters alone, in PEFT's format (``format="peft"``:
``adapter_config.json`` and ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained`` loads) or in lowrank's own (the default,
for every adapter: a JSON plan and safetensors); :func:`load` reads either
(and LoRA adapters saved by PEFT) into a base model (:mod:`lowrank.adapters.io`).

Examples
--------
>>> import torch, lowrank.adapters
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))
>>> lowrank.adapters.add(model, lowrank.adapters.FLoRA(rank=4), kinds=("conv",))
['0']
>>> lowrank.adapters.merge(model)
['0']
>>> type(lowrank.adapters.merge_and_unload(model)[0]).__name__
'Conv2d'

"""

from lowrank.adapters.config import FLoRA, LoRA
from lowrank.adapters.io import load, save
from lowrank.adapters.layers import (
    AdapterLayer,
    FLoRAConv,
    FLoRALayer,
    FLoRALinear,
    LoRAConv,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
)
from lowrank.adapters.model import (
    adapter_layers,
    add,
    disabled,
    merge,
    merge_and_unload,
    trainable_parameters,
    unmerge,
)

__all__ = [
    "AdapterLayer",
    "FLoRA",
    "FLoRAConv",
    "FLoRALayer",
    "FLoRALinear",
    "LoRA",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "add",
    "adapter_layers",
    "disabled",
    "load",
    "merge",
    "merge_and_unload",
    "save",
    "trainable_parameters",
    "unmerge",
]
