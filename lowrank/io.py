"""Saving and loading compressed models: safetensors weights plus a ``lowrank.json`` plan.

The plan lists every factorized module by name with its class and structure
(``module.config()``), and every adapter layer of :mod:`lowrank.adapters` with
its config, so that :func:`load` can rebuild the same modules in a fresh model
before reading the tensors. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from lowrank import __version__
from lowrank.nn import FactorizedModule, link_shared_inputs, module_class
from lowrank.nn.surgery import swap_modules
from lowrank.report import CompressionReport

WEIGHTS_NAME = "model.safetensors"
PLAN_NAME = "lowrank.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
)
CHECKPOINT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pt", "pytorch_model.pt")


def plan_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every factorized module of ``model`` by name: its class name and ``config()``."""
    return {
        name: {"class": type(module).__name__, "config": module.config()}
        for name, module in model.named_modules()
        if isinstance(module, FactorizedModule)
    }


def save(
    model: nn.Module,
    directory: str | Path,
    *,
    report: CompressionReport | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a (compressed) model to ``directory``.

    Writes ``model.safetensors`` (the state dict; tied weights stored once),
    ``lowrank.json`` (the library version, the plan of factorized modules and
    the compression report if given) and, for a Hugging Face model, its
    ``config.json`` and tokenizer files: those of ``tokenizer`` if given,
    otherwise copied from the directory the model was loaded from, if any.

    Adapters of :mod:`lowrank.adapters` attached to the model are saved with
    it (their tensors in the state dict, their configs in the plan) and
    :func:`load` puts them back; they must be unmerged. PiSSA adapters keep
    their residual base weights this way. To save the adapters alone, use
    :func:`lowrank.adapters.save`.

    Everything is written to a temporary directory beside the target, which is
    renamed at the end: an interrupted save leaves no half-written directory.

    Parameters
    ----------
    model : nn.Module
        The model to save.
    directory : str or Path
        The target directory; refused if it exists, unless ``overwrite``.
    report : CompressionReport, optional
        The report :func:`lowrank.compress` returned, stored for ``lowrank info``.
    tokenizer : optional
        A Hugging Face tokenizer (anything with ``save_pretrained``).
    overwrite : bool
        Replace an existing ``directory``.

    Returns
    -------
    Path
        The directory written.

    Raises
    ------
    FileExistsError
        If ``directory`` exists and ``overwrite`` is False.
    ValueError
        If an adapter of the model is merged.

    """
    from lowrank.adapters.io import adapter_plan
    from lowrank.adapters.model import adapter_layers

    merged = [name for name, layer in adapter_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(
            f"the adapter(s) of layer(s) {', '.join(map(repr, merged))} are merged: lowrank.save stores base weights "
            "and adapters apart, so unmerge them first (lowrank.adapters.unmerge), or fold them in for good "
            "(lowrank.adapters.merge_and_unload)")
    with staged_directory(directory, overwrite) as staging:
        save_model(model, str(staging / WEIGHTS_NAME))
        plan = {
            "format": "lowrank",
            "version": __version__,
            "model_class": type(model).__name__,
            "modules": plan_of(model),
            "adapters": adapter_plan(model),
            "report": report.to_dict() if report is not None else None,
        }
        (staging / PLAN_NAME).write_text(json.dumps(plan, indent=1))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            else:
                copy_tokenizer_files(Path(str(getattr(config, "_name_or_path", "") or "")), staging)
    return Path(directory)


@contextmanager
def staged_directory(directory: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside ``directory`` to write into, renamed to ``directory`` when the block succeeds.

    If the block raises (or is interrupted) the temporary directory is removed
    and ``directory`` is left as it was: no half-written directory, ever.

    Parameters
    ----------
    directory : str or Path
        The directory to create; refused if it exists, unless ``overwrite``
        (then it is replaced once the block has succeeded).
    overwrite : bool
        Replace an existing ``directory``.

    Raises
    ------
    FileExistsError
        If ``directory`` exists and ``overwrite`` is False (before anything is written).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with staged_directory(root / "out") as staging:
    ...     _ = (staging / "a.txt").write_text("a")
    >>> sorted(p.name for p in (root / "out").iterdir())
    ['a.txt']
    >>> shutil.rmtree(root)

    """
    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    """Copy the tokenizer files of the checkpoint directory ``source`` (those it has) into ``destination``."""
    if str(source) in ("", ".") or not source.is_dir():
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)


def read_plan(directory: str | Path) -> dict[str, Any]:
    """The ``lowrank.json`` of a saved model, checked."""
    path = Path(directory) / PLAN_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a directory written by lowrank.save")
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(plan, dict) or plan.get("format") != "lowrank" or not isinstance(plan.get("modules"), dict):
        raise ValueError(f"{path} is not a lowrank plan (no 'format': 'lowrank' and 'modules')")
    return plan


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file without unpickling.

    ``.safetensors`` files are read with safetensors; ``.bin`` and ``.pt``
    files with ``torch.load(weights_only=True)``, which refuses anything but
    tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"cannot read {path}: truncated or not a checkpoint ({error})") from error
    except Exception as error:  # torch.load's unpickler raises UnpicklingError and others
        raise ValueError(f"cannot read {path} with torch.load(weights_only=True): {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors (a state dict)")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``state`` into ``model``, checking that every tensor is there with the right shape.

    Tensors the model shares (tied weights) need to appear once; extra buffers
    that a model no longer keeps (such as ``position_ids``) are ignored.
    """
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise ValueError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}"
            )
    loaded_storage = {own[k].untyped_storage().data_ptr() for k in state if k in own}
    missing = [k for k in own if k not in state and own[k].untyped_storage().data_ptr() not in loaded_storage]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{source} lacks tensor(s) the model needs: {shown}")
    unknown = [k for k in state if k not in own and k.removesuffix("position_ids") == k]
    if unknown:
        raise ValueError(f"{source} holds tensor(s) the model does not have: {', '.join(unknown[:5])}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def apply_plan(model: nn.Module, plan: dict[str, Any], source: str | Path = "the plan") -> None:
    """Replace the modules named in ``plan`` by empty factorized modules of the recorded structure, then its adapters.

    A factorized module recorded inside an adapter (``name.base_layer``) is
    put at ``name``, where the adapter recorded under ``plan["adapters"]``
    then wraps it (:func:`lowrank.adapters.io.attach_plan`).
    """
    adapted = plan.get("adapters") or {}
    replacements = []
    for name, entry in plan["modules"].items():
        parent, _, leaf = name.rpartition(".")
        target = parent if leaf == "base_layer" and parent in adapted else name
        try:
            old = model.get_submodule(target)
        except AttributeError as error:
            raise ValueError(f"the plan names module {target!r}, which the model does not have") from error
        parameter = next(old.parameters(), None)
        options = {} if parameter is None else {"device": parameter.device, "dtype": parameter.dtype}
        replacements.append((target, module_class(entry["class"])(**entry["config"], **options)))
    swap_modules(model, replacements)
    link_shared_inputs(model)
    if adapted:
        from lowrank.adapters.io import attach_plan

        attach_plan(model, adapted, source)


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a model written by :func:`save`.

    Parameters
    ----------
    directory : str or Path
        The saved directory.
    model : nn.Module, optional
        The dense model to load into (its structure must be that of the saved
        model before compression); modified in place and returned. Without it,
        a Hugging Face model is rebuilt from ``config.json`` (needs
        ``transformers``). A sharded directory (written by
        :func:`lowrank.streaming.compress_checkpoint`) is read one shard at a
        time into a model built with its parameters on the meta device, so
        nothing is allocated twice.

    Returns
    -------
    nn.Module
        The model with the plan re-applied (factorized modules, then adapters)
        and every tensor loaded, in eval mode.

    """
    from lowrank.sharded import INDEX_NAME, CheckpointReader, empty_model, load_checkpoint

    directory = Path(directory)
    plan = read_plan(directory)
    sharded = (directory / INDEX_NAME).is_file()
    if model is None:
        model = empty_model(directory) if sharded else _model_from_config(directory)
    apply_plan(model, plan, directory / PLAN_NAME)
    if sharded:
        load_checkpoint(model, CheckpointReader(directory))
    else:
        load_state(model, read_state_dict(directory / WEIGHTS_NAME), directory / WEIGHTS_NAME)
    return model.eval()


def _model_from_config(directory: Path) -> nn.Module:
    """An (untrained) Hugging Face model built from ``directory/config.json``."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory / 'config.json'} not found: pass model= to load into a model you build yourself"
        )
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        return transformers.AutoModel.from_config(config)
    return cls(config)


def load_pretrained(source: str | Path) -> nn.Module:
    """A dense Hugging Face model from a checkpoint directory, without unpickling.

    The model is built from ``config.json`` and its weights read from sharded
    safetensors (``model.safetensors.index.json``, one shard at a time), or
    else the first of ``model.safetensors``, ``pytorch_model.bin``,
    ``model.pt`` found.
    """
    from lowrank.sharded import INDEX_NAME, CheckpointReader, empty_model, load_checkpoint

    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a checkpoint directory")
    if (source / INDEX_NAME).is_file():
        model = empty_model(source)
        load_checkpoint(model, CheckpointReader(source))
        return model.eval()
    model = _model_from_config(source)
    for name in CHECKPOINT_NAMES:
        if (source / name).is_file():
            load_state(model, read_state_dict(source / name), source / name)
            return model.eval()
    raise FileNotFoundError(f"{source} holds none of {', '.join(CHECKPOINT_NAMES)}")
