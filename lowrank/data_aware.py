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
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank.calibrate import (
    Calibration,
    CalibrationBatch,
    InputStatistics,
    asvd_low_rank,
    calibration_batches,
    check_probes,
    collect_input_statistics,
    collect_output_fisher,
    collect_paired_statistics,
    collect_weight_gradients,
    refit_second,
    relative_output_error,
    run_calibration,
    shrunk_to_diagonal,
    whitened_low_rank,
    whitened_spectrum,
)
from lowrank.calibrate.blocks import (
    Blocks,
    block_inputs,
    blocks_share_inputs,
    find_blocks,
    next_block_inputs,
    replayed_blocks,
)
from lowrank.calibrate.data import TEXT_BATCH_SIZE, TEXT_MAX_LENGTH
from lowrank.checks import check_bool, check_choice
from lowrank.distributed import all_reduce_sum, broadcast_from, local_share, owner, world
from lowrank.nn import METHODS, LowRankLinear
from lowrank.nn.dense import bias_size, count_params, linear_bias, linear_type, linear_weight
from lowrank.nn.surgery import swap_modules
from lowrank.rank import LayerBudget, ParamFraction, RankPolicy, allocate_ranks
from lowrank.rank.budget import fraction_budget

ALLOCATIONS = ("uniform", "energy", "fisher", "sensitivity")
# The method of every layer data-aware compression factorizes: a low-rank SVD.
LOW_RANK = METHODS["linear"]["svd"]


@dataclass(frozen=True, eq=False)
class CalibrationConfig:
    """Calibration data and how data-aware compression uses it.

    The data is turned into batches once, when the config is made (texts are
    tokenised then, with ``tokenizer``, ``batch_size`` and ``max_length``,
    which are init-only arguments for that reason), and every setting is
    checked then.

    Attributes
    ----------
    data : list of CalibrationBatch, or callable
        The calibration inputs, given as texts (tokenised with ``tokenizer``),
        a ``DataLoader`` or any iterable of batches (see
        :func:`lowrank.calibrate.calibration_batches`), or a callable
        ``data(model)`` that runs the model itself (which supports neither
        the ``"fisher"`` and ``"sensitivity"`` allocations, nor refitting,
        nor healing). Held as the list of batches afterwards.
    tokenizer : callable, optional
        The checkpoint's tokenizer, for texts (init-only).
    allocation : {"uniform", "energy", "fisher", "sensitivity"}, optional
        How a ``ratio`` is spent across layers (see :func:`compress_linears`);
        None: ``"energy"`` with a ratio (the best out of the calibration text's
        domain, ``benchmarks/generalise.py``), each layer on its own with a
        rank policy.
    whiten : {True, False, "asvd"}
        Truncate the whitened weight (True), the weight with its input
        channels scaled by their mean activation (``"asvd"``, cheaper), or the
        weight itself (False).
    sequential : bool
        Calibrate each layer on the inputs it receives from the layers
        compressed before it (else on the dense model's).
    refit : bool
        With ``sequential`` and whitening, refit each second factor in closed
        form so the layer, fed by the compressed layers before it, reproduces
        the dense layer's outputs (keeps a dense copy of the model during the
        call); batches only. Off by default: it fits the calibration text
        closer and other text worse (``benchmarks/generalise.py``).
    shrinkage : float
        Whiten by the input Gram matrix pulled towards its diagonal,
        ``(1 - shrinkage) G + shrinkage diag(G)``, in [0, 1]: the spectra and
        factors trust the calibration text's correlations between channels
        less (:func:`lowrank.calibrate.shrunk_to_diagonal`). 0: none.
    ridge : float
        With ``refit``, a ridge pulling each refitted second factor towards
        the one before the refit, relative to the mean diagonal of ``A G A^T``
        (:func:`lowrank.calibrate.refit_second`'s ``damping`` with ``prior``):
        0 is the full refit, a large value no refit. The refit itself uses the
        statistics unshrunk; ``shrinkage`` shapes the first factors.
    n_probes : int
        Output probes per batch for the ``"fisher"`` allocation's default loss.
    loss_fn : callable, optional
        ``loss_fn(model, batch) -> scalar tensor``: a task loss for the
        ``"fisher"`` allocation (instead of the distance to the dense model's
        outputs) and for ``"sensitivity"`` (required there).
    device : str, optional
        Where each block runs its turn of block-by-block calibration (and
        streaming's dense pass): the block, its dense copy and the cached
        hidden states move there, and the compressed block moves back to the
        model's device, so a model larger than an accelerator compresses on
        it (``"cuda"``). None: the model's own device.
    batch_size : int
        Texts per batch (texts only; init-only).
    max_length : int, optional
        Longest tokenised text, in tokens (texts only; init-only).

    Examples
    --------
    >>> import torch
    >>> config = CalibrationConfig([torch.randn(8, 16) for _ in range(3)], allocation="energy")
    >>> len(config.data), config.to_dict()["allocation"]
    (3, 'energy')

    """

    data: Any
    tokenizer: InitVar[Any] = None
    allocation: str | None = None
    whiten: bool | str = True
    sequential: bool = True
    refit: bool = False
    shrinkage: float = 0.0
    ridge: float = 0.0
    n_probes: int = 1
    loss_fn: Callable[[nn.Module, CalibrationBatch], torch.Tensor] | None = None
    device: str | None = None
    batch_size: InitVar[int] = TEXT_BATCH_SIZE
    max_length: InitVar[int | None] = TEXT_MAX_LENGTH

    def __post_init__(self, tokenizer: Any, batch_size: int, max_length: int | None) -> None:
        if self.allocation is not None:
            check_choice(self.allocation, ALLOCATIONS, "CalibrationConfig.allocation")
        if not (isinstance(self.whiten, bool) or self.whiten == "asvd"):
            raise ValueError(f"CalibrationConfig.whiten must be True, False or 'asvd', got {self.whiten!r}")
        for name in ("sequential", "refit"):
            object.__setattr__(self, name, check_bool(getattr(self, name), f"CalibrationConfig.{name}"))
        if not (isinstance(self.shrinkage, (int, float)) and 0.0 <= self.shrinkage <= 1.0):
            raise ValueError(f"CalibrationConfig.shrinkage must be a number in [0, 1], got {self.shrinkage!r}")
        if not (isinstance(self.ridge, (int, float)) and 0.0 <= self.ridge < float("inf")):
            raise ValueError(f"CalibrationConfig.ridge must be a finite number >= 0, got {self.ridge!r}")
        if self.ridge and not self.refits:
            raise ValueError(f"CalibrationConfig.ridge={self.ridge} pulls the refit, which does not run here: it "
                             "needs refit=True, sequential=True, whiten=True and batches (not a callable)")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError(f"CalibrationConfig.loss_fn must be a callable (model, batch) -> loss, "
                             f"got {self.loss_fn!r}")
        object.__setattr__(self, "n_probes", check_probes(self.n_probes, self.loss_fn, "CalibrationConfig.n_probes"))
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"CalibrationConfig.device: {self.device!r} is not a device ({error})") from error
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"CalibrationConfig.device={self.device!r}, but torch finds no CUDA device here")
            object.__setattr__(self, "device", str(device))
        if self.allocation == "sensitivity" and self.loss_fn is None:
            raise ValueError("allocation='sensitivity' needs loss_fn=: the distance to the dense model has no "
                             "first-order change at the dense model")
        if not self.runs_itself:
            batches = calibration_batches(self.data, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            object.__setattr__(self, "data", batches)

    @property
    def runs_itself(self) -> bool:
        """Whether the data is a callable that runs the model itself (no batches)."""
        return callable(self.data) and not isinstance(self.data, (Sequence, nn.Module))

    @property
    def refits(self) -> bool:
        """Whether second factors are refitted: asked, sequential, whitened, and on batches."""
        return self.refit and self.sequential and self.whiten is True and not self.runs_itself

    def allocation_for(self, budget: bool) -> str:
        """The allocation that runs: the one asked for, else ``"energy"`` for a budget and ``"uniform"`` for a policy.

        Raises
        ------
        ValueError
            If an allocation that spends a budget is asked for without one, or
            one that backpropagates through batches for a callable calibration.

        """
        allocation = self.allocation or ("energy" if budget else "uniform")
        if not budget and allocation != "uniform":
            raise ValueError(f"allocation={allocation!r} spends a budget: give ratio=, or allocation='uniform'")
        if self.runs_itself and allocation in ("fisher", "sensitivity"):
            raise ValueError(f"a callable calibration runs the model itself: it does not support allocation="
                             f"{allocation!r}; give texts or batches, or another allocation")
        return allocation

    def to(self, device: torch.device | str | None) -> CalibrationConfig:
        """The config with its batches moved to ``device``."""
        if self.runs_itself or device is None:
            return self
        return dataclasses.replace(self, data=[batch.to(device) for batch in self.data])

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data (the data as its number of batches, a loss by its name)."""
        return {
            "batches": "callable" if self.runs_itself else len(self.data),
            "allocation": self.allocation,
            "whiten": self.whiten,
            "sequential": self.sequential,
            "refit": self.refit,
            "shrinkage": self.shrinkage,
            "ridge": self.ridge,
            "n_probes": self.n_probes,
            "device": self.device,
            "loss_fn": None if self.loss_fn is None else getattr(self.loss_fn, "__name__", "callable"),
        }


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
    spectrum : torch.Tensor or None
        The values the rank was chosen against, in component order: the
        singular values of the whitened (or output-weighted) weight, largest
        first, or the square roots of the ``"sensitivity"`` scores.
    """

    name: str
    rank: int | None
    module: LowRankLinear | None
    output_error: float | None
    skip_reason: str | None
    spectrum: torch.Tensor | None = None


def break_even_rank(layer: nn.Module) -> int:
    """The largest rank at which a low-rank layer holds fewer parameters and MACs than ``layer`` (0 if none).

    Both counts compare ``rank * (in + out)`` with ``in * out`` (the bias is the same on both sides), so
    this is the largest rank within one parameter less than the layer's.
    """
    return LOW_RANK.rank_for_budget(layer, count_params(layer) - 1) or 0


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


def layer_spectrum(layer: nn.Module, whiten: bool | str, inputs: InputStatistics,
                   output_gram: torch.Tensor | None = None, shrinkage: float = 0.0) -> torch.Tensor:
    """The singular values a rank choice reads for ``layer``: of its whitened, ASVD-scaled or plain weight.

    A whitened weight is whitened by the input Gram matrix shrunk by ``shrinkage`` towards its diagonal.
    """
    weight = _weight64(layer)
    if whiten == "asvd":
        return asvd_low_rank(weight, inputs.abs_mean, 1)[2]
    if whiten:
        return whitened_spectrum(weight, shrunk_to_diagonal(inputs.gram, shrinkage), output_gram=output_gram)
    return torch.linalg.svdvals(weight)


def choose_ranks(
    layers: dict[str, nn.Module],
    spectra: dict[str, torch.Tensor],
    *,
    ratio: float | None,
    policy: RankPolicy | None,
    allocation: str,
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
        Instead of ``ratio``: the rank rule applied to each layer (a
        :class:`~lowrank.rank.ParamFraction` as a budget, any other to the
        layer's whitened spectrum; see :meth:`lowrank.nn.Method.choose_rank`).
    allocation : {"uniform", "energy", "fisher", "sensitivity"}
        ``"uniform"`` gives every layer the largest rank within ``ratio`` of its
        own parameters; the others spend ``ratio`` of all the layers' parameters
        at once, dropping the components of least score per parameter
        (:func:`lowrank.rank.allocate_ranks`). A component's score is its
        squared singular value, relative to the layer's total for
        ``"energy"`` (every layer's relative output error counts alike), as it
        is for ``"fisher"`` (already in units of the loss) and
        ``"sensitivity"`` (``spectra`` then holds the scores' square roots).

    """
    if policy is not None or allocation == "uniform":
        rule = ParamFraction(ratio) if policy is None else policy
        ranks = {name: LOW_RANK.choose_rank(layer, rule, spectra=[spectra[name]]) for name, layer in layers.items()}
        return {name: rank if rank is not None and rank <= break_even_rank(layers[name]) else None
                for name, rank in ranks.items()}
    budgets = []
    for name, layer in layers.items():
        out_features, in_features = linear_weight(layer).shape
        scores = spectra[name].double() ** 2
        if allocation == "energy":
            scores = scores / scores.sum().clamp_min(torch.finfo(torch.float64).tiny)
        budgets.append(LayerBudget(scores, out_features + in_features, bias_size(layer), count_params(layer),
                                   min(break_even_rank(layer), scores.numel())))
    total = sum(b.dense_params for b in budgets)
    chosen = allocate_ranks(budgets, fraction_budget(ratio, total))
    return dict(zip(layers, chosen))


def compress_linears(
    model: nn.Module,
    layers: dict[str, nn.Module],
    config: CalibrationConfig,
    *,
    ratio: float | None = None,
    policy: RankPolicy | None = None,
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
    config : CalibrationConfig
        The calibration batches (on the model's device) and settings. Its
        ``allocation`` says how ``ratio`` is spent (see :func:`choose_ranks`;
        ``"energy"`` by default); ``"fisher"`` weights each layer's outputs by
        the Fisher of the model's output
        (:func:`lowrank.calibrate.collect_output_fisher`, ``n_probes`` probes
        per batch; or of ``loss_fn``), so that a component's score estimates
        the increase of the distance to the dense model's outputs (or of the
        loss) when it is dropped; layers the loss does not depend on (a
        pooler, when the probed output is the last hidden state) keep
        ``ratio`` of their own parameters, outside the shared budget.
        ``"sensitivity"`` scores each whitened component by the first-order
        change of ``loss_fn`` when it is dropped (:func:`first_order_scores`).
        ``whiten`` truncates the whitened weight ``W S`` (``S S^T`` the input
        Gram matrix), which minimises the error of the layer's outputs on the
        calibration inputs; ``"asvd"`` scales the input channels by their mean
        absolute activation instead (ASVD, cheaper: no Cholesky factor, no
        refit); False truncates the weight itself (plain SVD). ``refit``
        refits each second factor in closed form
        (:func:`lowrank.calibrate.refit_second`) so that the layer, on the
        inputs it receives in the compressed model, best reproduces the dense
        layer's outputs on the dense model's inputs (the upstream error is
        corrected, not only left uncompounded).
    ratio : float, optional
        Fraction of the layers' parameters to keep.
    policy : RankPolicy, optional
        A rank rule applied to each layer (to its whitened spectrum), instead
        of ``ratio``; each layer on its own, so no allocation but ``"uniform"``.
    progress : bool
        Show progress bars.

    Returns
    -------
    list of LinearPlan
        One per layer, in forward order.

    """
    if (ratio is None) == (policy is None):
        raise ValueError("give one of ratio= and policy=")
    allocation = config.allocation_for(budget=ratio is not None)
    calls = forward_calls(model, layers, config.data)
    order = list(calls)
    layers = {name: layers[name] for name in order}
    # under torch.distributed each process runs its share of the batches; the sums are added over processes
    if config.runs_itself and world()[1] > 1:
        raise ValueError("a callable calibration runs the model itself, so each of the processes of torch.distributed "
                         "would see all of it: give texts or batches, which the processes share")
    calibration, batch_ids = local_share(config.data) if not config.runs_itself else (config.data, None)
    inputs = summed_statistics(collect_input_statistics(model, layers, calibration, progress=progress))
    stats = {name: s.gram for name, s in inputs.items()}
    abs_means = {name: s.abs_mean for name, s in inputs.items()}
    fisher = gradients = None
    if allocation == "fisher":
        fisher = collect_output_fisher(model, layers, calibration, loss_fn=config.loss_fn, skip_unreached=True,
                                       n_probes=config.n_probes, batch_ids=batch_ids, progress=progress)
        all_reduce_sum(list(fisher.values()))
    if allocation == "sensitivity":
        gradients = collect_weight_gradients(model, layers, calibration, config.loss_fn, progress=progress)
        all_reduce_sum(list(gradients.values()))

    def spectrum(name: str, layer: nn.Module) -> torch.Tensor:
        if gradients is not None:
            return first_order_scores(_weight64(layer), shrunk_to_diagonal(stats[name], config.shrinkage),
                                      gradients[name]).sqrt()
        return layer_spectrum(layer, config.whiten, inputs[name], None if fisher is None else fisher.get(name),
                              config.shrinkage)

    spectra = spread_spectra(layers, spectrum)
    # layers the loss does not see (a pooler under the default probe) keep ``ratio`` of their own parameters
    unreached = {name: layer for name, layer in layers.items() if fisher is not None and name not in fisher}
    reached = {name: layer for name, layer in layers.items() if name not in unreached}
    ranks = choose_ranks(reached, spectra, ratio=ratio, policy=policy, allocation=allocation)
    ranks.update(choose_ranks(unreached, spectra, ratio=ratio, policy=policy, allocation="uniform"))
    run = SequentialRun(model, layers, ranks, config, stats, abs_means)
    try:
        groups = layer_groups(order)
        blocks = _blockwise_plan(model, groups, config.data, calls, config)
        if blocks is None:
            reference = copy.deepcopy(model) if config.refits else None
            # a forward pass may stop once a group has its inputs, unless some layer runs twice in one pass
            early = isinstance(config.data, Sequence) and all(count == 1 for count in calls.values())
            for group in tqdm(groups, desc="lowrank.compress (calibrated)", unit="group", disable=not progress):
                run.group(group, model, reference, calibration, calibration, early=early)
        else:
            run.blockwise(blocks, groups, calibration, progress)
    except BaseException:
        swap_modules(model, [(name, layers[name]) for name in reversed(run.replaced)])
        raise
    reason = ("no rank below break-even is worth its parameters within the budget" if policy is None
              else f"{policy} gives no rank from 1 to below break-even")
    return final_plans(run.plans, order, spectra, reason)


def final_plans(plans: dict[str, LinearPlan], order: list[str], spectra: dict[str, torch.Tensor], reason: str
                ) -> list[LinearPlan]:
    """One plan per layer of ``order`` with its spectrum; layers without a plan stay dense for ``reason``."""
    return [dataclasses.replace(plans.get(name, LinearPlan(name, None, None, None, reason)), spectrum=spectra[name])
            for name in order]


def _blockwise_plan(
    model: nn.Module, groups: list[list[str]], calibration: Calibration, calls: dict[str, int],
    config: CalibrationConfig,
) -> Blocks | None:
    """The blocks to calibrate block by block, or None where the whole model must run for each group.

    Block by block needs: groups that gather statistics again (sequential and
    whitened), batches, every layer run once per forward, repeated blocks
    (:func:`lowrank.calibrate.blocks.find_blocks`) that receive the same inputs
    but the hidden states, each group inside one block or after the last one,
    and the groups of the blocks in block order.
    """
    if not (config.sequential and config.whiten and isinstance(calibration, Sequence)):
        return None
    if any(count != 1 for count in calls.values()):
        return None
    blocks = find_blocks(model, [name for group in groups for name in group])
    if blocks is None:
        return None
    indices = [blocks.index_of(group[0]) for group in groups]
    if any({blocks.index_of(name) for name in group} != {index} for group, index in zip(groups, indices)):
        return None
    inside = [index for index in indices if index is not None]
    if indices[0] is None or indices[: len(inside)] != inside or inside != sorted(inside):
        return None  # a group before the first block, between blocks, or out of block order
    return blocks if blocks_share_inputs(model, blocks, calibration[0]) else None


class SequentialRun:
    """The state of sequential compression: statistics refreshed group by group, plans made, layers replaced."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], ranks: dict[str, int | None],
                 config: CalibrationConfig, stats: dict[str, torch.Tensor], abs_means: dict[str, torch.Tensor]
                 ) -> None:
        self.model, self.layers, self.ranks, self.config = model, layers, ranks, config
        self.stats, self.abs_means = stats, abs_means
        self.cross: dict[str, torch.Tensor] = {}
        self.plans: dict[str, LinearPlan] = {}
        self.replaced: list[str] = []

    def group(self, group: list[str], network: nn.Module, reference: nn.Module | None, calibration: Calibration,
              reference_calibration: Calibration, *, early: bool, prefix: str = "") -> None:
        """Compress the layers of ``group`` that have a rank, on their inputs in ``network`` (and ``reference``).

        ``network`` is the model or one of its blocks (whose layers are named
        without ``prefix``), fed by ``calibration``; ``reference``, its dense
        copy fed by ``reference_calibration``, is given when second factors are
        refitted. The first group keeps the dense statistics gathered already.
        """
        todo = [name for name in group if self.ranks[name] is not None]
        missing = any(name not in self.stats for name in todo)  # streamed: only the first block's are kept
        if todo and (self.config.sequential and self.config.whiten and self.replaced or missing):
            local = {name: name[len(prefix):] for name in todo}
            if reference is not None and self.replaced:  # before the first replacement, the dense statistics
                paired = collect_paired_statistics(network, reference, list(local.values()), calibration,
                                                   reference_calibration=reference_calibration, stop_early=early)
                all_reduce_sum([moment for pair in paired.values() for moment in pair])
                for name, inner in local.items():
                    self.stats[name], self.cross[name] = paired[inner]
            else:
                watched = {inner: self.layers[name] for name, inner in local.items()}
                found = summed_statistics(collect_input_statistics(network, watched, calibration, stop_early=early))
                for name, inner in local.items():
                    self.stats[name], self.abs_means[name] = found[inner].gram, found[inner].abs_mean
        for index, name in enumerate(todo):  # each layer's statistics are dropped once used: they add up
            stats = (self.stats.pop(name), self.abs_means.pop(name, None), self.cross.pop(name, None))
            source = owner(index)  # the factors are spread over the processes, then shared
            plan = (_plan_layer(name, self.layers[name], self.ranks[name], self.config, *stats)
                    if source == world()[0] else None)
            self.plans[name] = _shared_plan(plan, name, self.layers[name], self.ranks[name], source)
        swap_modules(self.model, [(name, self.plans[name].module) for name in todo])
        self.replaced += todo

    def blockwise(self, blocks: Blocks, groups: list[list[str]], calibration: Sequence[CalibrationBatch],
                  progress: bool, *, on_block_start: Callable[[int], None] | None = None,
                  on_block_end: Callable[[int], None] | None = None) -> None:
        """Compress ``groups`` block by block, each block run on the outputs of the one before, cached.

        The model runs once up to its first block. Each block then runs on its
        cached inputs: once per group (up to the group) to gather statistics,
        and once to give the next block its inputs; with a refit, a dense copy
        of the block does the same on the dense model's hidden states. Groups
        after the last block (a pooler) run the model with its blocks replaced
        by their cached outputs. ``on_block_start(index)`` and
        ``on_block_end(index)`` are called around each block's turn (streaming
        loads a block's weights, then writes and frees them).
        """
        refits, device = self.config.refits, self.config.device
        inputs = [batch.to(device) for batch in block_inputs(self.model, self.model.get_submodule(blocks.names[0]),
                                                             calibration)]
        dense_inputs = inputs
        by_block: dict[int | None, list[list[str]]] = {}
        for group in groups:
            by_block.setdefault(blocks.index_of(group[0]), []).append(group)
        as_tuple = False
        for index, name in enumerate(tqdm(blocks.names, desc="lowrank.compress (calibrated)", unit="block",
                                          disable=not progress)):
            if on_block_start is not None:
                on_block_start(index)
            block = self.model.get_submodule(name)
            home = device_of(block)
            block.to(device or home)  # its turn on the calibration device; back home afterwards
            dense_block = copy.deepcopy(block) if refits else None
            for group in by_block.get(index, []):
                self.group(group, block, dense_block, inputs, dense_inputs, early=True, prefix=name + ".")
            inputs, as_tuple = next_block_inputs(block, inputs)
            dense_inputs = next_block_inputs(dense_block, dense_inputs)[0] if refits else inputs
            del dense_block  # freed before the next block is loaded
            block.to(home)
            for group in by_block.get(index, []):
                for layer_name in group:
                    self.layers[layer_name].to(home)  # the dense layers replaced, kept to undo a failure
            if on_block_end is not None:
                on_block_end(index)
        after = by_block.get(None, [])
        if not after:
            return
        reference, home = None, device_of(self.model)
        if refits:
            with replayed_blocks(self.model, blocks, [batch.args[0].to(home) for batch in dense_inputs], as_tuple):
                reference = copy.deepcopy(self.model)  # the layers outside the blocks, still dense
        with replayed_blocks(self.model, blocks, [batch.args[0].to(home) for batch in inputs], as_tuple):
            for group in after:
                self.group(group, self.model, reference, calibration, calibration, early=True)


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for none, or for parameters on the meta device)."""
    parameter = next(module.parameters(), None)
    return torch.device("cpu") if parameter is None or parameter.device.type == "meta" else parameter.device


def spread_spectra(layers: dict[str, nn.Module], spectrum: Callable[[str, nn.Module], torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """``spectrum(name, layer)`` of every layer, computed by one process each (round robin) and shared with all.

    Each spectrum has ``min(out, in)`` float64 values (one per component).
    """
    spectra = {}
    for index, (name, layer) in enumerate(layers.items()):
        if owner(index) == world()[0]:
            spectra[name] = spectrum(name, layer).cpu()
        else:
            spectra[name] = torch.empty(min(linear_weight(layer).shape), dtype=torch.float64)
        broadcast_from([spectra[name]], owner(index))
    return spectra


def summed_statistics(inputs: dict[str, InputStatistics]) -> dict[str, InputStatistics]:
    """Input statistics summed over the processes of torch.distributed (the same without a process group)."""
    if world()[1] == 1:
        return inputs
    counts = torch.tensor([s.count for s in inputs.values()], dtype=torch.float64)
    all_reduce_sum([*(s.gram for s in inputs.values()), *(s.abs_sum for s in inputs.values()), counts])
    return {name: InputStatistics(s.gram, s.abs_sum, int(count))
            for (name, s), count in zip(inputs.items(), counts.tolist())}


def _shared_plan(plan: LinearPlan | None, name: str, layer: nn.Module, rank: int, source: int) -> LinearPlan:
    """The plan of the process ``source`` (which made it) on every process, its factors broadcast."""
    if world()[1] == 1:
        return plan
    if plan is None:
        out_features, in_features = linear_weight(layer).shape
        bias = linear_bias(layer)
        device = linear_weight(layer).device
        module = LowRankLinear.from_factors(
            torch.zeros(rank, in_features, device=device), torch.zeros(out_features, rank, device=device),
            None if bias is None else torch.zeros_like(bias), linear_type(layer), dtype=layer.weight.dtype)
        module.train(layer.training)
        plan = LinearPlan(name, rank, module, 0.0, None)
    error = torch.tensor(plan.output_error, dtype=torch.float64)
    broadcast_from([*plan.module.state_dict().values(), error], source)
    return dataclasses.replace(plan, output_error=float(error))


def _plan_layer(
    name: str, layer: nn.Module, rank: int, config: CalibrationConfig, gram: torch.Tensor,
    abs_mean: torch.Tensor | None, cross: torch.Tensor | None = None,
) -> LinearPlan:
    """The low-rank replacement of ``layer`` at ``rank``: whitened by ``gram``, ASVD-scaled by ``abs_mean``, or plain.

    ``config`` says which (``whiten``), and how much to shrink ``gram`` for the
    whitening (``shrinkage``). With ``cross`` (the cross moment of dense and
    compressed inputs), the second factor is refitted to map the compressed
    inputs to the dense outputs, with ``config.ridge`` towards the unrefitted one.
    """
    weight = _weight64(layer)
    if config.whiten:
        if config.whiten == "asvd":
            first, second, _ = asvd_low_rank(weight, abs_mean, rank)
        else:
            first, second, _ = whitened_low_rank(weight, shrunk_to_diagonal(gram, config.shrinkage), rank)
        if cross is not None:
            second = refit_second(weight, first, gram, cross, damping=config.ridge,
                                  prior=second if config.ridge else None)
        bias = linear_bias(layer)
        module = LowRankLinear.from_factors(first, second, bias, linear_type(layer), dtype=layer.weight.dtype)
    else:
        module = LOW_RANK.from_dense(layer, rank)
    module.train(layer.training)
    error = relative_output_error(weight, module.weight.detach().double(), gram)
    return LinearPlan(name, rank, module, error, None)
