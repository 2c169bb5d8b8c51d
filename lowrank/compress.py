"""Whole-model compression: find the target layers, factorize them, swap them in, report.

``lowrank.compress(model, ratio=0.5)`` is the one call; every choice it makes
(which layers, which method per layer type, which rank) is a keyword argument.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank.calibrate import calibration_batches
from lowrank.data_aware import ALLOCATIONS, compress_linears
from lowrank.heal import heal, reference_outputs
from lowrank.nn import (
    CPConv,
    FactorizedModule,
    LowRankEmbedding,
    LowRankLinear,
    SVDConv,
    TNLinear,
    TTLinear,
    Tucker2Conv,
    UnsupportedLayerError,
    cp_rank_for_ratio,
    dense_flops,
    is_hf_conv1d,
    linear_rank_for_ratio,
    linear_weight,
    svd_rank_for_ratio,
    swap_modules,
    tt_rank_for_ratio,
    tucker2_ranks_for_ratio,
    weight_ratio,
)
from lowrank.rank import Energy, FixedRank, RankPolicy

# The layer kinds compress() tells apart, and the methods each accepts (the first is "auto").
METHODS: dict[str, tuple[str, ...]] = {
    "linear": ("svd", "tt", "tn"),
    "conv": ("tucker2", "cp", "svd-channel", "svd-spatial"),
    "pointwise": ("svd-channel",),
    "embedding": ("svd",),
}
# The relative rank increment of the structure search behind method "tn" (see lowrank.decompose.tn): one
# rank at a time would take hundreds of steps to fill the budget of a transformer-sized layer. The search
# stops growing at TN_TOL, a relative error below which a float32 weight is held as well as it can be.
TN_GROWTH = 0.5
TN_TOL = 1e-6
# The spatial size (per dimension) at which convolution FLOPs are compared for the break-even rule.
BREAK_EVEN_SPATIAL = 32


@dataclass
class LayerReport:
    """One row of a :class:`CompressionReport`: what happened to one targeted layer.

    ``relative_error`` is the weight's relative error; ``output_error`` (data-aware
    compression only) the relative error of the layer's outputs on the
    calibration inputs it received.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    method: str | None
    rank: int | tuple[int, ...] | None
    params_before: int
    params_after: int
    relative_error: float | None
    skip_reason: str | None = None
    output_error: float | None = None

    @property
    def replaced(self) -> bool:
        """Whether the layer was replaced by a factorized module."""
        return self.skip_reason is None


@dataclass
class CompressionReport:
    """What :func:`compress` did, one :class:`LayerReport` per targeted layer.

    Parameter counts include each layer's bias; ``params_before`` and
    ``params_after`` sum over the targeted layers (skipped ones count the same
    on both sides).
    """

    layers: list[LayerReport] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        """Parameters of the targeted layers before compression."""
        return sum(row.params_before for row in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the targeted layers after compression."""
        return sum(row.params_after for row in self.layers)

    @property
    def ratio(self) -> float:
        """Fraction of the targeted layers' parameters that remain."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-able data."""
        return {
            "settings": self.settings,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "ratio": self.ratio,
            "layers": [asdict(row) for row in self.layers],
        }

    def to_json(self, **kwargs: Any) -> str:
        """The report as a JSON string (``kwargs`` go to ``json.dumps``)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """Rebuild a report from :meth:`to_dict`'s output."""
        layers = []
        for row in data["layers"]:
            row = dict(row, shape=tuple(row["shape"]))
            if isinstance(row["rank"], list):
                row["rank"] = tuple(row["rank"])
            layers.append(LayerReport(**row))
        return cls(layers, dict(data.get("settings", {})))

    def __str__(self) -> str:
        header = ("layer", "type", "shape", "method", "rank", "params", "after", "rel. error", "out. error", "note")
        rows = [header]
        for row in self.layers:
            rank = "" if row.rank is None else "x".join(map(str, row.rank)) if isinstance(row.rank, tuple) else row.rank
            rows.append((
                row.name, row.type, "x".join(map(str, row.shape)), row.method or "-", str(rank),
                f"{row.params_before:,}", f"{row.params_after:,}",
                "-" if row.relative_error is None else f"{row.relative_error:.4f}",
                "-" if row.output_error is None else f"{row.output_error:.4f}", row.skip_reason or "",
            ))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(r, widths)).rstrip() for r in rows]
        replaced = sum(row.replaced for row in self.layers)
        lines.append(
            f"{replaced} of {len(self.layers)} targeted layers replaced; parameters of targeted layers "
            f"{self.params_before:,} -> {self.params_after:,} ({self.ratio:.1%})"
        )
        return "\n".join(lines)


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"`` (kernel larger than 1), ``"pointwise"`` (1x1 conv), ``"embedding"`` or None."""
    if isinstance(module, FactorizedModule):
        return None
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv" if math.prod(module.kernel_size) > 1 else "pointwise"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _resolve_methods(method: str | dict[str, str], kinds: Iterable[str]) -> dict[str, str]:
    """One method per layer kind from ``"auto"``, a method name, or a ``{kind: method}`` dict."""
    chosen = {kind: METHODS[kind][0] for kind in METHODS}
    if isinstance(method, dict):
        for kind, name in method.items():
            if kind not in METHODS:
                raise ValueError(f"method keys must be layer kinds {tuple(METHODS)}; got {kind!r}")
            if name != "auto" and name not in METHODS[kind]:
                raise ValueError(f"method for {kind} layers must be one of {METHODS[kind]}; got {name!r}")
            if name != "auto":
                chosen[kind] = name
        return chosen
    if method == "auto":
        return chosen
    fits = [kind for kind in kinds if method in METHODS[kind]]
    if not fits:
        allowed = sorted({m for kind in kinds for m in METHODS[kind]})
        raise ValueError(f"method must be 'auto' or one of {allowed} for the targeted layers; got {method!r}")
    chosen.update(dict.fromkeys(fits, method))
    return chosen


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _output_heads(model: nn.Module) -> set[int]:
    """Ids of modules that are output heads: tied to an input embedding, or the model's output embeddings."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {
        id(m) for m in model.modules()
        if layer_kind(m) == "linear" and id(m.weight) in embedding_weights
    }
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings) and isinstance(head := get_output_embeddings(), nn.Module):
        heads.add(id(head))
    return heads


def _weight_matrix(module: nn.Module, kind: str) -> torch.Tensor:
    """The matrix whose spectrum an SVD-based method truncates."""
    if kind == "linear":
        return linear_weight(module)
    if kind == "embedding":
        return module.weight
    return module.weight.reshape(module.weight.shape[0], -1)


def _unfolding_spectra(weight: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.linalg.svdvals(weight.detach().movedim(mode, 0).reshape(weight.shape[mode], -1).double())


def _choose_rank(
    module: nn.Module, kind: str, method: str, ratio: float | None, rank: int | None, policy: RankPolicy | None
) -> int | tuple[int, int]:
    """The rank (or Tucker-2 rank pair) that the rank policy gives ``module``; 0 when none fits.

    The ``*_for_ratio`` helpers budget the weight alone; ``ratio`` covers weight
    and bias together, with the bias kept as it is, so the weight's share of the
    budget is what remains once the bias is paid for. A :class:`RankPolicy`
    reads the singular values of the weight (of each channel unfolding for
    Tucker-2).
    """
    weight = module.weight.detach()
    if ratio is not None:
        bias = getattr(module, "bias", None)
        bias_size = 0 if bias is None else bias.numel()
        ratio = weight_ratio(ratio, weight.numel(), bias_size)
        if ratio <= 0:
            return 0
    if method == "tucker2":
        groups = getattr(module, "groups", 1)
        out_group, in_group = weight.shape[0] // groups, weight.shape[1]
        if ratio is not None:
            return tucker2_ranks_for_ratio(module, ratio)
        if rank is not None:
            return (min(rank, out_group), min(rank, in_group))
        return tuple(
            policy.choose(_unfolding_spectra(weight, mode), (weight.shape[mode], weight.numel() // weight.shape[mode]))
            for mode in (0, 1)
        )
    if method == "tn":
        return math.floor(ratio * weight.numel())
    if policy is not None:
        matrix = _weight_matrix(module, kind).detach()
        spectrum = torch.linalg.svdvals(matrix.double()) if policy.needs_spectrum else None
        return policy.choose(spectrum, tuple(matrix.shape))
    if rank is not None:
        return rank
    if method == "cp":
        return cp_rank_for_ratio(module, ratio)
    if method == "tt":
        return tt_rank_for_ratio(module, ratio)
    if method.startswith("svd-"):
        return svd_rank_for_ratio(module, ratio, scheme=method.removeprefix("svd-"))
    rows, cols = _weight_matrix(module, kind).shape
    return linear_rank_for_ratio(rows, cols, ratio)


def _factorize(module: nn.Module, kind: str, method: str, rank: int | tuple[int, int]) -> FactorizedModule:
    """Build the factorized replacement of ``module``."""
    if method == "tucker2":
        return Tucker2Conv.from_dense(module, rank)
    if method == "cp":
        return CPConv.from_dense(module, rank)
    if method.startswith("svd-"):
        return SVDConv.from_dense(module, rank, scheme=method.removeprefix("svd-"))
    if method == "tt":
        return TTLinear.from_dense(module, rank=rank)
    if method == "tn":
        return TNLinear.from_dense(module, max_params=rank, tol=TN_TOL, growth=TN_GROWTH)
    if kind == "embedding":
        return LowRankEmbedding.from_dense(module, rank)
    return LowRankLinear.from_dense(module, rank)


def _probe_shape(module: nn.Module, kind: str) -> tuple[int, ...]:
    """The input shape at which dense and factorized FLOPs are compared."""
    if kind in ("conv", "pointwise"):
        return (1, module.in_channels, *(BREAK_EVEN_SPATIAL,) * len(module.kernel_size))
    if kind == "embedding":
        return (1,)
    return (1, linear_weight(module).shape[1])


def _replace(
    name: str, module: nn.Module, kind: str, method: str, ratio: float | None, rank: int | None,
    policy: RankPolicy | None,
) -> tuple[FactorizedModule | None, LayerReport]:
    """Factorize one layer under the rank policy; return the replacement (None when skipped) and its row."""
    params = sum(p.numel() for p in module.parameters())
    row = LayerReport(name, type(module).__name__, tuple(module.weight.shape), method,
                      None, params, params, None)
    try:
        rank = row.rank = _choose_rank(module, kind, method, ratio, rank, policy)
        if (isinstance(rank, int) and rank < 1) or (isinstance(rank, tuple) and min(rank) < 1):
            row.skip_reason = "no rank >= 1 fits the ratio"
            return None, row
        factorized = _factorize(module, kind, method, rank)
    except UnsupportedLayerError as error:
        row.skip_reason = str(error)
        return None, row
    shape = _probe_shape(module, kind)
    if factorized.num_params >= params:
        row.skip_reason = f"break-even: {factorized.num_params:,} factorized parameters >= {params:,} dense"
        return None, row
    if kind != "embedding" and factorized.flops(shape) >= dense_flops(module, shape):
        row.skip_reason = (
            f"break-even: {factorized.flops(shape):,} factorized MACs >= {dense_flops(module, shape):,} dense "
            f"at input {shape}"
        )
        return None, row
    row.relative_error = _weight_error(module, factorized)
    row.rank = _reported_rank(factorized)
    row.params_after = factorized.num_params
    return factorized, row


def _weight_error(dense: nn.Module, factorized: FactorizedModule) -> float:
    """The relative error of the factorized weight against the dense layer's."""
    # in the weight's own precision (float32 for half types): a report needs a few digits, not float64's
    dtype = torch.promote_types(dense.weight.dtype, torch.float32)
    # both in the dense layer's own layout (``(in, out)`` for a Hugging Face Conv1D)
    weight = dense.weight.detach().to(dtype)
    approx = factorized.dense_weight().detach().to(dtype)
    return float(torch.linalg.vector_norm(weight - approx) / torch.linalg.vector_norm(weight))


def _reported_rank(module: FactorizedModule) -> int | tuple[int, ...]:
    """The rank a report shows: the module's rank(s), or a tensor network's bond ranks."""
    config = module.config()
    if "bonds" in config:
        return tuple(rank for _, _, rank in config["bonds"])
    rank = config.get("rank", config.get("ranks"))
    return tuple(rank) if isinstance(rank, list) else rank


def compress(
    model: nn.Module,
    ratio: float | None = None,
    *,
    rank: int | RankPolicy | None = None,
    energy: float | None = None,
    method: str | dict[str, str] = "auto",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    kinds: Sequence[str] = ("linear", "conv"),
    calibration: Any = None,
    tokenizer: Any = None,
    allocation: str | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    whiten: bool | str = True,
    sequential: bool = True,
    refit: bool = True,
    heal_steps: int = 0,
    heal_seconds: float | None = None,
    progress: bool = True,
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
        layers left dense (no rank fits, or break-even); with a global
        allocation, the data-aware layers together keep at most ``ratio`` of
        theirs, layers left dense included. This is the default policy, with
        ``ratio=0.5``.
    rank : int or RankPolicy, optional
        A fixed rank for every layer instead (both Tucker-2 ranks, capped at
        the channel counts; the uniform internal rank of a TT layer); or a
        :class:`lowrank.rank.RankPolicy` (``VBMF()``, ``Energy(0.9)``,
        ``HeavyTail()``, ...) applied to each weight's singular values (each
        channel unfolding's for Tucker-2; the whitened spectrum with calibration).
    energy : float, optional
        Keep the smallest rank whose singular values hold this fraction of the
        weight's squared norm, in (0, 1] (for Tucker-2, per channel mode); the
        same as ``rank=Energy(energy)``.
    method : str or dict
        ``"auto"`` (low-rank SVD for linear layers and embeddings, Tucker-2 for
        k×k convolutions, a channel SVD for 1×1 convolutions); one method name,
        applied to every targeted kind that supports it (linear: ``"svd"``,
        ``"tt"``, ``"tn"`` (a tensor network of searched structure, within
        the ``ratio`` budget); conv: ``"tucker2"``, ``"cp"``, ``"svd-channel"``,
        ``"svd-spatial"``); or a dict ``{kind: method}`` with kinds ``"linear"``,
        ``"conv"``, ``"pointwise"`` and ``"embedding"``.
    include : sequence of str, optional
        Glob patterns (``fnmatch``) of module names: only matching layers are targeted.
    exclude : sequence of str
        Glob patterns of module names never targeted.
    filter_fn : callable, optional
        ``filter_fn(name, module) -> bool``; only layers for which it is true are targeted.
    kinds : sequence of str
        The layer kinds targeted: ``"linear"`` (``nn.Linear``, Hugging Face
        ``Conv1D``), ``"conv"`` (kernel larger than 1), ``"pointwise"`` (1×1
        convolutions) and ``"embedding"`` (``nn.Embedding``, compared on
        parameters only: a dense lookup does no arithmetic).
    calibration : list of str, DataLoader, iterable of batches, or callable, optional
        Calibration inputs (see :func:`lowrank.calibrate.calibration_batches`):
        texts are tokenised with ``tokenizer``; batches are run as the model's
        inputs; a callable ``calibration(model)`` runs the model itself (no
        Fisher allocation and no healing then).
    tokenizer : callable, optional
        The checkpoint's tokenizer, for texts.
    allocation : {"uniform", "energy", "fisher", "sensitivity"}, optional
        How ``ratio`` is spent with calibration (see
        :func:`lowrank.data_aware.compress_linears`); default ``"fisher"``,
        the best measured (``benchmarks/rank.py``).
    loss_fn : callable, optional
        With calibration: ``loss_fn(model, batch) -> scalar tensor`` (``batch``
        a :class:`lowrank.calibrate.CalibrationBatch`), a task loss for the
        ``"fisher"`` allocation (instead of the distance to the dense model's
        outputs) and for ``"sensitivity"`` (required there).
    whiten : bool or "asvd"
        With calibration: truncate the whitened weight (default), the weight
        with its input channels scaled by their mean activation (``"asvd"``,
        cheaper), or the weight itself (False).
    sequential : bool
        With calibration: calibrate each layer on the inputs it receives from
        the layers compressed before it (default) or on the dense model's.
    refit : bool
        With calibration and ``sequential``: refit each second factor in
        closed form so the layer, fed by the compressed layers before it,
        reproduces the dense layer's outputs on the dense model's inputs
        (default; keeps a dense copy of the model during the call).
    heal_steps : int
        With calibration: Adam steps of healing after compression (0: none).
    heal_seconds : float, optional
        With calibration: most seconds of healing (alone, or bounding ``heal_steps``).
    progress : bool
        Show a progress bar over the targeted layers.

    Returns
    -------
    CompressionReport
        One row per targeted layer; ``print(report)`` shows a table,
        ``report.to_dict()`` / ``report.to_json()`` give JSON.

    Examples
    --------
    >>> import torch, lowrank
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> report = lowrank.compress(model, ratio=0.5, progress=False)
    >>> type(model[0]).__name__, report.ratio <= 0.5
    ('LowRankLinear', True)

    """
    given = [key for key, value in {"ratio": ratio, "rank": rank, "energy": energy}.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one rank policy among ratio=, rank= and energy=; got {', '.join(given)}")
    if not given:
        ratio = 0.5
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
        raise ValueError(f"ratio must be a fraction in (0, 1), got {ratio!r}")
    if rank is not None and not isinstance(rank, RankPolicy) and (
        isinstance(rank, bool) or not isinstance(rank, int) or rank < 1
    ):
        raise ValueError(f"rank must be an int >= 1 or a lowrank.rank.RankPolicy, got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1):
        raise ValueError(f"energy must be a fraction in (0, 1], got {energy!r}")
    policy = Energy(energy) if energy is not None else rank if isinstance(rank, RankPolicy) else None
    fixed_rank = rank if isinstance(rank, int) else None
    unknown = set(kinds) - set(METHODS)
    if unknown or isinstance(kinds, str):
        raise ValueError(f"kinds must be a sequence of layer kinds among {tuple(METHODS)}; got {kinds!r}")
    kinds = set(kinds)
    methods = _resolve_methods(method, kinds)
    if ratio is None and any(methods[kind] == "tn" for kind in kinds):
        raise ValueError("method 'tn' searches a network within a parameter budget: give ratio=, not rank=/energy=")
    if policy is not None and policy.needs_spectrum:
        spectrum_free = sorted({methods[k] for k in kinds} & {"cp", "tt", "svd-spatial"})
        if spectrum_free:
            raise ValueError(
                f"{policy} picks ranks from singular values, which method {spectrum_free[0]!r} has none of"
            )
    calibrated = _calibration_settings(calibration, tokenizer, allocation, loss_fn, whiten, sequential, refit,
                                       heal_steps, heal_seconds, ratio, model)

    heads = _output_heads(model)
    targets, report = [], CompressionReport(settings={
        "ratio": ratio, "rank": None if rank is None else str(rank), "energy": energy, "method": methods,
        "include": list(include) if include is not None else None, "exclude": list(exclude),
        "kinds": sorted(kinds),
    })
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind not in kinds or _matches(name, exclude) or (include is not None and not _matches(name, include)):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        if id(module) in heads:
            params = sum(p.numel() for p in module.parameters())
            report.layers.append(LayerReport(name, type(module).__name__, tuple(module.weight.shape), None,
                                             None, params, params, None, "output head"))
            continue
        targets.append((name, module, kind))

    data_aware = {}
    if calibrated is not None:
        data_aware = {name: module for name, module, kind in targets if kind == "linear" and methods[kind] == "svd"}
        report.settings["calibration"] = calibrated.describe()
    replacements = []
    for name, module, kind in tqdm(targets, desc="lowrank.compress", unit="layer", disable=not progress):
        if name in data_aware:
            continue
        try:
            factorized, row = _replace(name, module, kind, methods[kind], ratio, fixed_rank, policy)
        except Exception as error:
            raise RuntimeError(
                f"compressing layer {name!r} ({type(module).__name__}, weight {tuple(module.weight.shape)}) "
                f"failed; the model is unchanged: {error}"
            ) from error
        report.layers.append(row)
        if factorized is not None:
            factorized.train(module.training)
            replacements.append((name, factorized))
    if data_aware:
        _compress_calibrated(model, data_aware, calibrated, ratio, fixed_rank, policy, report, progress)
    originals = [(name, module) for name, module, _ in targets if name in data_aware or name in dict(replacements)]
    try:
        swap_modules(model, replacements)
        if calibrated is not None and calibrated.heal:
            report.settings["heal"] = asdict(heal(
                model, calibrated.batches, calibrated.targets, steps=calibrated.heal_steps or None,
                seconds=calibrated.heal_seconds, progress=progress,
            ))
    except Exception as error:
        swap_modules(model, originals)
        raise RuntimeError(f"compression failed after the layers were factorized; the model is unchanged: {error}") \
            from error
    return report


@dataclass
class _Calibrated:
    """The calibration settings of one :func:`compress` call, checked, with the batches and healing targets."""

    batches: Any
    allocation: str
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None
    whiten: bool | str
    sequential: bool
    refit: bool
    heal_steps: int
    heal_seconds: float | None
    targets: list[torch.Tensor] | None = None

    @property
    def heal(self) -> bool:
        return bool(self.heal_steps) or self.heal_seconds is not None

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-able data for the report."""
        batches = "callable" if callable(self.batches) else len(self.batches)
        return {"batches": batches, "allocation": self.allocation, "whiten": self.whiten,
                "sequential": self.sequential, "refit": self.refit, "heal_steps": self.heal_steps,
                "heal_seconds": self.heal_seconds}


def _calibration_settings(
    calibration: Any, tokenizer: Any, allocation: str | None, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    whiten: bool | str, sequential: bool, refit: bool, heal_steps: int, heal_seconds: float | None,
    ratio: float | None, model: nn.Module,
) -> _Calibrated | None:
    """Check the calibration arguments of :func:`compress`; None without calibration data."""
    if calibration is None:
        asked = [name for name, value in (("allocation", allocation), ("loss_fn", loss_fn),
                                          ("heal_steps", heal_steps or None), ("heal_seconds", heal_seconds),
                                          ("tokenizer", tokenizer)) if value]
        if asked:
            raise ValueError(f"{', '.join(asked)} need calibration data: give calibration=")
        return None
    if allocation is None:
        allocation = "fisher" if ratio is not None else "uniform"
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation != "uniform" and ratio is None:
        raise ValueError(f"allocation={allocation!r} spends a budget: give ratio=, or allocation='uniform'")
    if isinstance(heal_steps, bool) or not isinstance(heal_steps, int) or heal_steps < 0:
        raise ValueError(f"heal_steps must be an int >= 0, got {heal_steps!r}")
    if heal_seconds is not None and (isinstance(heal_seconds, bool) or not heal_seconds > 0):
        raise ValueError(f"heal_seconds must be a positive number of seconds, got {heal_seconds!r}")
    parameter = next(model.parameters(), None)
    if callable(calibration) and not isinstance(calibration, nn.Module):
        batches = calibration
        if allocation in ("fisher", "sensitivity") or heal_steps or heal_seconds is not None:
            raise ValueError("a callable calibration runs the model itself: it supports neither "
                             f"allocation={allocation!r} nor healing; give texts or batches")
        refit = False  # the paired statistics run the model batch by batch
    else:
        batches = calibration_batches(calibration, tokenizer=tokenizer,
                                      device=None if parameter is None else parameter.device)
    if allocation == "sensitivity" and loss_fn is None:
        raise ValueError("allocation='sensitivity' needs loss_fn=: the distance to the dense model has no "
                         "first-order change at the dense model")
    if whiten not in (True, False, "asvd"):
        raise ValueError(f"whiten must be True, False or 'asvd', got {whiten!r}")
    calibrated = _Calibrated(batches, allocation, loss_fn, whiten, bool(sequential), bool(refit), heal_steps,
                             heal_seconds)
    if calibrated.heal:
        calibrated.targets = reference_outputs(model, batches)
    return calibrated


def _compress_calibrated(
    model: nn.Module, layers: dict[str, nn.Module], calibrated: _Calibrated, ratio: float | None,
    rank: int | None, policy: RankPolicy | None, report: CompressionReport, progress: bool,
) -> None:
    """Compress ``layers`` data-aware (replacing them in ``model``) and add their rows to ``report``."""
    try:
        plans = compress_linears(
            model, layers, calibrated.batches, ratio=ratio,
            policy=FixedRank(rank) if rank is not None else policy, allocation=calibrated.allocation,
            whiten=calibrated.whiten, sequential=calibrated.sequential, refit=calibrated.refit,
            loss_fn=calibrated.loss_fn, progress=progress,
        )
    except Exception as error:
        raise RuntimeError(f"data-aware compression of the linear layers failed; the model is unchanged: {error}") \
            from error
    for plan in plans:
        layer = layers[plan.name]
        params = sum(p.numel() for p in layer.parameters())
        row = LayerReport(plan.name, type(layer).__name__, tuple(layer.weight.shape), "svd", plan.rank, params,
                          params, None, plan.skip_reason, plan.output_error)
        if plan.module is not None:
            row.relative_error = _weight_error(layer, plan.module)
            row.params_after = plan.module.num_params
        report.layers.append(row)
