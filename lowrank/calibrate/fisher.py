"""Output-side Fisher of linear layers: second moments of the gradients with respect to their outputs.

:func:`collect_output_fisher` runs the calibration with autograd recording and
no parameter gradient; :class:`_OutputFisher` holds its accumulators and the
hooks that fill them: a forward hook on each watched layer hangs a gradient
hook on the layer's output, and (for the default, label-free loss) a forward
hook on the model backpropagates random probes of its output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from functools import partial
from typing import Any

import torch
from torch import nn

from lowrank.calibrate.data import Calibration, CalibrationBatch, check_calibration, progress_bar, run_calibration
from lowrank.calibrate.gradients import LossFn, backward_loss
from lowrank.calibrate.hooks import BatchMask, RowAccumulator, check_layers, counted_rows, declared_features, eval_mode
from lowrank.checks import check_int
from lowrank.nn.surgery import train_only


def model_output_tensor(output: Any) -> torch.Tensor:
    """The tensor a model's output stands for: the tensor itself, a sequence's first, or a mapping's main one.

    From a mapping (a Hugging Face ``ModelOutput``): ``logits``, else
    ``last_hidden_state``, else the first value that is not ``loss``; from a
    tuple or list: its first element (searched the same way).

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate import model_output_tensor
    >>> model_output_tensor({"loss": torch.zeros(()), "logits": torch.ones(2, 3)}).shape
    torch.Size([2, 3])

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


class _OutputFisher:
    """The accumulators of one :func:`collect_output_fisher` call, and the hooks that fill them.

    Parameters
    ----------
    layers : mapping of str to nn.Module
        The watched layers, by name.
    n_probes : int
        Probes per batch; the result is averaged over them.
    seed : int
        Seed of the probes' CPU generator, drawn from in call order.
    batch_ids : sequence of int, optional
        An id per batch: the generator is then seeded anew at each batch from
        ``seed`` and its id, so that a batch's probes do not depend on the
        batches run before it (nor on which process runs it).

    """

    def __init__(self, layers: Mapping[str, nn.Module], n_probes: int, seed: int,
                 batch_ids: Sequence[int] | None = None) -> None:
        self.batch_mask = BatchMask()
        self.n_probes = n_probes
        self.seed = seed
        self.batch_ids = None if batch_ids is None else iter(batch_ids)
        self.generator = torch.Generator().manual_seed(seed)
        self.accumulators = {
            name: RowAccumulator(name, declared_features(layer, "out"), abs_sum=False) for name, layer in layers.items()
        }
        self.received = dict.fromkeys(layers, 0)  # gradients that reached each layer's output
        self.without_grad = dict.fromkeys(layers, 0)  # forward calls made with autograd off

    def start_batch(self, batch: CalibrationBatch) -> None:
        """Take the token mask of ``batch``, about to run, and with batch ids, seed its probes."""
        self.batch_mask.set(batch)
        if self.batch_ids is not None:
            self.generator.manual_seed(self.seed * 2**32 + next(self.batch_ids))

    def layer_hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
        """Forward hook of the layer ``name`` (bound by ``partial``): route its output's gradient to the accumulator.

        An output that records no graph (the parameters upstream are frozen) is
        replaced by a copy that does, so that the gradient reaches it.
        """
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {name!r} returned a {type(output).__name__}, not a tensor")
        self.accumulators[name].calls += 1
        if not torch.is_grad_enabled():
            self.without_grad[name] += 1
            return output
        if not output.requires_grad:
            output = output.detach().requires_grad_().clone()
        output.register_hook(partial(self.add_gradient, name, self.batch_mask.mask))
        return output

    def add_gradient(self, name: str, token_mask: torch.Tensor | None, grad: torch.Tensor) -> None:
        """Gradient hook on the output of the layer ``name``: add the rows of ``grad`` that ``token_mask`` counts."""
        self.received[name] += 1
        self.accumulators[name].add(counted_rows(grad, token_mask), "output gradient")

    def draw_probe(self, f: torch.Tensor) -> torch.Tensor:
        """The next probe ``eps ~ N(0, I)`` of ``f``'s shape, device and dtype, zero at padding positions."""
        eps = torch.randn(f.shape, generator=self.generator, dtype=torch.float32).to(device=f.device, dtype=f.dtype)
        mask = self.batch_mask.mask
        if mask is not None and f.dim() >= 2 and tuple(f.shape[:2]) == tuple(mask.shape):
            eps = eps * mask.to(f.device).reshape(*mask.shape, *[1] * (f.dim() - 2)).to(f.dtype)
        return eps

    def probe_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook of the model: backpropagate ``(eps * f).sum()`` for each probe ``eps`` of its output ``f``."""
        f = model_output_tensor(output)
        if not f.requires_grad:
            return  # depends on none of the layers (or ran without gradients): reported per layer by `result`
        for probe in range(self.n_probes):
            torch.autograd.backward((self.draw_probe(f) * f).sum(), retain_graph=probe < self.n_probes - 1)

    def result(self, skip_unreached: bool) -> dict[str, torch.Tensor]:
        """Each layer's Fisher, averaged over the probes, once every layer is checked to have been reached.

        Raises
        ------
        ValueError
            If a layer never ran, its output received no gradient (unless
            ``skip_unreached``, which leaves it out) or only padding rows.
        RuntimeError
            If a layer only ran without autograd recording.

        """
        fisher = {}
        for name, acc in self.accumulators.items():
            acc.check_ran()
            if self.without_grad[name] == acc.calls:
                raise RuntimeError(
                    f"layer {name!r} ran without gradient recording: the calibration runs the model under "
                    "torch.no_grad()"
                )
            if self.received[name] == 0:
                if skip_unreached:
                    continue
                raise ValueError(
                    f"layer {name!r} received no gradient during calibration: the loss does not depend on its output"
                )
            acc.check_counted()
            fisher[name] = acc.gram / self.n_probes
        return fisher


def check_probes(n_probes: int, loss_fn: LossFn | None, name: str = "n_probes") -> int:
    """``n_probes`` as an int >= 1, and 1 with a ``loss_fn`` (whose empirical Fisher takes no probes)."""
    n_probes = check_int(n_probes, name)
    if loss_fn is not None and n_probes != 1:
        raise ValueError(f"{name} applies to the default probe loss only; got {name}={n_probes} with loss_fn")
    return n_probes


def collect_output_fisher(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Calibration,
    *,
    loss_fn: LossFn | None = None,
    n_probes: int = 1,
    seed: int = 0,
    batch_ids: Sequence[int] | None = None,
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
        modes, flags and ``grad`` attributes are restored afterwards, also on
        error.
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
    batch_ids : sequence of int, optional
        One id per batch (their indices in the whole calibration set, when it
        is shared among processes): each batch's probes are then drawn from
        a generator seeded with ``seed * 2**32 + id``, whatever ran before.
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
        not depend on it, such as a pooler under a ``last_hidden_state`` probe),
        or ``loss_fn`` returns anything but a scalar tensor.
    RuntimeError
        If a layer only ran under ``torch.no_grad()`` (in a calibration callable).

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate import calibration_batches, collect_output_fisher
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> fisher = collect_output_fisher(model, {"0": model[0]}, calibration_batches([torch.randn(5, 4)]), n_probes=2)
    >>> fisher["0"].shape, fisher["0"].dtype
    (torch.Size([8, 8]), torch.float64)

    """
    check_layers(layers)
    n_probes = check_probes(n_probes, loss_fn)
    check_calibration(calibration, needs_batches=None if loss_fn is None else "loss_fn")
    if batch_ids is not None and (not isinstance(calibration, Sequence) or len(batch_ids) != len(calibration)):
        raise ValueError("batch_ids needs one id per calibration batch")
    fisher = _OutputFisher(layers, n_probes, seed, batch_ids)
    with ExitStack() as hooks:
        for name, layer in layers.items():
            hooks.enter_context(layer.register_forward_hook(partial(fisher.layer_hook, name)))
        with train_only([model, *layers.values()]), eval_mode(model):
            if loss_fn is None:
                hooks.enter_context(model.register_forward_hook(fisher.probe_hook))
                run_calibration(model, calibration, on_batch=fisher.start_batch, grad=True, progress=progress)
            else:
                with torch.enable_grad():
                    for batch in progress_bar(calibration, progress):
                        fisher.start_batch(batch)
                        backward_loss(loss_fn, model, batch)
    return fisher.result(skip_unreached)
