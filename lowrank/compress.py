"""Whole-model compression: choose the target layers, factorize them, swap them in, report.

``lowrank.compress(model, ratio=0.5)`` is the one call. Its choices come in
small configs, in the spirit of torchao's ``quantize_(model, config)``: which
layers (:class:`lowrank.Targets`), how calibration data is used
(:class:`lowrank.CalibrationConfig`) and how long healing runs
(:class:`lowrank.HealConfig`); each config's fields are also accepted as
keyword shortcuts (``include=``, ``allocation=``, ``heal_steps=``, ...). The
rank comes from ``ratio=``, ``rank=`` or ``energy=``, the module class from
``method=`` through :data:`lowrank.nn.METHODS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from lowrank.checks import check_fraction
from lowrank.data_aware import LOW_RANK, CalibrationConfig, LinearPlan, compress_linears
from lowrank.heal import HealConfig, reference_outputs
from lowrank.heal import heal as heal_factors
from lowrank.nn import FactorizedModule, Method, UnsupportedLayerError, resolve_methods
from lowrank.nn.dense import dense_flops, linear_weight
from lowrank.nn.surgery import swap_modules
from lowrank.rank import Energy, FixedRank, ParamFraction, RankPolicy
from lowrank.report import CompressionReport, LayerReport
from lowrank.targets import Target, Targets

# The spatial size (per dimension) at which convolution FLOPs are compared for the break-even rule.
BREAK_EVEN_SPATIAL = 32
# Keyword shortcuts of compress(): each names a field of one config. Those of BATCH_SHAPING act when the
# calibration data is made into batches, so they cannot change a CalibrationConfig made already.
BATCH_SHAPING = ("tokenizer", "batch_size", "max_length")
SHORTCUTS: dict[str, tuple[str, str]] = {
    **{name: ("targets", name) for name in ("include", "exclude", "kinds", "filter_fn")},
    **{name: ("calibration", name) for name in (
        "tokenizer", "allocation", "whiten", "sequential", "refit", "shrinkage", "ridge", "n_probes", "loss_fn",
        "device", "batch_size", "max_length",
    )},
    **{f"heal_{name}": ("heal", name) for name in ("steps", "seconds", "lr", "holdout", "eval_every", "patience")},
}


def compress(
    model: nn.Module,
    ratio: float | None = None,
    *,
    rank: int | RankPolicy | None = None,
    energy: float | None = None,
    method: str | Mapping[str, str] = "auto",
    targets: Targets | None = None,
    calibration: Any = None,
    heal: HealConfig | None = None,
    progress: bool = True,
    **shortcuts: Any,
) -> CompressionReport:
    """Replace a model's layers by factorized ones, in place.

    By default every ``nn.Linear``, Hugging Face ``Conv1D`` and ``nn.Conv1d/2d/3d``
    with a kernel larger than 1 is targeted, except output heads (a linear layer
    whose weight is tied to an embedding, or the model's ``get_output_embeddings()``).
    Each targeted layer is decomposed on its own and replaced only if that lowers
    both its parameter count and its FLOPs (the break-even rule); otherwise it
    stays dense and the report says why.

    With ``calibration`` data, the linear layers compressed by SVD are
    compressed data-aware (:mod:`lowrank.data_aware`): each weight is truncated
    where it least changes the layer's outputs on the calibration inputs
    (whitening), ``ratio`` is spent across layers where it costs least
    (``allocation``), each layer is calibrated on the inputs it receives from
    the layers already compressed (``sequential``), and the factors can then
    be trained briefly towards the dense model's outputs (healing).

    Parameters
    ----------
    model : nn.Module
        The model, modified in place. If any layer fails, the model is left
        exactly as it was and the error names the layer.
    ratio : float, optional
        Fraction of the targeted layers' parameters to keep, in (0, 1). Without
        calibration (or with ``allocation="uniform"``) every layer gets the
        largest rank whose factorized module (factors plus bias) holds at most
        ``ratio`` times the dense layer's parameters (weight plus bias), so the
        targeted layers keep at most ``ratio`` of their parameters, except for
        layers left dense (no rank fits, or break-even); the same as
        ``rank=ParamFraction(ratio)``. With a global allocation, the data-aware
        layers together keep at most ``ratio`` of theirs, layers left dense
        included. This is the default policy, with ``ratio=0.5``.
    rank : int or RankPolicy, optional
        A fixed rank for every layer instead (both Tucker-2 ranks, capped at
        the channel counts; the uniform internal rank of a TT layer); or a
        :class:`lowrank.rank.RankPolicy` (``VBMF()``, ``Energy(0.9)``,
        ``HeavyTail()``, ``ParamFraction(0.5)``, ...) applied to each layer
        through its method (:meth:`lowrank.nn.Method.choose_rank`: the
        singular values of the matrices its rank truncates, each channel
        unfolding's for Tucker-2; the whitened spectrum with calibration).
    energy : float, optional
        Keep the smallest rank whose singular values hold this fraction of the
        weight's squared norm, in (0, 1] (for Tucker-2, per channel mode); the
        same as ``rank=Energy(energy)``.
    method : str or dict
        ``"auto"`` (low-rank SVD for linear layers and embeddings, Tucker-2 for
        k×k convolutions, a channel SVD for 1×1 convolutions); one method name,
        applied to every targeted kind that has it (linear: ``"svd"``,
        ``"tt"``, ``"tn"`` (a tensor network of searched structure, within
        the ``ratio`` budget); conv: ``"tucker2"``, ``"cp"``, ``"svd-channel"``,
        ``"svd-spatial"``); or a dict ``{kind: method}`` with kinds ``"linear"``,
        ``"conv"``, ``"pointwise"`` and ``"embedding"``. See :data:`lowrank.nn.METHODS`.
    targets : Targets, optional
        Which layers (default ``Targets()``: linear layers and k×k convolutions).
        Shortcuts: ``include=``, ``exclude=`` (name globs), ``kinds=`` and
        ``filter_fn=``, as in :class:`lowrank.Targets`. A selection that
        matches no layer raises a ``ValueError``.
    calibration : CalibrationConfig, or list of str, DataLoader, iterable of batches, or callable, optional
        Calibration data (made into a :class:`lowrank.CalibrationConfig`
        with the shortcuts ``tokenizer=``, ``allocation=``, ``whiten=``,
        ``sequential=``, ``refit=``, ``shrinkage=``, ``ridge=``, ``n_probes=``, ``loss_fn=``, ``device=``
        (where each block runs its turn: ``"cuda"`` for a CPU model larger
        than the GPU), ``batch_size=`` and ``max_length=``), or a config. The
        defaults (``"energy"`` allocation with a ratio, no refit, whitened,
        sequential) lost the fewest points on text of a domain the calibration
        never saw (``benchmarks/generalise.py``).
    heal : HealConfig, optional
        With calibration data: Adam on the factors towards the dense model's
        outputs after compression. Shortcuts ``heal_steps=``,
        ``heal_seconds=``, ``heal_lr=``, ``heal_holdout=`` (early stopping on
        held-out calibration batches), ``heal_eval_every=`` and
        ``heal_patience=``, as in :class:`lowrank.HealConfig`.
    progress : bool
        Show a progress bar over the targeted layers.
    **shortcuts
        Fields of ``targets``, ``calibration`` and ``heal``, listed above; they
        override the fields of a config given too.

    Returns
    -------
    CompressionReport
        One row per targeted layer; ``print(report)`` shows a table,
        ``report.to_dict()`` / ``report.to_json()`` give JSON, and
        ``report.settings`` holds the configs' own dict forms.

    Examples
    --------
    >>> import torch, lowrank
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> report = lowrank.compress(model, ratio=0.5, progress=False)
    >>> type(model[0]).__name__, report.ratio <= 0.5
    ('LowRankLinear', True)

    """
    policy = _policy(ratio, rank, energy)
    budget = rank is None and energy is None  # a ratio, spent across the calibrated layers by the allocation
    targets, calibrated, heal = _configs(targets, calibration, heal, shortcuts)
    methods = resolve_methods(method, targets.kinds)
    if calibrated is not None:  # the allocation that runs, recorded as such
        calibrated = dataclasses.replace(calibrated, allocation=calibrated.allocation_for(budget))
    if calibrated is None and heal.enabled:
        raise ValueError("healing needs calibration data: give calibration=")
    if calibrated is not None and calibrated.runs_itself and heal.enabled:
        raise ValueError("a callable calibration runs the model itself: it does not support healing; "
                         "give texts or batches")
    if heal.enabled and heal.holdout and len(calibrated.data) < 2:
        raise ValueError(f"heal_holdout={heal.holdout} holds out calibration batches to stop early on: it needs at "
                         f"least 2 batches, got {len(calibrated.data)} (heal_holdout=0 heals on it without stopping "
                         "early)")
    selected = targets.select(model)
    report = CompressionReport(settings=_settings(policy, rank, energy, methods, targets, calibrated, heal))
    calibrated_layers: dict[str, nn.Module] = {}
    replacements = []
    for target in tqdm(selected, desc="lowrank.compress", unit="layer", disable=not progress):
        chosen = methods[target.kind]
        if target.head:
            report.layers.append(LayerReport.dense(target.name, target.module, skip_reason="output head"))
        elif calibrated is not None and chosen is LOW_RANK:  # the method data-aware compression implements
            calibrated_layers[target.name] = target.module
        else:
            row, factorized = _factorize_layer(target, chosen, policy)
            report.layers.append(row)
            if factorized is not None:
                replacements.append((target.name, factorized))
    if calibrated is not None:
        parameter = next(model.parameters(), None)
        calibrated = calibrated.to(None if parameter is None else parameter.device)
        healing_targets = reference_outputs(model, calibrated.data) if heal.enabled else None
        if calibrated_layers:
            report.layers += _compress_calibrated(model, calibrated_layers, calibrated, policy, budget, progress)
    replaced = set(calibrated_layers) | {name for name, _ in replacements}
    originals = [(target.name, target.module) for target in selected if target.name in replaced]
    try:
        swap_modules(model, replacements)
        if heal.enabled:
            report.healing = dataclasses.asdict(
                heal_factors(model, calibrated.data, healing_targets, heal, progress=progress)
            )
    except Exception as error:
        swap_modules(model, originals)
        raise RuntimeError(f"compression failed after the layers were factorized; the model is unchanged: {error}") \
            from error
    return report


def _settings(
    policy: RankPolicy, rank: int | RankPolicy | None, energy: float | None, methods: Mapping[str, Method],
    targets: Targets, calibrated: CalibrationConfig | None, heal: HealConfig,
) -> dict[str, Any]:
    """A compression's settings as the report records them (JSON-able)."""
    budget = rank is None and energy is None
    return {
        "ratio": policy.fraction if budget else None,
        "rank": None if rank is None else str(policy),
        "energy": policy.energy if energy is not None else None,
        "method": {kind: methods[kind].name for kind in targets.kinds},
        "targets": targets.to_dict(),
        "calibration": None if calibrated is None else calibrated.to_dict(),
        "heal": heal.to_dict(),
    }


def _policy(ratio: float | None, rank: int | RankPolicy | None, energy: float | None) -> RankPolicy:
    """The one rank policy that ``ratio``, ``rank`` or ``energy`` stands for (``ratio=0.5`` when none is given)."""
    given = [name for name, value in (("ratio", ratio), ("rank", rank), ("energy", energy)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one rank policy among ratio=, rank= and energy=; got {', '.join(given)}")
    if energy is not None:
        return Energy(energy)
    if rank is not None:
        return rank if isinstance(rank, RankPolicy) else FixedRank(rank)
    return ParamFraction(check_fraction(0.5 if ratio is None else ratio, "ratio", high_closed=False))


def _configs(
    targets: Targets | None, calibration: Any, heal: HealConfig | None, shortcuts: dict[str, Any]
) -> tuple[Targets, CalibrationConfig | None, HealConfig]:
    """The three configs of a :func:`compress` call, with the keyword shortcuts applied to them."""
    unknown = sorted(set(shortcuts) - set(SHORTCUTS))
    if unknown:
        raise TypeError(f"compress() got unexpected keyword argument(s) {', '.join(unknown)}; its shortcuts are "
                        f"{', '.join(SHORTCUTS)}")
    for name, value, kind in (("targets", targets, Targets), ("heal", heal, HealConfig)):
        if value is not None and not isinstance(value, kind):
            hint = " (name globs go to include=)" if name == "targets" else ""
            raise TypeError(f"{name}= takes a lowrank.{kind.__name__}{hint}, got {type(value).__name__}")
    fields: dict[str, dict[str, Any]] = {"targets": {}, "calibration": {}, "heal": {}}
    for name, value in shortcuts.items():
        config, field = SHORTCUTS[name]
        fields[config][field] = value
    targets = dataclasses.replace(targets or Targets(), **fields["targets"])
    heal = dataclasses.replace(heal or HealConfig(), **fields["heal"])
    if calibration is None:
        if fields["calibration"]:
            raise ValueError(f"{', '.join(fields['calibration'])} need calibration data: give calibration=")
        return targets, None, heal
    if not isinstance(calibration, CalibrationConfig):
        return targets, CalibrationConfig(calibration, **fields["calibration"]), heal
    shaping = [name for name in BATCH_SHAPING if name in fields["calibration"]]
    if shaping:
        raise ValueError(f"{', '.join(shaping)} shape the batches that a CalibrationConfig made already: "
                         "give them to CalibrationConfig(...)")
    return targets, dataclasses.replace(calibration, **fields["calibration"]), heal


def _factorize_layer(
    target: Target, method: Method, policy: RankPolicy
) -> tuple[LayerReport, FactorizedModule | None]:
    """One layer factorized by ``method`` at the rank ``policy`` gives it: its report row and module (None: dense).

    A layer the method cannot represent, no rank of which fits, or whose
    factorized form would not be smaller and cheaper (the break-even rule)
    stays dense with the reason in its row. Any other error names the layer.
    """
    layer = target.module
    row = LayerReport.dense(target.name, layer, method.name)
    described = f"layer {target.name!r} ({type(layer).__name__}, weight {tuple(layer.weight.shape)})"
    try:
        rank = method.choose_rank(layer, policy)
        if not method.budget_only:  # a searched structure's "rank" is its budget, not worth a column
            row.rank = rank
        if rank is None:
            row.skip_reason = "no rank >= 1 fits the ratio"
            return row, None
    except UnsupportedLayerError as error:
        row.skip_reason = str(error)
        return row, None
    except ValueError as error:  # the policy cannot choose this method's rank
        raise ValueError(f"{described}: {error}") from error
    try:
        factorized = method.from_dense(layer, rank)
    except UnsupportedLayerError as error:
        row.skip_reason = str(error)
        return row, None
    except Exception as error:
        raise RuntimeError(f"compressing {described} failed; the model is unchanged: {error}") from error
    shape = _probe_shape(layer, target.kind)
    if factorized.num_params >= row.params_before:
        row.skip_reason = f"break-even: {factorized.num_params:,} factorized parameters >= {row.params_before:,} dense"
        return row, None
    if target.kind != "embedding" and factorized.flops(shape) >= dense_flops(layer, shape):
        row.skip_reason = (
            f"break-even: {factorized.flops(shape):,} factorized MACs >= {dense_flops(layer, shape):,} dense "
            f"at input {shape}"
        )
        return row, None
    factorized.train(layer.training)
    row.record(layer, factorized)
    return row, factorized


def _probe_shape(layer: nn.Module, kind: str) -> tuple[int, ...]:
    """The input shape at which dense and factorized FLOPs are compared."""
    if kind in ("conv", "pointwise"):
        return (1, layer.in_channels, *(BREAK_EVEN_SPATIAL,) * len(layer.kernel_size))
    if kind == "embedding":
        return (1,)
    return (1, linear_weight(layer).shape[1])


def _compress_calibrated(
    model: nn.Module, layers: dict[str, nn.Module], config: CalibrationConfig, policy: RankPolicy, budget: bool,
    progress: bool,
) -> list[LayerReport]:
    """Compress ``layers`` data-aware (replacing them in ``model``); their report rows.

    With ``budget``, ``policy`` is the ``ratio`` that the allocation spends
    across the layers; otherwise each layer gets the rank ``policy`` gives it.
    """
    try:
        plans = compress_linears(model, layers, config, ratio=policy.fraction if budget else None,
                                 policy=None if budget else policy, progress=progress)
    except Exception as error:
        raise RuntimeError(f"data-aware compression of the linear layers failed; the model is unchanged: {error}") \
            from error
    return [_calibrated_row(plan, layers[plan.name]) for plan in plans]


def _calibrated_row(plan: LinearPlan, layer: nn.Module) -> LayerReport:
    """The report row of a layer compressed data-aware; ``layer`` is the dense one."""
    row = LayerReport.dense(plan.name, layer, LOW_RANK.name, plan.skip_reason)
    row.rank, row.output_error = plan.rank, plan.output_error
    if plan.spectrum is not None:
        row.record_spectrum(plan.spectrum)
    if plan.module is not None:
        row.record(layer, plan.module)
    return row

