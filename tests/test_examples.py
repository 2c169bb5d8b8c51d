"""The digits CNN example: a trained CNN compressed with Tucker-2 keeps its accuracy at 3x fewer conv MACs."""

import copy
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
