"""Gradients of a user loss with respect to linear layers' weights, summed over the calibration batches.

:func:`backward_loss` is also the one place where a user ``loss_fn`` is run,
checked to return a scalar tensor and backpropagated (the output Fisher of
:mod:`lowrank.calibrate.fisher` uses it too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from lowrank.calibrate.data import CalibrationBatch, check_calibration, progress_bar
from lowrank.calibrate.hooks import check_layers, eval_mode
from lowrank.nn.dense import is_hf_conv1d
from lowrank.nn.surgery import train_only

# A user loss: runs the model on a batch and returns a scalar tensor.
LossFn = Callable[[nn.Module, CalibrationBatch], torch.Tensor]


def backward_loss(loss_fn: LossFn, model: nn.Module, batch: CalibrationBatch) -> None:
    """Run ``loss_fn(model, batch)``, check that it returned a scalar tensor, and backpropagate it.

    A loss that does not require gradients (it depends on nothing that records
    them) is not backpropagated; the callers report the layers it left without
    gradient.

    Raises
    ------
    ValueError
        If ``loss_fn`` returned anything but a tensor of one element.

    """
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {got}")
    if loss.requires_grad:
        torch.autograd.backward(loss.reshape(()))


def collect_weight_gradients(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Sequence[CalibrationBatch],
    loss_fn: LossFn,
    *,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The gradient of a loss with respect to each layer's weight, summed over the calibration batches.

    Parameters
    ----------
    model : nn.Module
        The model; it runs in eval mode and only the watched weights record
        gradients. Every parameter's ``requires_grad`` and ``grad`` (those of
        ``model`` and of ``layers``) and every module's mode are restored
        afterwards, also on error.
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

    Raises
    ------
    ValueError
        If ``loss_fn`` returns anything but a scalar tensor, or the loss does
        not depend on a layer's weight.

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate import calibration_batches, collect_weight_gradients
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    >>> batches = calibration_batches([torch.randn(5, 4), torch.randn(2, 4)])
    >>> grads = collect_weight_gradients(model, {"0": model[0]}, batches, lambda m, b: b.run(m).sum())
    >>> grads["0"].shape, grads["0"].dtype, model[0].weight.grad
    (torch.Size([3, 4]), torch.float64, None)

    """
    check_layers(layers)
    check_calibration(calibration, needs_batches="loss_fn")
    watched = {name: layer.weight for name, layer in layers.items()}
    totals = {name: torch.zeros_like(weight, dtype=torch.float64) for name, weight in watched.items()}
    with train_only([model, *layers.values()], watched.values()), eval_mode(model), torch.enable_grad():
        for batch in progress_bar(calibration, progress):
            backward_loss(loss_fn, model, batch)
            for name, weight in watched.items():
                if weight.grad is not None:
                    totals[name] += weight.grad.double()
                    weight.grad = None
    for name, total in totals.items():
        if not bool(total.any()):
            raise ValueError(f"layer {name!r} received no gradient: the loss does not depend on its weight")
    return {name: total.T if is_hf_conv1d(layers[name]) else total for name, total in totals.items()}
