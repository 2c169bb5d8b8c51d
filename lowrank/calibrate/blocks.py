"""The repeated blocks of a model, and calibration batches that run one block from cached inputs.

Block-by-block calibration (as GPTQ and llm-compressor's sequential pipeline
do) runs the layers before the first block once, caches what the first block
receives, and then feeds each block the outputs of the one before. This module
finds the blocks generically (:func:`find_blocks`: the repeated modules of an
``nn.ModuleList``, which is how BERT, GPT-2 and Llama-style models hold their
layers), captures the first block's inputs as :class:`~lowrank.calibrate.CalibrationBatch`
objects (:func:`block_inputs`), so that every collector of
:mod:`lowrank.calibrate` runs a block as it runs a model, and runs a block
over them to get the next block's inputs (:func:`next_block_inputs`).

Two assumptions, checked where they can be: a block's first input is the
hidden states and its other inputs are the same for every block (masks,
position embeddings); a block returns the hidden states, alone or first in a
tuple.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank.calibrate.data import CalibrationBatch
from lowrank.calibrate.hooks import eval_mode


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks of a model, in forward order.

    Attributes
    ----------
    path : str
        The name of the ``nn.ModuleList`` that holds them (``"encoder.layer"``).
    names : tuple of str
        Each block's name (``"encoder.layer.0"``, ...).
    """

    path: str
    names: tuple[str, ...]

    def index_of(self, layer: str) -> int | None:
        """The index of the block that holds the layer named ``layer`` (None: outside every block)."""
        prefix = self.path + "."
        if not layer.startswith(prefix):
            return None
        index = layer[len(prefix):].partition(".")[0]
        return int(index) if index.isdigit() and int(index) < len(self.names) else None


def find_blocks(model: nn.Module, layers: Sequence[str]) -> Blocks | None:
    """The ``nn.ModuleList`` of at least two modules of one class that holds the most of ``layers``.

    Parameters
    ----------
    model : nn.Module
        The model.
    layers : sequence of str
        Names of the layers to be compressed.

    Returns
    -------
    Blocks or None
        None when no such list holds a layer of ``layers`` in two or more of its blocks.

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate.blocks import find_blocks
    >>> model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)]))
    >>> find_blocks(model, ["0.0", "0.1", "0.2"]).names
    ('0.0', '0.1', '0.2')

    """
    best, best_count = None, 0
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if not path or len({type(child) for child in module}) != 1:  # a bare ModuleList has no forward to run
            continue
        blocks = Blocks(path, tuple(f"{path}.{i}" for i in range(len(module))))
        holding = {blocks.index_of(name) for name in layers} - {None}
        count = sum(blocks.index_of(name) is not None for name in layers)
        if len(holding) >= 2 and count > best_count:
            best, best_count = blocks, count
    return best


def _same_input(a: Any, b: Any) -> bool:
    """Whether two block inputs are the same: one object, equal tensors, or equal containers of them."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_input, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_input(a[key], b[key]) for key in a)
    return type(a) is type(b) and isinstance(a, (bool, int, float, str, type(None))) and a == b


def blocks_share_inputs(model: nn.Module, blocks: Blocks, batch: CalibrationBatch) -> bool:
    """Whether every block receives the same inputs but the hidden states on ``batch``, each block once.

    Not so for models whose blocks take different masks (sliding-window and
    global attention layers in turn, as in Gemma 2): those are calibrated by
    running the whole model. The blocks do not run (their weights may be on
    the meta device): stand-ins pass the hidden states on, alone or in a
    tuple; a model whose forward cannot run that way counts as not sharing.
    """
    seen: list[tuple[tuple, dict]] = []
    for as_tuple in (False, True):
        seen.clear()
        with replayed_blocks(model, blocks, None, as_tuple):
            stand_ins = model.get_submodule(blocks.path)
            handles = [stand_in.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args[1:], kwargs)),
                                                          with_kwargs=True) for stand_in in stand_ins]
            try:
                with eval_mode(model), torch.no_grad():
                    batch.run(model)
            except Exception:  # the model needs what a block returns in the other form (or at all)
                continue
            finally:
                for handle in handles:
                    handle.remove()
        return len(seen) == len(blocks.names) and all(_same_input(inputs, seen[0]) for inputs in seen[1:])
    return False


class _BlockReachedError(Exception):
    """Raised by a hook to stop the model's forward pass when the first block is about to run."""


def _without_caches(value: Any) -> Any:
    """``value``, or None for a key/value cache object (a block re-run from cached inputs must not append to one)."""
    return None if type(value).__name__.endswith("Cache") else value


def block_inputs(model: nn.Module, block: nn.Module, calibration: Sequence[CalibrationBatch]) -> list[CalibrationBatch]:
    """What ``block`` receives on each calibration batch, as batches that run the block itself.

    The model runs (in eval mode, without gradients) only up to the block.
    Key/value cache objects among the inputs are replaced by None and
    ``use_cache`` by False, so that running a block again changes nothing.
    Each batch keeps its ``token_mask``.

    Raises
    ------
    ValueError
        If the block does not run on a batch, or its first input is not a tensor.
    """
    captured: list[tuple[tuple, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _BlockReachedError

    inputs = []
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with eval_mode(model), torch.no_grad():
            for index, batch in enumerate(calibration):
                try:
                    batch.run(model)
                except _BlockReachedError:
                    pass
                if len(captured) != index + 1:
                    raise ValueError(f"calibration batch {index}: the model's forward never ran its first block")
                args, kwargs = captured[-1]
                args = tuple(_without_caches(value) for value in args)
                kwargs = {key: _without_caches(value) for key, value in kwargs.items()}
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
                if not args or not isinstance(args[0], torch.Tensor):
                    raise ValueError("block-by-block calibration needs the hidden states as a block's first "
                                     f"positional input; the first block got {[type(a).__name__ for a in args]}")
                inputs.append(CalibrationBatch(args, kwargs, batch.token_mask))
    finally:
        handle.remove()
    return inputs


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returned: the output itself, or the first element of a tuple or list."""
    hidden = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"a block returned {type(output).__name__}, not hidden states (a tensor, or a tuple "
                         "starting with one)")
    return hidden


def next_block_inputs(block: nn.Module, inputs: Sequence[CalibrationBatch]) -> tuple[list[CalibrationBatch], bool]:
    """The inputs of the block after ``block`` (each batch's hidden states replaced by ``block``'s outputs on it).

    Also says whether ``block`` returned tuples (as blocks of transformers 4 do).
    """
    outputs, as_tuple = [], False
    with eval_mode(block), torch.no_grad():
        for batch in inputs:
            output = batch.run(block)
            as_tuple = isinstance(output, (tuple, list))
            outputs.append(CalibrationBatch((block_output(output), *batch.args[1:]), batch.kwargs, batch.token_mask))
    return outputs, as_tuple


class _StandIn(nn.Module):
    """Stands in for a block: returns its hidden states unchanged, or (the last block) the cached outputs in turn.

    The result comes alone or as a 1-tuple, as the block returned it.
    """

    def __init__(self, outputs: Sequence[torch.Tensor] | None, as_tuple: bool) -> None:
        super().__init__()
        self.outputs, self.as_tuple = outputs, as_tuple
        self.calls = 0

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor]:
        if self.outputs is not None:
            hidden = self.outputs[self.calls % len(self.outputs)]
            self.calls += 1
        return (hidden,) if self.as_tuple else hidden


@contextmanager
def replayed_blocks(model: nn.Module, blocks: Blocks, outputs: Sequence[torch.Tensor] | None, as_tuple: bool
                    ) -> Iterator[None]:
    """Within the context, ``model``'s blocks are skipped and the last one returns ``outputs``, one per call.

    A full forward pass then costs the layers outside the blocks only, which is
    how the layers after the last block (a pooler) are calibrated on the
    blocks' cached outputs. The batches must run in the order of ``outputs``,
    each forward once; ``as_tuple``: the blocks return tuples. Without
    ``outputs`` every block passes its hidden states on.
    """
    module_list = model.get_submodule(blocks.path)
    originals = list(module_list)
    for index in range(len(originals)):
        module_list[index] = _StandIn(outputs if index == len(originals) - 1 else None, as_tuple)
    try:
        yield
    finally:
        for index, original in enumerate(originals):
            module_list[index] = original
