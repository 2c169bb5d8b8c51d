"""Report pictures: the spectra a data-aware compression records, and the figure drawn from them.

The recorded spectrum is checked against an independent float64 computation (the singular values of
the weight times the Cholesky factor of the layer's input Gram matrix, gathered here with hooks); the
figure is checked for what it must show (a dashed cut at each drawn layer's rank, one bar per layer).
"""

import dataclasses
import json
import sys

import pytest
import torch
import transformers

import lowrank
from lowrank.cli import main
from lowrank.plots import short_names

transformers.logging.set_verbosity_error()
VOCAB = 96
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    return transformers.BertModel(config).eval()


def batches(count=3):
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 12), generator=gen),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(count)]


def input_grams(model, names, data):
    """Float64 ``X^T X`` of each named linear's inputs over the batches (the independent reference)."""
    grams, handles = {}, []
    for name in names:
        def hook(_, inputs, name=name):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            grams[name] = grams.get(name, 0) + x.T @ x
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for handle in handles:
        handle.remove()
    return grams


@pytest.fixture(scope="module")
def calibrated():
    """A small BERT compressed with calibration (each layer on the dense model's inputs), its dense copy."""
    dense = bert()
    model = bert()
    config = lowrank.CalibrationConfig(batches(), allocation="uniform", sequential=False, refit=False)
    report = lowrank.compress(model, ratio=0.5, include=["encoder.*"], calibration=config, progress=False)
    return dense, model, report


def test_the_recorded_spectrum_is_the_whitened_weights_singular_values(calibrated):
    dense, _, report = calibrated
    names = [row.name for row in report.layers]
    grams = input_grams(dense, names, batches())
    for row in report.layers:
        weight = dense.get_submodule(row.name).weight.detach().double()
        expected = torch.linalg.svdvals(weight @ torch.linalg.cholesky(grams[row.name]))
        assert len(row.spectrum) == min(weight.shape)
        # 4 significant digits; the smallest values of a LayerNorm'd input (a near-null direction) move with the
        # jitter that makes its Gram matrix positive definite, so they are compared relative to the largest
        torch.testing.assert_close(torch.tensor(row.spectrum, dtype=torch.float64), expected, rtol=1e-3,
                                   atol=1e-3 * float(expected[0]), msg=row.name)


def test_the_figure_marks_each_cut_at_the_rank(calibrated, tmp_path):
    _, _, report = calibrated
    figure = report.plot(tmp_path / "report.png", spectra=3)
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_MAGIC
    ranks_axis, errors_axis, spectra_axis = figure.axes[:3]
    assert len(ranks_axis.patches) == len(report.layers)
    assert [p.get_height() for p in ranks_axis.patches] == [row.rank for row in report.layers]
    drawn = [line for line in spectra_axis.lines if line.get_linestyle() != "--"]
    cuts = [line.get_xdata()[0] for line in spectra_axis.lines if line.get_linestyle() == "--"]
    labels = [line.get_label() for line in drawn]
    assert len(drawn) == 3 and len(cuts) == 3
    rows = {short: row for short, row in zip(short_names([r.name for r in report.layers]), report.layers)}
    for label, cut in zip(labels, cuts):
        row = rows[label.split(" (")[0]]
        assert cut == row.rank and f"rank {row.rank} of {len(row.spectrum)}" in label
    chosen = report.plot(layers=[report.layers[1].name]).axes[2]
    assert [line.get_xdata()[0] for line in chosen.lines if line.get_linestyle() == "--"] == [report.layers[1].rank]


def test_a_layer_left_dense_is_drawn_without_a_cut(calibrated):
    _, _, report = calibrated
    dense_row = dataclasses.replace(report.layers[0], rank=None, skip_reason="break-even")
    edited = lowrank.CompressionReport([dense_row, *report.layers[1:]], report.settings)
    axis = edited.plot(layers=[dense_row.name, report.layers[1].name]).axes[2]
    labels = [line.get_label() for line in axis.lines if line.get_linestyle() != "--"]
    assert labels[0].endswith("(left dense)") and f"(rank {report.layers[1].rank} of" in labels[1]
    assert [line.get_xdata()[0] for line in axis.lines if line.get_linestyle() == "--"] == [report.layers[1].rank]


def test_a_saved_report_keeps_its_spectra_and_the_cli_draws_it(calibrated, tmp_path, capsys):
    _, model, report = calibrated
    lowrank.save(model, tmp_path / "out", report=report)
    stored = json.loads((tmp_path / "out" / lowrank.io.PLAN_NAME).read_text())["report"]
    assert lowrank.CompressionReport.from_dict(stored).layers == report.layers
    assert main(["info", str(tmp_path / "out"), "--plot", str(tmp_path / "info.png")]) == 0
    assert (tmp_path / "info.png").read_bytes()[:8] == PNG_MAGIC
    assert "drew the report to" in capsys.readouterr().out


def test_a_report_without_spectra_still_draws_and_says_why(tmp_path):
    model = bert()
    report = lowrank.compress(model, ratio=0.5, include=["encoder.*"], progress=False)
    assert all(row.spectrum is None for row in report.layers)
    figure = report.plot()
    assert "no spectra recorded" in figure.axes[2].texts[0].get_text()
    with pytest.raises(ValueError, match="no spectrum recorded for layer.*'encoder.layer.0.attention.self.query'"):
        report.plot(layers=["encoder.layer.0.attention.self.query"])
    with pytest.raises(ValueError, match="no layers"):
        lowrank.CompressionReport().plot()


def test_without_matplotlib_the_error_says_what_to_install(calibrated, monkeypatch, tmp_path):
    _, model, report = calibrated
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'lowrank-torch\[plot\]'"):
        report.plot()
    lowrank.save(model, tmp_path / "out", report=report)
    assert main(["info", str(tmp_path / "out"), "--plot", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
