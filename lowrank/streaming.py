"""Compress a checkpoint larger than memory: one block at a time, read from its shards and written to new ones.

:func:`compress_checkpoint` is :func:`lowrank.compress` for a Hugging Face
checkpoint directory (sharded safetensors with ``model.safetensors.index.json``,
or one ``model.safetensors``) that need not fit in memory. The model is built
with its parameters on the meta device (:func:`lowrank.sharded.empty_model`);
the layers outside the repeated blocks (embeddings, final norm, head, pooler)
are loaded once; then each block is loaded, compressed, written to its own
output shard and freed. With calibration data, the block-by-block pipeline of
:mod:`lowrank.data_aware` runs with the blocks streamed twice: a first pass of
the dense blocks gathers each layer's spectrum for the rank allocation, the
second compresses them in order. Peak memory is about the layers outside the
blocks, one dense block (two with the refit's dense copy), its compressed
form, and the calibration hidden states.

Allocations that backpropagate through the whole model (``"fisher"``,
``"sensitivity"``) cannot run one block at a time: with a ratio, streaming
spends it with ``"energy"`` (the default here) or ``"uniform"``. Healing, which
trains the whole model, is not available either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank import __version__
from lowrank.calibrate import CalibrationBatch, collect_input_statistics
from lowrank.calibrate.blocks import (
    Blocks,
    block_inputs,
    blocks_share_inputs,
    find_blocks,
    next_block_inputs,
    replayed_blocks,
)
from lowrank.compress import _calibrated_row, _configs, _factorize_layer, _policy, _settings
from lowrank.data_aware import (
    LOW_RANK,
    CalibrationConfig,
    LinearPlan,
    SequentialRun,
    choose_ranks,
    device_of,
    final_plans,
    forward_calls,
    layer_groups,
    layer_spectrum,
    spread_spectra,
    summed_statistics,
)
from lowrank.distributed import barrier, local_share, object_from, world
from lowrank.io import PLAN_NAME, copy_tokenizer_files, plan_of, staged_directory
from lowrank.nn import resolve_methods
from lowrank.nn.surgery import swap_modules
from lowrank.rank import RankPolicy
from lowrank.report import CompressionReport, LayerReport
from lowrank.sharded import CheckpointReader, ShardWriter, empty_model, materialize, release, return_free_memory
from lowrank.targets import Target, Targets

STREAMED_ALLOCATIONS = ("uniform", "energy")


def compress_checkpoint(
    source: str | Path,
    output: str | Path,
    ratio: float | None = None,
    *,
    rank: int | RankPolicy | None = None,
    energy: float | None = None,
    method: str | dict[str, str] = "auto",
    targets: Targets | None = None,
    calibration: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    **shortcuts: Any,
) -> CompressionReport:
    """Compress the checkpoint directory ``source`` into ``output``, one block in memory at a time.

    Parameters
    ----------
    source : str or Path
        A Hugging Face checkpoint directory: ``config.json`` and sharded
        safetensors (``model.safetensors.index.json``) or ``model.safetensors``.
    output : str or Path
        The directory to write: sharded safetensors with their index,
        ``lowrank.json`` (plan and report), ``config.json`` and the tokenizer
        files. Written to a temporary directory renamed at the end, so an
        interrupted or failed run leaves no ``output``.
    ratio, rank, energy, method, targets
        As in :func:`lowrank.compress`.
    calibration : optional
        As in :func:`lowrank.compress` (texts need ``tokenizer=``), except that
        it must be batches (not a callable), and ``allocation`` with a ratio is
        ``"energy"`` by default and may be ``"uniform"``; healing is not
        available. With ``whiten=False`` each layer's reported output error is
        measured on the inputs it receives in the compressed model.
    overwrite : bool
        Replace an existing ``output``.
    progress : bool
        Show progress bars.
    **shortcuts
        The keyword shortcuts of :func:`lowrank.compress` (``include=``,
        ``allocation=``, ``tokenizer=``, ...).

    Returns
    -------
    CompressionReport
        One row per targeted layer, as :func:`lowrank.compress` gives; also
        stored in ``output/lowrank.json``. ``lowrank.load(output)`` reads the
        result shard by shard.

    Raises
    ------
    FileExistsError
        If ``output`` exists and ``overwrite`` is False.
    FileNotFoundError, ValueError
        If a shard is missing or truncated, or a tensor is missing (the shard
        and the tensor are named); if the model has no repeated blocks; if the
        allocation needs the whole model.

    """
    if Path(output).exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True to replace it")
    policy = _policy(ratio, rank, energy)
    budget = rank is None and energy is None
    targets, calibrated, heal = _configs(targets, calibration, None, shortcuts)
    if heal.enabled:
        raise ValueError("healing trains the whole model at once: it is not available when streaming")
    calibrated = _streamed_config(calibrated, budget)
    methods = resolve_methods(method, targets.kinds)
    reader = CheckpointReader(source)
    model = empty_model(source)
    selected = targets.select(model)
    blocks = find_blocks(model, [target.name for target in selected])
    if blocks is None:
        raise ValueError(f"streaming compresses one block at a time, but {source} has no repeated blocks holding "
                         "the targeted layers (an nn.ModuleList of modules of one class); use lowrank.compress")
    report = CompressionReport(settings={
        **_settings(policy, rank, energy, methods, targets, calibrated, heal),
        "streamed": {"blocks": blocks.path, "count": len(blocks.names)},
    })
    materialize(model, "", reader, exclude=blocks.names)
    _check_streamable(model, blocks, selected, calibrated)
    barrier()  # every rank has checked that the output does not exist before rank 0 can write it
    rows: dict[str, LayerReport] = {}
    calibrated_layers: dict[str, nn.Module] = {}
    plain: list[Target] = []
    for target in selected:
        if target.head:
            rows[target.name] = LayerReport.dense(target.name, target.module, skip_reason="output head")
        elif calibrated is not None and methods[target.kind] is LOW_RANK:
            calibrated_layers[target.name] = target.module
        else:
            plain.append(target)

    writing = world()[0] == 0  # under torch.distributed, rank 0 writes
    with staged_directory(output, overwrite) if writing else contextlib.nullcontext() as staging:
        writer = ShardWriter(staging) if writing else None

        def start_block(index: int) -> None:
            materialize(model, blocks.names[index], reader)

        def finish_block(index: int, plans: dict[str, LinearPlan]) -> None:
            """Factorize the block's other targets, record its rows, write it, free it and its dense layers."""
            inside = [target for target in plain if blocks.index_of(target.name) == index]
            _factorize_plainly(model, inside, methods, policy, rows)
            for name, plan in plans.items():
                if blocks.index_of(name) == index and plan.module is not None:
                    rows[name] = _calibrated_row(plan, calibrated_layers[name])
                    release(calibrated_layers[name])
            name = blocks.names[index]
            block = model.get_submodule(name)
            if writer is not None:
                writer.write(_unique_tensors({f"{name}.{key}": value for key, value in block.state_dict().items()}))
            for module in (block, *(target.module for target in inside)):
                release(module)
            return_free_memory()

        if calibrated is None:
            for index in tqdm(range(len(blocks.names)), desc="lowrank.compress (streamed)", unit="block",
                              disable=not progress):
                start_block(index)
                finish_block(index, {})
        else:
            plans = _compress_calibrated(model, blocks, reader, calibrated_layers, calibrated, policy, budget,
                                         progress, start_block, finish_block)
            for plan in plans:  # those after the blocks, and those left dense; every row gets its spectrum
                if plan.name not in rows:
                    rows[plan.name] = _calibrated_row(plan, calibrated_layers[plan.name])
                rows[plan.name].record_spectrum(plan.spectrum)
        _factorize_plainly(model, [t for t in plain if blocks.index_of(t.name) is None], methods, policy, rows)
        report.layers = [rows[target.name] for target in selected]
        if writer is not None:
            prefixes = tuple(f"{name}." for name in blocks.names)
            writer.write(_unique_tensors({key: value for key, value in model.state_dict().items()
                                          if not key.startswith(prefixes)}))
            writer.finish()
            plan = {"format": "lowrank", "version": __version__, "model_class": type(model).__name__,
                    "modules": plan_of(model), "adapters": {}, "report": report.to_dict()}
            (staging / PLAN_NAME).write_text(json.dumps(plan, indent=1))
            model.config.save_pretrained(staging)
            copy_tokenizer_files(Path(source), staging)
    barrier()
    return report


def _check_streamable(model: nn.Module, blocks: Blocks, selected: list[Target],
                      calibrated: CalibrationConfig | None) -> None:
    """Refuse what one block at a time would compress wrongly: a target before the blocks, blocks fed differently.

    Blocks must receive the same inputs but the hidden states (not so with
    sliding-window and global attention layers in turn): checked on the first
    calibration batch with the blocks skipped, so nothing is loaded.
    """
    first_block = blocks.names[0]
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}  # as a rule, forward order
    for target in selected:
        if blocks.index_of(target.name) is None and not target.head and order[target.name] < order[first_block]:
            raise ValueError(f"layer {target.name!r} runs before the first block {first_block!r}: streaming "
                             "compresses the blocks first, on the outputs of the dense layers before them; exclude it "
                             "or use lowrank.compress")
    if calibrated is not None and not blocks_share_inputs(model, blocks, calibrated.data[0]):
        raise ValueError(f"the blocks of {blocks.path!r} receive different inputs besides the hidden states "
                         "(attention masks or position inputs that change from block to block), which streaming "
                         "cannot replay from the first block's; use lowrank.compress")


def _streamed_config(config: CalibrationConfig | None, budget: bool) -> CalibrationConfig | None:
    """The calibration config with its streamed allocation recorded (``"energy"`` for a budget by default)."""
    if config is None:
        return None
    if config.runs_itself:
        raise ValueError("streaming runs one block at a time from cached inputs: give calibration texts or "
                         "batches, not a callable")
    allocation = config.allocation or ("energy" if budget else "uniform")
    if allocation not in STREAMED_ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} backpropagates through the whole model, which streaming never "
                         f"holds: use one of {', '.join(map(repr, STREAMED_ALLOCATIONS))} (the default is 'energy')")
    return dataclasses.replace(config, allocation=config.allocation_for(budget) if config.allocation else allocation)


def _factorize_plainly(model: nn.Module, targets: list[Target], methods: dict, policy: RankPolicy,
                       rows: dict[str, LayerReport]) -> None:
    """Factorize ``targets`` each on its own (no calibration), swapping them into ``model``; their rows."""
    replacements = []
    for target in targets:
        row, factorized = _factorize_layer(target, methods[target.kind], policy)
        rows[target.name] = row
        if factorized is not None:
            replacements.append((target.name, factorized))
    swap_modules(model, replacements)


def _compress_calibrated(
    model: nn.Module, blocks: Blocks, reader: CheckpointReader, layers: dict[str, nn.Module],
    config: CalibrationConfig, policy: RankPolicy, budget: bool, progress: bool, start_block, finish_block,
) -> list[LinearPlan]:
    """Data-aware compression of ``layers`` with the blocks streamed: a dense pass for the ranks, then the pipeline."""
    calibration, _ = local_share(config.data)  # under torch.distributed, this process's share of the batches
    order, spectra = _dense_pass(model, blocks, reader, layers, calibration, config, progress)
    layers = {name: layers[name] for name in order}
    ranks = choose_ranks(layers, spectra, ratio=policy.fraction if budget else None,
                         policy=None if budget else policy, allocation=config.allocation)
    run = SequentialRun(model, layers, ranks, config, {}, {})  # each group gathers its statistics in its turn
    run.blockwise(blocks, layer_groups(order), calibration, progress, on_block_start=start_block,
                  on_block_end=lambda index: finish_block(index, run.plans))
    reason = ("no rank below break-even is worth its parameters within the budget" if budget
              else f"{policy} gives no rank from 1 to below break-even")
    return final_plans(run.plans, order, spectra, reason)


def _dense_pass(
    model: nn.Module, blocks: Blocks, reader: CheckpointReader, layers: dict[str, nn.Module],
    calibration: Sequence[CalibrationBatch], config: CalibrationConfig, progress: bool,
) -> tuple[list[str], dict]:
    """Each block loaded in turn, run on the dense hidden states: the layers' forward order and spectra.

    Layers after the last block run with the blocks replaced by their cached outputs.
    """
    device = config.device
    inputs = [batch.to(device) for batch in block_inputs(model, model.get_submodule(blocks.names[0]), calibration)]
    order: list[str] = []
    spectra: dict = {}
    as_tuple = False
    for index, name in enumerate(tqdm(blocks.names, desc="lowrank.compress (streamed, dense pass)", unit="block",
                                      disable=not progress)):
        materialize(model, name, reader)
        block = model.get_submodule(name)
        block.to(device or device_of(block))
        inner = {full[len(name) + 1:]: layer for full, layer in layers.items() if blocks.index_of(full) == index}
        if inner:
            calls = object_from(forward_calls(block, inner, inputs))  # rank 0's order: the same on every rank
            if any(count != 1 for count in calls.values()):
                raise ValueError(f"block {name!r}: a layer runs {max(calls.values())} times per forward (or never); "
                                 "streaming needs each layer to run once")
            statistics = summed_statistics(collect_input_statistics(block, {key: inner[key] for key in calls},
                                                                    inputs))
            found = spread_spectra({key: inner[key] for key in calls},
                                   partial(_spectrum_from, statistics, config))
            order += [f"{name}.{key}" for key in found]
            spectra.update({f"{name}.{key}": value for key, value in found.items()})
        inputs, as_tuple = next_block_inputs(block, inputs)
        release(block)
        return_free_memory()
    after = {full: layer for full, layer in layers.items() if blocks.index_of(full) is None}
    if after:
        outputs = [batch.args[0].to(device_of(model)) for batch in inputs]
        with replayed_blocks(model, blocks, outputs, as_tuple):  # each context replays from the first batch
            calls = object_from(forward_calls(model, after, calibration))
        with replayed_blocks(model, blocks, outputs, as_tuple):
            statistics = summed_statistics(collect_input_statistics(model, after, calibration))
        found = spread_spectra({full: after[full] for full in calls},
                               partial(_spectrum_from, statistics, config))
        order += found
        spectra.update(found)
    return order, spectra


def _spectrum_from(statistics: dict, config: CalibrationConfig, name: str, layer: nn.Module) -> torch.Tensor:
    """The spectrum of the layer ``name`` from its input ``statistics``, which are dropped (no longer needed)."""
    return layer_spectrum(layer, config.whiten, statistics.pop(name), shrinkage=config.shrinkage)


def _unique_tensors(state: dict) -> dict:
    """``state`` with each shared tensor (tied weights) kept once, under its first name."""
    seen: set[tuple[int, int]] = set()
    unique = {}
    for key, value in state.items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset())
        if value.numel() == 0 or identity not in seen:  # empty tensors all have data pointer 0
            seen.add(identity)
            unique[key] = value
    return unique
