"""The digits CNN example: a trained CNN compressed with Tucker-2 keeps its accuracy at 3x fewer conv MACs."""

import copy
import re
import sys
from pathlib import Path

from torch import nn

import lowrank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_digits_cnn_tucker2_keeps_accuracy_at_a_third_of_the_macs():
    from digits_cnn import accuracy, conv_flops, digits, make_cnn, train

    train_x, train_y, test_x, test_y = digits()
    dense = train(make_cnn(width=32), train_x, train_y, epochs=15)
    dense_accuracy = accuracy(dense, test_x, test_y)
    assert dense_accuracy > 0.9
    model = copy.deepcopy(dense)
    report = lowrank.compress(model, ratio=0.34, exclude=["0"], filter_fn=lambda name, m: isinstance(m, nn.Conv2d),
                              progress=False)
    assert [row.name for row in report.layers if row.replaced] == ["2", "5"]
    assert conv_flops(dense, (1, 8, 8)) >= 2.5 * conv_flops(model, (1, 8, 8))
    assert accuracy(model, test_x, test_y) >= dense_accuracy - 0.05


def test_train_lowrank_example_finalizes_a_smaller_network(capsys, monkeypatch):
    import train_lowrank

    monkeypatch.setattr(sys, "argv", ["train_lowrank.py", "--epochs", "4", "--finetune-epochs", "1", "--width", "32"])
    train_lowrank.main()
    out = capsys.readouterr().out
    accuracies = [float(a) for a in re.search(
        r"test accuracy: ([0-9.]+) after TRP, ([0-9.]+) finalized, ([0-9.]+) after fine-tuning", out).groups()]
    dense, after, macs_dense, macs_after = (int(v.replace(",", "")) for v in re.search(
        r"parameters ([0-9,]+) -> ([0-9,]+); conv MACs per image ([0-9,]+) -> ([0-9,]+)", out).groups())
    assert after < dense and macs_after < macs_dense / 2
    assert min(accuracies) > 0.3 and accuracies[2] > 0.6  # far above chance (0.1) after four short epochs
    assert "2 of 2 targeted layers replaced" in out
