"""Input statistics of linear layers: Gram matrices, channel magnitudes, and cross moments between two models.

Collected with forward pre-hooks (see :mod:`lowrank.calibrate.hooks`) in
float64, one ``features x features`` matrix per layer whatever the amount of
calibration data, skipping the rows of padding positions, with the model in
eval mode; every hook is removed before returning, also when the model raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from lowrank.calibrate.data import Calibration, CalibrationBatch, check_calibration, progress_bar, run_calibration
from lowrank.calibrate.hooks import (
    BatchMask,
    InputWatcher,
    RowAccumulator,
    check_layers,
    counted_rows,
    declared_features,
    eval_mode,
    no_input_error,
)


@dataclass(frozen=True, eq=False)
class InputStatistics:
    """First and second moments of one layer's inputs over the counted calibration rows.

    Attributes
    ----------
    gram : torch.Tensor
        ``(in, in)`` float64, ``sum_t x_t x_t^T`` over the counted rows ``x_t``
        (``X^T X`` for the ``(count, in)`` matrix of rows).
    abs_sum : torch.Tensor
        ``(in,)`` float64, ``sum_t |x_t|`` (channel magnitudes, for ASVD).
    count : int
        Number of rows (tokens) counted.

    """

    gram: torch.Tensor
    abs_sum: torch.Tensor
    count: int

    @property
    def in_features(self) -> int:
        """The layer's input size."""
        return self.gram.shape[0]

    @property
    def abs_mean(self) -> torch.Tensor:
        """``(in,)`` float64 mean absolute input per channel, ``abs_sum / count``."""
        return self.abs_sum / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """``(in, in)`` float64 mean of ``x x^T``, ``gram / count``."""
        return self.gram / max(self.count, 1)


def collect_input_statistics(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Calibration,
    *,
    stop_early: bool = False,
    progress: bool = False,
) -> dict[str, InputStatistics]:
    """Gram matrices and channel magnitudes of the inputs of linear layers, over a calibration set.

    A forward pre-hook on each layer takes its first input ``x`` of shape
    ``(..., in_features)``, flattens the leading dimensions into rows, drops the
    rows of padding positions (see :func:`counted_rows`) and accumulates
    ``sum x x^T`` and ``sum |x|`` in float64.

    Parameters
    ----------
    model : nn.Module
        The model the calibration runs; it runs in eval mode (dropout off) and
        every submodule's mode is restored afterwards.
    layers : mapping of str to nn.Module
        The layers to watch, by name (names are used in results and errors):
        ``nn.Linear``, Hugging Face ``Conv1D``, or any module whose first input
        ends in its feature dimension (a :class:`~lowrank.nn.LowRankLinear`).
    calibration : sequence of CalibrationBatch, or callable
        See :func:`run_calibration`; runs under ``torch.no_grad()``.
    stop_early : bool
        Abandon each forward pass as soon as every layer has received its
        input (the rest of the model is not needed). Only for batches (not a
        callable), and only right when each layer runs once per forward pass.
    progress : bool
        Show a progress bar over the batches.

    Returns
    -------
    dict of str to InputStatistics
        One entry per layer, in the order of ``layers``, on the device of the
        layer's inputs.

    Raises
    ------
    ValueError
        If a layer received no input during calibration, or only padding rows,
        or an input whose last dimension is not its ``in_features``.

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate import calibration_batches, collect_input_statistics
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> stats = collect_input_statistics(model, {"0": model[0]}, calibration_batches([torch.randn(5, 4)]))
    >>> stats["0"].gram.shape, stats["0"].count
    (torch.Size([4, 4]), 5)

    """
    check_layers(layers)
    check_calibration(calibration, needs_batches="stop_early" if stop_early else None)
    batch_mask = BatchMask()
    accumulators = {
        name: RowAccumulator(name, declared_features(layer, "in"), abs_sum=True) for name, layer in layers.items()
    }

    def on_input(name: str, x: torch.Tensor) -> None:
        accumulators[name].calls += 1
        accumulators[name].add(counted_rows(x, batch_mask.mask), "input")

    watcher = InputWatcher(stop_early)
    with ExitStack() as hooks:
        for name, layer in layers.items():
            hooks.enter_context(watcher.watch(name, layer, on_input))
        with eval_mode(model):
            if stop_early:
                with torch.no_grad():
                    for batch in progress_bar(calibration, progress):
                        batch_mask.set(batch)
                        watcher.run(model, batch)
            else:
                run_calibration(model, calibration, on_batch=batch_mask.set, progress=progress)
    for acc in accumulators.values():
        acc.check_ran()
        acc.check_counted()
    return {name: InputStatistics(acc.gram, acc.abs_sum, acc.count) for name, acc in accumulators.items()}


def collect_paired_statistics(
    model: nn.Module,
    reference: nn.Module,
    names: Sequence[str],
    calibration: Sequence[CalibrationBatch],
    *,
    reference_calibration: Sequence[CalibrationBatch] | None = None,
    stop_early: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input Gram matrices of layers of ``model`` and their cross moments with the same layers of ``reference``.

    For the layer called ``name`` in both models (``model`` partly compressed,
    ``reference`` the dense original), with ``x_c`` its input in ``model`` and
    ``x_d`` in ``reference`` on the same token: ``G = sum x_c x_c^T`` and
    ``C = sum x_d x_c^T``, the statistics of
    :func:`lowrank.calibrate.refit_second` (float64, padding rows left out).
    Each batch runs through ``reference`` first, then ``model``.

    Parameters
    ----------
    model, reference : nn.Module
        Two models with the same layer names.
    names : sequence of str
        The linear layers (``nn.Linear``, Hugging Face ``Conv1D`` or factorized).
    calibration : sequence of CalibrationBatch
        The batches.
    reference_calibration : sequence of CalibrationBatch, optional
        The batches ``reference`` runs instead, one per batch of
        ``calibration`` (when the two are blocks fed by their own models, the
        compressed and the dense one); by default ``calibration``.
    stop_early : bool
        Abandon each forward pass once every layer has received its input
        (see :func:`collect_input_statistics`).

    Returns
    -------
    dict of str to (torch.Tensor, torch.Tensor)
        ``(G, C)`` per layer.

    Examples
    --------
    >>> import copy, torch
    >>> from lowrank.calibrate import calibration_batches, collect_paired_statistics
    >>> reference = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    >>> model = copy.deepcopy(reference)
    >>> gram, cross = collect_paired_statistics(model, reference, ["2"], calibration_batches([torch.randn(5, 4)]))["2"]
    >>> gram.shape, bool(torch.allclose(gram, cross))
    (torch.Size([6, 6]), True)

    """
    check_calibration(calibration, needs_batches="collect_paired_statistics")
    batch_mask = BatchMask()
    dense_rows: dict[str, torch.Tensor] = {}
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def rows_of(x: torch.Tensor) -> torch.Tensor:
        return counted_rows(x, batch_mask.mask).detach().double()

    def on_dense_input(name: str, x: torch.Tensor) -> None:
        dense_rows[name] = rows_of(x)

    def on_input(name: str, x: torch.Tensor) -> None:
        rows = rows_of(x)
        if name not in dense_rows or dense_rows[name].shape != rows.shape:
            raise ValueError(f"layer {name!r} received inputs of different shapes in the two models")
        if name not in sums:
            sums[name] = (rows.new_zeros(rows.shape[1], rows.shape[1]), rows.new_zeros(rows.shape[1], rows.shape[1]))
        gram, cross = sums[name]
        gram.addmm_(rows.T, rows)
        cross.addmm_(dense_rows.pop(name).T, rows)

    watcher = InputWatcher(stop_early)
    with ExitStack() as hooks:
        for name in names:
            hooks.enter_context(watcher.watch(name, reference.get_submodule(name), on_dense_input))
            hooks.enter_context(watcher.watch(name, model.get_submodule(name), on_input))
        references = calibration if reference_calibration is None else reference_calibration
        with eval_mode(model), eval_mode(reference), torch.no_grad():
            for batch, reference_batch in zip(calibration, references, strict=True):
                batch_mask.set(batch)
                watcher.run(reference, reference_batch)
                watcher.run(model, batch)
    missing = [name for name in names if name not in sums]
    if missing:
        raise no_input_error(missing[0])
    return {name: sums[name] for name in names}
