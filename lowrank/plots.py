"""Pictures of what a compression chose: ranks, kept parameters and errors per layer, and spectra with their cut.

Needs matplotlib (the ``plot`` extra). Figures are made with
``matplotlib.figure.Figure`` directly, not through ``pyplot``, so nothing global
(backend, current figure) changes; Jupyter shows a returned figure inline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lowrank.report import CompressionReport, LayerReport


def _figure_class() -> type[Figure]:
    """Matplotlib's Figure, or an error that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting a report needs matplotlib: pip install 'lowrank-torch[plot]'") from error
    return Figure


def short_names(names: Sequence[str]) -> list[str]:
    """Layer names without the prefix they all share (``encoder.layer.0.attention.self.query`` -> ``0.attention...``).

    Examples
    --------
    >>> short_names(["encoder.layer.0.query", "encoder.layer.1.query"])
    ['0.query', '1.query']

    """
    parts = [name.split(".") for name in names]
    common = 0
    while parts and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def spectrum_layers(report: CompressionReport, count: int) -> list[LayerReport]:
    """Up to ``count`` replaced layers with a recorded spectrum, spread evenly over the model's depth."""
    rows = [row for row in report.layers if row.spectrum and isinstance(row.rank, int)]
    if len(rows) <= count:
        return rows
    step = (len(rows) - 1) / max(count - 1, 1)
    return [rows[round(i * step)] for i in range(count)]


def plot_report(
    report: CompressionReport, path: str | Path | None = None, *, layers: Sequence[str] | None = None,
    spectra: int = 4,
) -> Figure:
    """Draw a compression report: what each layer kept and lost, and where its spectrum was cut.

    Three panels: the rank of each layer (bars) and the share of its
    parameters it kept (line); the relative error of each layer's weight and,
    for data-aware compression, of its outputs on the calibration inputs; the
    spectra the ranks were chosen against (normalised by the largest value),
    each with a dashed line at its rank (a layer left dense has none).

    Parameters
    ----------
    report : CompressionReport
        What :func:`lowrank.compress` returned, or
        ``CompressionReport.from_dict`` of a saved one.
    path : str or Path, optional
        Also write the figure there (the suffix chooses the format: ``.png``, ``.svg``, ``.pdf``).
    layers : sequence of str, optional
        The layers whose spectra to draw (default: ``spectra`` of them, spread over the depth).
    spectra : int
        How many spectra to draw when ``layers`` is not given.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        If the report has no layers, or ``layers`` names one that has no recorded spectrum.

    Notes
    -----
    Spectra are recorded by data-aware compression (``calibration=``); a
    report without them draws the first two panels and says so in the third.
    """
    if not report.layers:
        raise ValueError("the report has no layers to plot")
    with_spectrum = {row.name: row for row in report.layers if row.spectrum}
    if layers is not None:
        missing = [name for name in layers if name not in with_spectrum]
        if missing:
            known = ", ".join(list(with_spectrum)[:8]) or "none (compress with calibration= records them)"
            raise ValueError(f"no spectrum recorded for layer(s) {', '.join(map(repr, missing))}; layers with one: "
                             f"{known}")
        chosen = [with_spectrum[name] for name in layers]
    else:
        chosen = spectrum_layers(report, spectra)
    figure = _figure_class()(figsize=(11, 9), layout="constrained")
    ranks_axis, errors_axis, spectra_axis = figure.subplots(3, 1)
    _draw_ranks(ranks_axis, report)
    _draw_errors(errors_axis, report)
    _draw_spectra(spectra_axis, chosen)
    figure.suptitle(f"{len(report.layers)} layers, {report.ratio:.1%} of their parameters kept")
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def _layer_axis(axis, report: CompressionReport) -> list[int]:  # noqa: ANN001 (a matplotlib Axes)
    """Layer positions on the x axis, labelled with the short names (thinned to about 40 labels)."""
    positions = list(range(len(report.layers)))
    names = short_names([row.name for row in report.layers])
    every = max(1, len(names) // 40)
    axis.set_xticks(positions[::every], names[::every], rotation=90, fontsize=7)
    axis.set_xlim(-0.6, len(positions) - 0.4)
    return positions


def _draw_ranks(axis, report: CompressionReport) -> None:  # noqa: ANN001
    """Bars of the rank (a multi-rank module: its first), and the kept share of parameters on a second axis."""
    positions = _layer_axis(axis, report)
    ranks = [row.rank[0] if isinstance(row.rank, tuple) else (row.rank or 0) for row in report.layers]
    colours = ["tab:blue" if row.replaced else "lightgrey" for row in report.layers]
    axis.bar(positions, ranks, color=colours)
    axis.set_ylabel("rank (grey: left dense)")
    kept = axis.twinx()
    kept.plot(positions, [row.params_after / row.params_before for row in report.layers], "o-", color="tab:orange",
              markersize=3)
    kept.set_ylim(0, 1.05)
    kept.set_ylabel("share of parameters kept", color="tab:orange")
    axis.set_title("rank and kept parameters per layer")


def _draw_errors(axis, report: CompressionReport) -> None:  # noqa: ANN001
    """The weight's relative error and, where recorded, the outputs' relative error of each layer."""
    positions = _layer_axis(axis, report)
    series = {"weight": [row.relative_error for row in report.layers],
              "outputs on the calibration data": [row.output_error for row in report.layers]}
    for label, values in series.items():
        points = [(x, v) for x, v in zip(positions, values) if v is not None]
        if points:
            axis.plot(*zip(*points), "o-", markersize=3, label=label)
    axis.set_ylabel("relative error")
    axis.legend(fontsize=8)
    axis.set_title("error per layer")


def _draw_spectra(axis, rows: Sequence[LayerReport]) -> None:  # noqa: ANN001
    """Each row's spectrum over its largest value, on a log scale, with a dashed line at its rank (none if dense)."""
    if not rows:
        axis.text(0.5, 0.5, "no spectra recorded (data-aware compression, calibration=, records them)",
                  ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return
    names = short_names([row.name for row in rows]) if len(rows) > 1 else [rows[0].name]
    for row, name, colour in zip(rows, names, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                                               "tab:brown", "tab:pink", "tab:olive")):
        top = max(row.spectrum) or 1.0
        kept = f"rank {row.rank} of {len(row.spectrum)}" if isinstance(row.rank, int) else "left dense"
        axis.semilogy(range(1, len(row.spectrum) + 1), [max(v / top, 1e-12) for v in row.spectrum], color=colour,
                      label=f"{name} ({kept})")
        if isinstance(row.rank, int):
            axis.axvline(row.rank, color=colour, linestyle="--", linewidth=1)
    axis.set_xlabel("component")
    axis.set_ylabel("value / largest")
    axis.legend(fontsize=8)
    axis.set_title("spectra the ranks were chosen against; dashed: the cut")
