"""What a compression did: one row per targeted layer, and the settings it ran with."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowrank.nn import FactorizedModule
from lowrank.nn.dense import count_params

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class LayerReport:
    """One row of a :class:`CompressionReport`: what happened to one targeted layer.

    ``relative_error`` is the weight's relative error; ``output_error`` (data-aware
    compression only) the relative error of the layer's outputs on the
    calibration inputs it received; ``spectrum`` (data-aware compression only)
    the values its rank was chosen against, to 4 significant digits, where
    ``rank`` cuts (the whitened weight's singular values, largest first).
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
    spectrum: list[float] | None = None

    @property
    def replaced(self) -> bool:
        """Whether the layer was replaced by a factorized module."""
        return self.skip_reason is None

    @classmethod
    def dense(
        cls, name: str, layer: nn.Module, method: str | None = None, skip_reason: str | None = None
    ) -> LayerReport:
        """The row of ``layer`` before anything is decided: its size, and no rank or error yet."""
        params = count_params(layer)
        return cls(name, type(layer).__name__, tuple(layer.weight.shape), method, None, params, params, None,
                   skip_reason)

    def record_spectrum(self, values: torch.Tensor) -> None:
        """Keep the values the rank was chosen against (in component order), to 4 significant digits."""
        self.spectrum = [float(f"{value:.4g}") for value in values.tolist()]

    def record(self, layer: nn.Module, module: FactorizedModule) -> None:
        """Fill in the replacement of ``layer`` by ``module``: its rank, parameters and relative weight error."""
        self.rank = module.reported_rank
        self.params_after = module.num_params
        self.relative_error = weight_error(layer, module)
        self.skip_reason = None


def weight_error(dense: nn.Module, factorized: FactorizedModule) -> float:
    """The relative error of the factorized weight against the dense layer's.

    In the weight's own precision (float32 for half types: a report needs a
    few digits, not float64's), both in the dense layer's own layout
    (``(in, out)`` for a Hugging Face ``Conv1D``).
    """
    dtype = torch.promote_types(dense.weight.dtype, torch.float32)
    weight = dense.weight.detach().to(dtype)
    approx = factorized.dense_weight().detach().to(dtype)
    return float(torch.linalg.vector_norm(weight - approx) / torch.linalg.vector_norm(weight))


@dataclass
class CompressionReport:
    """What :func:`compress` did, one :class:`LayerReport` per targeted layer.

    Parameter counts include each layer's bias; ``params_before`` and
    ``params_after`` sum over the targeted layers (skipped ones count the same
    on both sides). ``settings`` holds the configs the compression ran with,
    in their own dict form; ``healing`` what healing did (steps, seconds,
    loss before and after), if it ran.
    """

    layers: list[LayerReport] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    healing: dict[str, Any] | None = None

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
            "healing": self.healing,
        }

    def plot(self, path: str | Path | None = None, *, layers: Sequence[str] | None = None, spectra: int = 4) -> Figure:
        """Draw the report: ranks, kept parameters and errors per layer, spectra with their cut.

        See :func:`lowrank.plots.plot_report`. Needs matplotlib (``pip install
        'lowrank-torch[plot]'``); ``path`` also writes the figure there.
        """
        from lowrank.plots import plot_report

        return plot_report(self, path, layers=layers, spectra=spectra)

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
        settings, healing = dict(data.get("settings", {})), data.get("healing")
        if healing is None and isinstance(settings.get("heal"), dict) and "loss_after" in settings["heal"]:
            healing = settings.pop("heal")  # a report of lowrank 0.2 kept what healing did in its settings
        return cls(layers, settings, healing)

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
