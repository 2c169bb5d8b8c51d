"""Sharded safetensors checkpoints, read and written a few tensors at a time.

A Hugging Face checkpoint larger than memory comes as shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``).
This module reads such a directory (or a single ``model.safetensors``) tensor
by tensor with ``safetensors.safe_open`` (:class:`CheckpointReader`), builds a
model whose parameters are on the meta device so that nothing is allocated
until it is loaded (:func:`empty_model`), puts real tensors into one module
at a time and takes them out again (:func:`materialize`, :func:`release`), and
writes shards with an index (:class:`ShardWriter`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointReader:
    """The tensors of a checkpoint directory, read one at a time.

    Parameters
    ----------
    directory : str or Path
        A directory with ``model.safetensors.index.json`` and its shards, or a
        single ``model.safetensors``.

    Raises
    ------
    FileNotFoundError
        If the directory has neither, or a shard the index lists is missing
        (the message names the shard and one tensor it should hold).
    ValueError
        If the index is not valid JSON or has no ``weight_map``.

    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{index} is not a safetensors index (JSON with a 'weight_map'): {error}") from error
            self.weight_map: dict[str, str] = dict(weight_map)
        elif (self.directory / SINGLE_NAME).is_file():
            with self._open(SINGLE_NAME, "any") as handle:
                self.weight_map = dict.fromkeys(handle.keys(), SINGLE_NAME)
        else:
            raise FileNotFoundError(f"{self.directory} holds neither {INDEX_NAME} nor {SINGLE_NAME}")
        for shard in dict.fromkeys(self.weight_map.values()):
            if not (self.directory / shard).is_file():
                tensor = next(name for name, file in self.weight_map.items() if file == shard)
                raise FileNotFoundError(f"shard {self.directory / shard} is missing (it holds tensor {tensor!r}, "
                                        f"listed in {INDEX_NAME})")

    @property
    def sharded(self) -> bool:
        """Whether the checkpoint has an index (is sharded)."""
        return (self.directory / INDEX_NAME).is_file()

    @contextmanager
    def _open(self, shard: str, tensor: str) -> Iterator[Any]:
        try:
            with safe_open(str(self.directory / shard), framework="pt") as handle:
                yield handle
        except SafetensorError as error:
            raise ValueError(f"cannot read tensor {tensor!r} from shard {self.directory / shard}: truncated or not "
                             f"a safetensors file ({error})") from error

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors called ``names``, each shard opened once.

        Raises
        ------
        KeyError
            If a tensor is not in the checkpoint.
        ValueError
            If a shard is truncated or does not hold a tensor the index lists
            in it (both named).

        """
        by_shard: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"tensor {name!r} is not in the checkpoint {self.directory}")
            by_shard.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for shard, wanted in by_shard.items():
            with self._open(shard, wanted[0]) as handle:
                held = set(handle.keys())
                for name in wanted:
                    if name not in held:
                        raise ValueError(f"shard {self.directory / shard} does not hold tensor {name!r}, which "
                                         f"{INDEX_NAME} places there")
                    try:
                        tensors[name] = handle.get_tensor(name)
                    except SafetensorError as error:
                        raise ValueError(f"cannot read tensor {name!r} from shard {self.directory / shard}: "
                                         f"truncated ({error})") from error
        return tensors


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Within the context, every parameter a module registers is created on the meta device; buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(directory: str | Path) -> nn.Module:
    """A Hugging Face model built from ``directory/config.json`` with its parameters on the meta device.

    Nothing the size of a weight is allocated; buffers (position ids, rotary
    frequencies) are real, as the model computes them. Load weights with
    :func:`materialize`.
    """
    from lowrank.io import _model_from_config

    with _parameters_on_meta():
        model = _model_from_config(Path(directory))
    return model.eval()


def _parameter_slots(module: nn.Module, prefix: str = "") -> dict[int, list[tuple[nn.Module, str, str]]]:
    """Each parameter's slots, by its identity: ``(owner module, attribute, full name)``; a tied one has several."""
    slots: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for owner_name, owner in module.named_modules(prefix=prefix, remove_duplicate=False):
        for attribute, param in owner._parameters.items():
            if param is not None:
                full = f"{owner_name}.{attribute}" if owner_name else attribute
                slots.setdefault(id(param), []).append((owner, attribute, full))
    return slots


def materialize(model: nn.Module, module_name: str, reader: CheckpointReader, *, exclude: Iterable[str] = ()) -> None:
    """Load the parameters of ``model``'s submodule ``module_name`` from ``reader`` (tied copies elsewhere too).

    Parameters already real are left alone, and so are those under the
    submodules named in ``exclude``. A parameter tied to others (a tied output
    head) is read under whichever of its names the checkpoint has, and every
    slot gets the same tensor. Tensors keep the checkpoint's dtype (a bfloat16
    checkpoint stays bfloat16).

    Raises
    ------
    ValueError
        If none of a parameter's names is in the checkpoint (the message names
        them), or its shape differs from the model's.
    """
    slots = _parameter_slots(model)
    module = model.get_submodule(module_name) if module_name else model
    skipped = tuple(f"{name}." for name in exclude)
    wanted: dict[int, str] = {}
    for param in module.parameters():
        if param.device.type != "meta" or id(param) in wanted:
            continue
        names = [full for _, _, full in slots[id(param)] if not full.startswith(skipped)]
        if not names:
            continue
        stored = [name for name in names if name in reader.weight_map]
        if not stored:
            raise ValueError(f"the checkpoint {reader.directory} lacks tensor {names[0]!r}"
                             + (f" (nor its tied names {', '.join(names[1:])})" if len(names) > 1 else ""))
        wanted[id(param)] = stored[0]
    tensors = reader.read(wanted.values())
    for key, name in wanted.items():
        tensor = tensors[name]
        owner, attribute, _ = slots[key][0]
        old = owner._parameters[attribute]
        if tuple(tensor.shape) != tuple(old.shape):
            raise ValueError(f"tensor {name!r} in {reader.directory} has shape {tuple(tensor.shape)}, the model "
                             f"expects {tuple(old.shape)}")
        new = nn.Parameter(tensor, requires_grad=old.requires_grad)  # in the checkpoint's dtype, as stored
        for owner, attribute, _ in slots[key]:
            owner._parameters[attribute] = new


def release(module: nn.Module) -> None:
    """Move every parameter of ``module`` back to the meta device, freeing its memory.

    Parameters tied within ``module`` stay tied (one meta parameter for all
    their slots); slots outside ``module`` keep their tensors.
    """
    on_meta: dict[int, nn.Parameter] = {}
    for owner in module.modules():
        for attribute, param in owner._parameters.items():
            if param is not None and param.device.type != "meta":
                if id(param) not in on_meta:
                    on_meta[id(param)] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
                owner._parameters[attribute] = on_meta[id(param)]


def return_free_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    A block freed by :func:`release` leaves holes in the heap that glibc keeps;
    without this, the resident memory of a streamed run grows block after block
    although the live tensors do not (measured: about 35 MiB per block).
    """
    library = ctypes.util.find_library("c")
    if library is None:
        return
    trim = getattr(ctypes.CDLL(library), "malloc_trim", None)
    if trim is not None:
        trim(0)


class ShardWriter:
    """Writes tensors to numbered safetensors shards in a directory, then their index.

    Parameters
    ----------
    directory : Path
        Where the shards go (a staging directory; see :func:`lowrank.io.staged_directory`).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` (names not written before) as the next shard."""
        repeated = sorted(set(tensors) & set(self.weight_map))
        if repeated:
            raise ValueError(f"tensor(s) {', '.join(repeated[:3])} were written to a shard already")
        if not tensors:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file({key: value.detach().contiguous() for key, value in tensors.items()}, str(self.directory / name),
                  metadata={"format": "pt"})
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total_size += sum(value.numel() * value.element_size() for value in tensors.values())

    def finish(self) -> None:
        """Rename the shards to Hugging Face's ``model-0000i-of-0000n.safetensors`` and write the index."""
        count = len(self.files)
        renamed = {}
        for number, name in enumerate(self.files, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.directory / name).rename(self.directory / final)
            renamed[name] = final
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": {key: renamed[file] for key, file in sorted(self.weight_map.items())}}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=1))


def load_checkpoint(model: nn.Module, reader: CheckpointReader) -> None:
    """Load every tensor of ``reader`` into ``model``, one shard at a time, assigning rather than copying.

    Parameters still on the meta device get the checkpoint's tensors (so a
    model from :func:`empty_model` is never allocated twice); tied parameters
    stored once are tied again.

    Raises
    ------
    ValueError
        If the checkpoint holds a tensor the model does not have, a tensor's
        shape differs from the model's, or a parameter is left without one
        (each named).
    """
    slots = _parameter_slots(model)
    own = model.state_dict()
    unknown = [key for key in reader.weight_map if key not in own and key.removesuffix("position_ids") == key]
    if unknown:
        raise ValueError(f"{reader.directory} holds tensor(s) the model does not have: {', '.join(unknown[:5])}")
    by_shard: dict[str, list[str]] = {}
    for key, shard in reader.weight_map.items():
        if key in own:
            by_shard.setdefault(shard, []).append(key)
    for keys in by_shard.values():
        state = reader.read(keys)
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise ValueError(f"tensor {key!r} in {reader.directory / reader.weight_map[key]} has shape "
                                 f"{tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}")
        model.load_state_dict(state, strict=False, assign=True)
    for group in slots.values():
        params = [owner._parameters[attribute] for owner, attribute, _ in group]
        loaded = next((param for param in params if param.device.type != "meta"), None)
        if loaded is None:
            raise ValueError(f"{reader.directory} lacks tensor {group[0][2]!r}")
        for owner, attribute, _ in group:
            owner._parameters[attribute] = loaded
