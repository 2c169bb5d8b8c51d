"""Activation and gradient statistics of linear layers, collected with hooks during calibration.

Both collectors accumulate in float64, one ``features x features`` matrix per
layer (memory independent of the amount of calibration data), skip the rows of
padding positions, run the model in eval mode, and remove every hook they
registered before returning, also when the model raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank.calibrate.data import Calibration, CalibrationBatch, _check_calibration, run_calibration
from lowrank.nn import is_hf_conv1d, linear_weight

# Rows converted to float64 at a time: bounds the temporary copy, whatever the batch size.
_CHUNK_ROWS = 8192


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


class _Accumulator:
    """Running float64 ``sum_t r_t r_t^T`` (and optionally ``sum_t |r_t|``) of a layer's rows."""

    def __init__(self, name: str, features: int | None, abs_sum: bool) -> None:
        self.name, self.features, self.track_abs = name, features, abs_sum
        self.gram: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.calls = 0

    def add(self, rows: torch.Tensor, what: str) -> None:
        if self.features is None:
            self.features = rows.shape[-1]
        if rows.shape[-1] != self.features:
            raise ValueError(
                f"layer {self.name!r}: {what} of shape {tuple(rows.shape)} does not end in its "
                f"{self.features} features"
            )
        if self.gram is None:
            self.gram = torch.zeros(self.features, self.features, dtype=torch.float64, device=rows.device)
            if self.track_abs:
                self.abs_sum = torch.zeros(self.features, dtype=torch.float64, device=rows.device)
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            chunk = rows[start : start + _CHUNK_ROWS].detach().to(device=self.gram.device, dtype=torch.float64)
            self.gram.addmm_(chunk.T, chunk)
            if self.abs_sum is not None:
                self.abs_sum += chunk.abs().sum(0)
        self.count += rows.shape[0]


class _AllInputsSeenError(Exception):
    """Raised by a hook to abandon a forward pass once every watched layer has received its input."""


class _BatchState:
    """The token mask of the batch being run (None: every row counts)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def set(self, batch: CalibrationBatch) -> None:
        self.mask = batch.token_mask


def counted_rows(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The ``(rows, features)`` matrix of ``x``'s last dimension, padding rows left out.

    Parameters
    ----------
    x : torch.Tensor
        ``(..., features)``.
    token_mask : torch.Tensor or None
        Bool ``(batch, seq)``. Rows are dropped where it is False when ``x``'s
        leading dimensions are ``(batch, seq)``, or when ``x`` is 2-D with
        ``batch * seq`` rows (a flattened sequence); any other ``x`` (such as a
        pooled ``(batch, features)`` input) keeps every row.

    Returns
    -------
    torch.Tensor
        ``(rows, features)``, a view of ``x`` where no row is dropped.

    """
    if token_mask is not None:
        if tuple(x.shape[:-1]) == tuple(token_mask.shape):
            return x[token_mask.to(x.device)]
        if x.dim() == 2 and x.shape[0] == token_mask.numel() and token_mask.dim() == 2 and token_mask.shape[1] > 1:
            return x[token_mask.to(x.device).reshape(-1)]
    return x.reshape(-1, x.shape[-1])


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule of ``model`` in eval mode; restore each one's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_layers(layers: Mapping[str, nn.Module]) -> None:
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers must be a mapping from names to modules, got {type(layers).__name__}")
    if not layers:
        raise ValueError("layers is empty: name at least one layer to collect statistics of")
    for name, layer in layers.items():
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}, not an nn.Module")


def _features(layer: nn.Module, side: str) -> int | None:
    """The layer's ``in`` or ``out`` features when it declares them (None: taken from the first call)."""
    if isinstance(layer, nn.Linear) or is_hf_conv1d(layer):
        out_features, in_features = linear_weight(layer).shape
        return in_features if side == "in" else out_features
    value = getattr(layer, f"{side}_features", None)
    return value if isinstance(value, int) else None


def _layer_input(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    candidates = [*args, *kwargs.values()]
    if not candidates or not isinstance(candidates[0], torch.Tensor):
        got = type(candidates[0]).__name__ if candidates else "no input"
        raise TypeError(f"layer {name!r}: expected a tensor as its first input, got {got}")
    return candidates[0]


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
    _check_layers(layers)
    _check_calibration(calibration)
    state = _BatchState()
    accumulators = {name: _Accumulator(name, _features(layer, "in"), abs_sum=True) for name, layer in layers.items()}

    if stop_early and not isinstance(calibration, Sequence):
        raise TypeError("stop_early needs a sequence of CalibrationBatch, not a calibration callable")
    pending: set[str] = set()

    def make_hook(acc: _Accumulator) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            acc.calls += 1
            acc.add(counted_rows(_layer_input(acc.name, args, kwargs), state.mask), "input")
            pending.discard(acc.name)
            if stop_early and not pending:
                raise _AllInputsSeenError

        return hook

    def start_batch(batch: CalibrationBatch) -> None:
        state.set(batch)
        pending.update(layers)

    handles = []
    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(make_hook(accumulators[name]), with_kwargs=True))
        with eval_mode(model):
            if stop_early:
                with torch.no_grad():
                    for batch in tqdm(calibration, desc="lowrank.calibrate", unit="batch", disable=not progress):
                        start_batch(batch)
                        try:
                            batch.run(model)
                        except _AllInputsSeenError:
                            pass
            else:
                run_calibration(model, calibration, on_batch=start_batch, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    stats = {}
    for name, acc in accumulators.items():
        if acc.calls == 0:
            raise ValueError(f"layer {name!r} received no input during calibration (is it part of the model?)")
        if acc.count == 0:
            raise ValueError(f"layer {name!r} received only padding positions during calibration")
        stats[name] = InputStatistics(acc.gram, acc.abs_sum, acc.count)
    return stats


def model_output_tensor(output: Any) -> torch.Tensor:
    """The tensor a model's output stands for: the tensor itself, a sequence's first, or a mapping's main one.

    From a mapping (a Hugging Face ``ModelOutput``): ``logits``, else
    ``last_hidden_state``, else the first value that is not ``loss``; from a
    tuple or list: its first element (searched the same way).
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        values = [value for key, value in output.items() if key != "loss" and value is not None]
        if values:
            return model_output_tensor(values[0])
    elif isinstance(output, Sequence) and not isinstance(output, str) and len(output) > 0:
        return model_output_tensor(output[0])
    raise TypeError(f"cannot find the output tensor in a model output of type {type(output).__name__}")


def collect_output_fisher(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Calibration,
    *,
    loss_fn: Callable[[nn.Module, CalibrationBatch], torch.Tensor] | None = None,
    n_probes: int = 1,
    seed: int = 0,
    skip_unreached: bool = False,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Second moments of the gradients with respect to linear layers' *outputs* (output-side Fisher).

    For each layer, ``F = sum_t g_t g_t^T`` (float64, ``out x out``), summed over
    the counted output rows ``t`` (padding positions are left out as in
    :func:`collect_input_statistics`), where ``g_t`` is the gradient of a loss
    with respect to row ``t`` of the layer's output.

    The default loss needs no labels: it is the Gauss-Newton probe of the
    distance to the model's own outputs. For each batch and each of ``n_probes``
    probes, ``eps ~ N(0, I)`` of the shape of the model's output tensor ``f``
    (see :func:`model_output_tensor`; zero at padding positions) is drawn and
    ``(eps * f).sum()`` backpropagated, so ``g_t = J_t^T eps`` with ``J_t`` the
    Jacobian of ``f`` with respect to the layer's output row ``t``. The probes'
    outer products are averaged, so that ``E[F] = sum_t J_t^T J_t``, the
    Gauss-Newton matrix of ``1/2 ||f - f_dense||^2`` at the dense model.
    Consequently, for a change ``dW`` of the layer's weight and the input Gram
    matrix ``G`` over the same ``count`` rows, ``1/2 tr(dW G dW^T F) / count``
    estimates the increase of ``1/2 ||f - f_dense||^2`` summed over the
    calibration set (to second order, ignoring cross-token terms and treating
    inputs and output sensitivities as independent, as K-FAC does). The probes
    are drawn, batch after batch and probe after probe, with
    ``torch.randn(f.shape, generator=torch.Generator().manual_seed(seed),
    dtype=torch.float32)`` on the CPU and cast to ``f``'s device and dtype: the
    result depends on ``seed`` only, and no global random state is used.

    Parameters
    ----------
    model : nn.Module
        The model; it runs in eval mode with every parameter's
        ``requires_grad`` off (no parameter gradient is computed or stored);
        modes and flags are restored afterwards, also on error.
    layers : mapping of str to nn.Module
        The layers whose outputs are watched, by name.
    calibration : sequence of CalibrationBatch, or callable
        See :func:`run_calibration`. A callable must run the model with
        gradients enabled (it is called under ``torch.enable_grad()``) and
        works with the default loss only.
    loss_fn : callable, optional
        ``loss_fn(model, batch) -> scalar tensor``: run the model on the batch
        and return a loss; ``F`` is then the empirical Fisher of that loss
        (the gradients of one backward pass per batch).
    n_probes : int
        Independent probes per batch (default loss only).
    seed : int
        Seed of the probes' generator.
    skip_unreached : bool
        Leave out of the result, instead of raising, the layers whose output
        the loss does not depend on (such as a pooler under the default probe).
    progress : bool
        Show a progress bar over the batches.

    Returns
    -------
    dict of str to torch.Tensor
        ``(out, out)`` float64 matrices, in the order of ``layers``.

    Raises
    ------
    ValueError
        If a layer never ran, or its output received no gradient (the loss does
        not depend on it, such as a pooler under a ``last_hidden_state`` probe).
    RuntimeError
        If a layer only ran under ``torch.no_grad()`` (in a calibration callable).

    """
    _check_layers(layers)
    _check_calibration(calibration)
    if not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive integer, got {n_probes!r}")
    if loss_fn is not None:
        if n_probes != 1:
            raise ValueError(f"n_probes applies to the default probe loss only; got n_probes={n_probes} with loss_fn")
        if not isinstance(calibration, Sequence):
            raise TypeError("loss_fn needs a sequence of CalibrationBatch, not a calibration callable")
    state = _BatchState()
    generator = torch.Generator().manual_seed(seed)
    accumulators = {name: _Accumulator(name, _features(layer, "out"), abs_sum=False) for name, layer in layers.items()}
    received = dict.fromkeys(layers, 0)
    without_grad = dict.fromkeys(layers, 0)

    def make_layer_hook(acc: _Accumulator) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {acc.name!r} returned a {type(output).__name__}, not a tensor")
            acc.calls += 1
            if not torch.is_grad_enabled():
                without_grad[acc.name] += 1
                return output
            if not output.requires_grad:
                # Nothing upstream records gradients (parameters are frozen): start the graph here.
                output = output.detach().requires_grad_().clone()
            mask = state.mask

            def grad_hook(grad: torch.Tensor) -> None:
                received[acc.name] += 1
                acc.add(counted_rows(grad, mask), "output gradient")

            output.register_hook(grad_hook)
            return output

        return hook

    def probe_hook(module: nn.Module, args: tuple, output: Any) -> None:
        f = model_output_tensor(output)
        if not f.requires_grad:
            return  # depends on none of the layers (or ran without gradients): reported per layer below
        mask = state.mask
        for probe in range(n_probes):
            eps = torch.randn(f.shape, generator=generator, dtype=torch.float32).to(device=f.device, dtype=f.dtype)
            if mask is not None and f.dim() >= 2 and tuple(f.shape[:2]) == tuple(mask.shape):
                eps = eps * mask.to(f.device).reshape(*mask.shape, *[1] * (f.dim() - 2)).to(f.dtype)
            torch.autograd.backward((eps * f).sum(), retain_graph=probe < n_probes - 1)

    parameters = {id(p): p for module in (model, *layers.values()) for p in module.parameters()}
    requires_grad = [(p, p.requires_grad) for p in parameters.values()]
    handles = []
    try:
        for p, _ in requires_grad:
            p.requires_grad_(False)
        for name, layer in layers.items():
            handles.append(layer.register_forward_hook(make_layer_hook(accumulators[name])))
        with eval_mode(model):
            if loss_fn is None:
                handles.append(model.register_forward_hook(probe_hook))
                run_calibration(model, calibration, on_batch=state.set, grad=True, progress=progress)
            else:
                with torch.enable_grad():
                    for batch in tqdm(calibration, desc="lowrank.calibrate", unit="batch", disable=not progress):
                        state.set(batch)
                        loss = loss_fn(model, batch)
                        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                            raise ValueError(f"loss_fn must return a scalar tensor, got {got}")
                        if loss.requires_grad:  # otherwise it depends on none of the layers: reported below
                            torch.autograd.backward(loss.reshape(()))
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires_grad:
            p.requires_grad_(flag)
    fisher = {}
    for name, acc in accumulators.items():
        if acc.calls == 0:
            raise ValueError(f"layer {name!r} received no input during calibration (is it part of the model?)")
        if without_grad[name] == acc.calls:
            raise RuntimeError(
                f"layer {name!r} ran without gradient recording: the calibration runs the model under torch.no_grad()"
            )
        if received[name] == 0:
            if skip_unreached:
                continue
            raise ValueError(
                f"layer {name!r} received no gradient during calibration: the loss does not depend on its output"
            )
        if acc.count == 0:
            raise ValueError(f"layer {name!r} received only padding positions during calibration")
        fisher[name] = acc.gram / (n_probes if loss_fn is None else 1)
    return fisher


def collect_weight_gradients(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Sequence[CalibrationBatch],
    loss_fn: Callable[[nn.Module, CalibrationBatch], torch.Tensor],
    *,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The gradient of a loss with respect to each layer's weight, summed over the calibration batches.

    Parameters
    ----------
    model : nn.Module
        The model; it runs in eval mode and only the watched weights record
        gradients. Every parameter's ``requires_grad`` and ``grad`` and every
        module's mode are restored afterwards, also on error.
    layers : mapping of str to nn.Module
        ``nn.Linear`` / Hugging Face ``Conv1D`` layers, by name.
    calibration : sequence of CalibrationBatch
        The batches.
    loss_fn : callable
        ``loss_fn(model, batch) -> scalar tensor``.
    progress : bool
        Show a progress bar over the batches.

    Returns
    -------
    dict of str to torch.Tensor
        ``(out_features, in_features)`` float64 gradients (a ``Conv1D``'s transposed to that layout).

    """
    _check_layers(layers)
    _check_calibration(calibration)
    if not isinstance(calibration, Sequence):
        raise TypeError("loss_fn needs a sequence of CalibrationBatch, not a calibration callable")
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    watched = {name: layer.weight for name, layer in layers.items()}
    totals = {name: torch.zeros_like(weight, dtype=torch.float64) for name, weight in watched.items()}
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
            p.grad = None
        for weight in watched.values():
            weight.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            for batch in tqdm(calibration, desc="lowrank.calibrate", unit="batch", disable=not progress):
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise ValueError(f"loss_fn must return a scalar tensor, got {got}")
                if loss.requires_grad:
                    loss.reshape(()).backward()
                for name, weight in watched.items():
                    if weight.grad is not None:
                        totals[name] += weight.grad.double()
                        weight.grad = None
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
    for name, total in totals.items():
        if not bool(total.any()):
            raise ValueError(f"layer {name!r} received no gradient: the loss does not depend on its weight")
    return {name: total.T if is_hf_conv1d(layers[name]) else total for name, total in totals.items()}


def collect_paired_statistics(
    model: nn.Module,
    reference: nn.Module,
    names: Sequence[str],
    calibration: Sequence[CalibrationBatch],
    *,
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
    stop_early : bool
        Abandon each forward pass once every layer has received its input
        (see :func:`collect_input_statistics`).

    Returns
    -------
    dict of str to (torch.Tensor, torch.Tensor)
        ``(G, C)`` per layer.

    """
    _check_calibration(calibration)
    if not isinstance(calibration, Sequence):
        raise TypeError("paired statistics need a sequence of CalibrationBatch, not a calibration callable")
    state = _BatchState()
    dense_rows: dict[str, torch.Tensor] = {}
    sums: dict[str, list[torch.Tensor]] = {}
    pending: set[str] = set()

    def make_hook(name: str, dense: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rows = counted_rows(_layer_input(name, args, kwargs), state.mask).detach().double()
            if dense:
                dense_rows[name] = rows
            else:
                if name not in dense_rows or dense_rows[name].shape != rows.shape:
                    raise ValueError(f"layer {name!r} received inputs of different shapes in the two models")
                if name not in sums:
                    sums[name] = [rows.new_zeros(rows.shape[1], rows.shape[1]) for _ in range(2)]
                gram, cross = sums[name]
                gram.addmm_(rows.T, rows)
                cross.addmm_(dense_rows.pop(name).T, rows)
            pending.discard(name)
            if stop_early and not pending:
                raise _AllInputsSeenError

        return hook

    handles = []
    try:
        for name in names:
            handles.append(reference.get_submodule(name).register_forward_pre_hook(make_hook(name, True),
                                                                                    with_kwargs=True))
            handles.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name, False),
                                                                                with_kwargs=True))
        with eval_mode(model), eval_mode(reference), torch.no_grad():
            for batch in calibration:
                state.set(batch)
                for network in (reference, model):
                    pending.update(names)
                    try:
                        batch.run(network)
                    except _AllInputsSeenError:
                        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in sums]
    if missing:
        raise ValueError(f"layer {missing[0]!r} received no input during calibration (is it part of the model?)")
    return {name: (sums[name][0], sums[name][1]) for name in names}
