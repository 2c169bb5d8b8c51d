"""Data-aware compression of linear layers: whitened truncation, one budget across layers, sequential calibration.

:func:`lowrank.compress` calls :func:`compress_linears` when calibration data is
given. The steps, each documented where it is done:

1. statistics of the dense model: every target's input Gram matrix and, for the
   ``"fisher"`` allocation, the Fisher of its outputs (:mod:`lowrank.calibrate`);
2. one spectrum per layer, of the weight whitened by those statistics, whose
   squared singular values estimate what dropping each component costs (or, for
   ``"sensitivity"``, the first-order change of a user loss when it is dropped);
3. ranks: the same fraction of parameters per layer (``"uniform"``), or one
   budget spent where it loses least (``"energy"``, ``"fisher"``,
   ``"sensitivity"``), through :func:`lowrank.rank.allocate_ranks`, or a
   :class:`lowrank.rank.RankPolicy` applied to each whitened spectrum;
4. factors, layer group by layer group in forward order, each group whitened
   with the inputs it receives from the layers already compressed before it
   (sequential calibration, as GPTQ and SVD-LLM do).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank.calibrate import (
    Calibration,
    CalibrationBatch,
    asvd_low_rank,
    collect_input_statistics,
    collect_output_fisher,
    collect_paired_statistics,
    collect_weight_gradients,
    refit_second,
    relative_output_error,
    run_calibration,
    whitened_low_rank,
)
from lowrank.nn import (
    LowRankLinear,
    is_hf_conv1d,
    linear_rank_for_ratio,
    linear_weight,
    swap_modules,
    weight_ratio,
)
from lowrank.rank import LayerBudget, RankPolicy, allocate_ranks

ALLOCATIONS = ("uniform", "energy", "fisher", "sensitivity")


@dataclass(frozen=True)
class LinearPlan:
    """What data-aware compression decided for one linear layer.

    Attributes
    ----------
    name : str
        The layer's name in the model.
    rank : int or None
        The rank kept; None when the layer stays dense.
    module : LowRankLinear or None
        The replacement (None when the layer stays dense).
    output_error : float or None
        ``||(W - W') X|| / ||W X||`` on the calibration inputs the layer received.
    skip_reason : str or None
        Why the layer stays dense.
    """

    name: str
    rank: int | None
    module: LowRankLinear | None
    output_error: float | None
    skip_reason: str | None


def break_even_rank(layer: nn.Module) -> int:
    """The largest rank at which a low-rank layer holds fewer parameters and MACs than ``layer`` (0 if none).

    Both counts compare ``rank * (in + out)`` with ``in * out`` (the bias is the same on both sides).
    """
    out_features, in_features = linear_weight(layer).shape
    return max(0, math.ceil(out_features * in_features / (out_features + in_features)) - 1)


def forward_calls(model: nn.Module, layers: dict[str, nn.Module], calibration: Calibration) -> dict[str, int]:
    """How often each of ``layers`` runs in one forward pass on the first calibration batch, in order of first call.

    Layers that never run come last, with 0.
    """
    calls: dict[str, int] = {}
    handles = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        for name, module in layers.items()
    ]
    try:
        run_calibration(model, calibration[:1] if isinstance(calibration, Sequence) else calibration)
    finally:
        for handle in handles:
            handle.remove()
    return calls | {name: 0 for name in layers if name not in calls}


def layer_groups(order: Sequence[str]) -> list[list[str]]:
    """Consecutive layers of ``order`` that share a parent module (a block's query, key and value), as groups."""
    groups: list[list[str]] = []
    for name in order:
        if groups and groups[-1][-1].rpartition(".")[0] == name.rpartition(".")[0]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _weight64(layer: nn.Module) -> torch.Tensor:
    return linear_weight(layer).detach().double()


def first_order_scores(weight: torch.Tensor, gram: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """``|<G, dW_k>|`` for each component ``dW_k = s_k u_k v_k^T S^{-1}`` of the whitened SVD ``W S = U diag(s) V^T``.

    ``G`` is the loss gradient with respect to ``W``, so this is the size of
    the first-order change of the loss when component ``k`` is dropped (a
    Taylor criterion, as in Molchanov et al. 2019, per singular component).
    """
    first, second, _ = whitened_low_rank(weight.double(), gram, min(weight.shape))  # dW_k = second_k first_k
    return ((second.T @ gradient.double()) * first).sum(1).abs()


def choose_ranks(
    layers: dict[str, nn.Module],
    spectra: dict[str, torch.Tensor],
    *,
    ratio: float | None,
    policy: RankPolicy | None,
    allocation: str,
    normalize: bool,
) -> dict[str, int | None]:
    """Each layer's rank (None: dense) from its whitened spectrum.

    Parameters
    ----------
    layers : dict of str to nn.Module
        The dense linear layers.
    spectra : dict of str to torch.Tensor
        Each layer's weighted singular values (descending).
    ratio : float, optional
        Fraction of the layers' parameters (weights and biases) to keep.
    policy : RankPolicy, optional
        Instead of ``ratio``: the rank rule applied to each spectrum.
    allocation : {"uniform", "energy", "fisher"}
        ``"uniform"`` gives every layer the largest rank within ``ratio`` of its
        own parameters; the others spend ``ratio`` of all the layers' parameters
        at once, dropping the components of least score per parameter
        (:func:`lowrank.rank.allocate_ranks`); ``spectra`` then holds the scores'
        square roots for ``"sensitivity"``.
    normalize : bool
        Score a component by its squared singular value relative to the
        layer's total (``"energy"``: every layer's relative output error counts
        alike), or by the squared singular value itself (``"fisher"``: already
        in units of the loss).

    """
    ranks: dict[str, int | None] = {}
    if policy is not None:
        for name, layer in layers.items():
            rank = policy.choose(spectra[name], tuple(linear_weight(layer).shape))
            ranks[name] = rank if 1 <= rank <= break_even_rank(layer) else None
        return ranks
    if allocation == "uniform":
        for name, layer in layers.items():
            weight = linear_weight(layer)
            bias = 0 if layer.bias is None else layer.bias.numel()
            share = weight_ratio(ratio, weight.numel(), bias)
            rank = linear_rank_for_ratio(*weight.shape, share) if share > 0 else 0
            ranks[name] = rank if 1 <= rank <= break_even_rank(layer) else None
        return ranks
    budgets = []
    for name, layer in layers.items():
        out_features, in_features = linear_weight(layer).shape
        bias = 0 if layer.bias is None else layer.bias.numel()
        scores = spectra[name].double() ** 2
        if normalize:
            scores = scores / scores.sum().clamp_min(torch.finfo(torch.float64).tiny)
        budgets.append(LayerBudget(scores, out_features + in_features, bias, out_features * in_features + bias,
                                   min(break_even_rank(layer), scores.numel())))
    total = sum(b.dense_params for b in budgets)
    chosen = allocate_ranks(budgets, math.floor(ratio * total))
    return dict(zip(layers, chosen))


def compress_linears(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Calibration,
    *,
    ratio: float | None = None,
    policy: RankPolicy | None = None,
    allocation: str = "fisher",
    whiten: bool | str = True,
    sequential: bool = True,
    refit: bool = True,
    n_probes: int = 1,
    loss_fn: Callable[[nn.Module, CalibrationBatch], torch.Tensor] | None = None,
    progress: bool = False,
) -> list[LinearPlan]:
    """Factorize linear layers of ``model`` on calibration data, replacing them in ``model`` as it goes.

    Layers are replaced group by group (see :func:`layer_groups`) so that each
    group is calibrated on the outputs of the groups already compressed; on any
    error every layer replaced so far is put back and the error re-raised, so
    the model is left as it was.

    Parameters
    ----------
    model : nn.Module
        The model, modified in place.
    layers : dict of str to nn.Module
        The ``nn.Linear`` / Hugging Face ``Conv1D`` layers to compress, by name.
    calibration : sequence of CalibrationBatch, or callable
        The calibration set (see :func:`lowrank.calibrate.calibration_batches`).
    ratio : float, optional
        Fraction of the layers' parameters to keep (see :func:`choose_ranks`).
    policy : RankPolicy, optional
        A rank rule applied to each layer's whitened spectrum, instead of ``ratio``.
    allocation : {"uniform", "energy", "fisher", "sensitivity"}
        How ``ratio`` is spent (see :func:`choose_ranks`). ``"fisher"`` weights
        each layer's outputs by the Fisher of the model's output
        (:func:`lowrank.calibrate.collect_output_fisher`, ``n_probes`` probes
        per batch; or of ``loss_fn``), so that a component's score estimates
        the increase of the distance to the dense model's outputs (or of the
        loss) when it is dropped; layers the loss does not depend on (a
        pooler, when the probed output is the last hidden state) keep
        ``ratio`` of their own parameters, outside the shared budget. ``"sensitivity"`` scores each whitened
        component by the first-order change of ``loss_fn`` when it is dropped
        (:func:`first_order_scores`); the default loss has no first-order
        change at the dense model, so this needs ``loss_fn``.
    whiten : bool or "asvd"
        Truncate the whitened weight ``W S`` (``S S^T`` the input Gram matrix),
        which minimises the error of the layer's outputs on the calibration
        inputs; ``"asvd"`` scales the input channels by their mean absolute
        activation instead (ASVD, cheaper: no Cholesky factor, no refit);
        False truncates the weight itself (plain SVD).
    sequential : bool
        Whiten each group with the inputs it receives from the already
        compressed model (else from the dense one).
    refit : bool
        With ``sequential``: refit each second factor in closed form
        (:func:`lowrank.calibrate.refit_second`) so that the layer, on the
        inputs it receives in the compressed model, best reproduces the dense
        layer's outputs on the dense model's inputs (the upstream error is
        corrected, not only left uncompounded). Keeps a dense copy of the
        model during the call.
    n_probes : int
        Output probes per batch for the Fisher.
    loss_fn : callable, optional
        ``loss_fn(model, batch) -> scalar tensor``, a user loss for ``"fisher"``
        (its empirical Fisher) and ``"sensitivity"``.
    progress : bool
        Show progress bars.

    Returns
    -------
    list of LinearPlan
        One per layer, in forward order.

    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation == "sensitivity" and loss_fn is None:
        raise ValueError("allocation='sensitivity' needs loss_fn=: the default loss has no first-order change")
    calls = forward_calls(model, layers, calibration)
    order = list(calls)
    layers = {name: layers[name] for name in order}
    if whiten not in (True, False, "asvd"):
        raise ValueError(f"whiten must be True, False or 'asvd', got {whiten!r}")
    inputs = collect_input_statistics(model, layers, calibration, progress=progress)
    stats = {name: s.gram for name, s in inputs.items()}
    abs_means = {name: s.abs_mean for name, s in inputs.items()}
    fisher = gradients = None
    if allocation == "fisher":
        fisher = collect_output_fisher(model, layers, calibration, loss_fn=loss_fn, skip_unreached=True,
                                       n_probes=1 if loss_fn is not None else n_probes, progress=progress)
    if allocation == "sensitivity":
        gradients = collect_weight_gradients(model, layers, calibration, loss_fn, progress=progress)
    spectra = {}
    for name, layer in layers.items():
        weight = _weight64(layer)
        if gradients is not None:
            spectra[name] = first_order_scores(weight, stats[name], gradients[name]).sqrt()
        elif whiten == "asvd":
            spectra[name] = asvd_low_rank(weight, abs_means[name], 1)[2]
        elif whiten:
            spectra[name] = whitened_low_rank(
                weight, stats[name], 1, output_gram=None if fisher is None else fisher.get(name)
            )[2]
        else:
            spectra[name] = torch.linalg.svdvals(weight)
    # layers the loss does not see (a pooler under the default probe) keep ``ratio`` of their own parameters
    unreached = {name: layer for name, layer in layers.items() if fisher is not None and name not in fisher}
    reached = {name: layer for name, layer in layers.items() if name not in unreached}
    ranks = choose_ranks(reached, spectra, ratio=ratio, policy=policy, allocation=allocation,
                         normalize=allocation == "energy")
    ranks.update(choose_ranks(unreached, spectra, ratio=ratio, policy=policy, allocation="uniform", normalize=False))
    plans: dict[str, LinearPlan] = {}
    replaced: list[str] = []
    # a forward pass may stop once a group has its inputs, unless some layer runs twice in one pass
    early = isinstance(calibration, Sequence) and all(count == 1 for count in calls.values())
    refit = refit and sequential and whiten is True
    if refit and not isinstance(calibration, Sequence):
        raise TypeError("refit needs a sequence of CalibrationBatch, not a calibration callable")
    reference = copy.deepcopy(model) if refit else None
    cross: dict[str, torch.Tensor] = {}
    try:
        for group in tqdm(layer_groups(order), desc="lowrank.compress (calibrated)", unit="group",
                          disable=not progress):
            todo = [name for name in group if ranks[name] is not None]
            if sequential and whiten and todo and replaced:
                if refit:
                    for name, (gram, moment) in collect_paired_statistics(
                        model, reference, todo, calibration, stop_early=early
                    ).items():
                        stats[name], cross[name] = gram, moment
                else:
                    watched = {name: layers[name] for name in todo}
                    for name, s in collect_input_statistics(model, watched, calibration, stop_early=early).items():
                        stats[name], abs_means[name] = s.gram, s.abs_mean
            for name in todo:
                plans[name] = _factorize(name, layers[name], ranks[name], whiten, stats[name], abs_means[name],
                                         cross.get(name))
            swap_modules(model, [(name, plans[name].module) for name in todo])
            replaced += todo
    except BaseException:
        swap_modules(model, [(name, layers[name]) for name in reversed(replaced)])
        raise
    reason = "no rank below break-even is worth its parameters within the budget"
    return [plans.get(name, LinearPlan(name, None, None, None, reason)) for name in order]


def _factorize(
    name: str, layer: nn.Module, rank: int, whiten: bool | str, gram: torch.Tensor, abs_mean: torch.Tensor,
    cross: torch.Tensor | None = None,
) -> LinearPlan:
    """The low-rank replacement of ``layer`` at ``rank``: whitened by ``gram``, ASVD-scaled by ``abs_mean``, or plain.

    With ``cross`` (the cross moment of dense and compressed inputs), the second
    factor is refitted to map the compressed inputs to the dense outputs.
    """
    weight = _weight64(layer)
    if whiten:
        if whiten == "asvd":
            first, second, _ = asvd_low_rank(weight, abs_mean, rank)
        else:
            first, second, _ = whitened_low_rank(weight, gram, rank)
        if cross is not None:
            second = refit_second(weight, first, gram, cross)
        bias = None if layer.bias is None else layer.bias.detach()
        dense_type = "Conv1D" if is_hf_conv1d(layer) else "Linear"
        module = LowRankLinear.from_factors(first, second, bias, dense_type, dtype=layer.weight.dtype)
    else:
        module = LowRankLinear.from_dense(layer, rank)
    module.train(layer.training)
    error = relative_output_error(weight, module.weight.detach().double(), gram)
    return LinearPlan(name, rank, module, error, None)
