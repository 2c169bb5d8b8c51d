"""The examples, run small: the digits CNN compressed with Tucker-2 keeps its accuracy at 3x fewer conv MACs, TRP
finalizes a smaller network, MiniLM fine-tuned with LoRA and FLoRA saves, reloads and merges exactly."""

import copy
import json
import math
import re
import sys
from pathlib import Path

import pytest
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


# all-MiniLM-L6-v2's 36 encoder linears: per block query, key, value and attention output (384 -> 384), intermediate
# (384 -> 1536) and output (1536 -> 384), six blocks; LoRA at rank r trains r (in + out) on each
MINILM_IN_PLUS_OUT = 6 * (4 * (384 + 384) + (384 + 1536) + (1536 + 384))


# PEFT asks transformers for a deprecated attribute when it loads the adapter
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_minilm_adapters_example_fine_tunes_saves_reloads_and_merges(capsys, monkeypatch, tmp_path, minilm_dir):
    import minilm_adapters
    import peft
    import torch

    rank = 4
    monkeypatch.setattr(sys, "argv", ["minilm_adapters.py", "--steps", "6", "--per-class", "12", "--batch-size", "8",
                                      "--max-length", "32", "--rank", str(rank), "--alpha", "8", "-o", str(tmp_path)])
    minilm_adapters.main()
    out = capsys.readouterr().out
    before = float(re.search(r"\(a linear probe\): held-out accuracy ([0-9.]+)", out)[1])
    assert before > 0.25  # eight packages: chance is 0.125
    params = {label: int(count.replace(",", "")) for label, count in re.findall(
        r"^(LoRA|FLoRA): rank \d+, alpha 8 on 36 linear layers: ([0-9,]+) trainable adapter parameters", out, re.M)}
    assert params == {"LoRA": rank * MINILM_IN_PLUS_OUT, "FLoRA": rank * MINILM_IN_PLUS_OUT + 36 * rank**2}, out
    for label in ("LoRA", "FLoRA"):
        step1, first, last = map(float, re.search(
            rf"^{label}: 6 steps in .* loss at step 1 ([0-9.]+) .*, mean of the first 3 ([0-9.]+), of the last 3 "
            r"([0-9.]+)$", out, re.M).groups())
        assert abs(step1 - math.log(8)) < 1e-3 and last < first  # the zero head's uniform guess, then lower
        after = float(re.search(rf"^{label}: held-out accuracy [0-9.]+ \(head alone\) -> ([0-9.]+)$", out, re.M)[1])
        assert re.search(rf"^{label}: reloaded into a fresh base: outputs bit-identical True, accuracy {after:.3f}$",
                         out, re.M), out
        merged = re.search(rf"^{label}: merged: max \|logit difference\| ([0-9.e+-]+), accuracy ([0-9.]+); unmerged "
                           r"again: bit-identical True$", out, re.M)
        assert merged is not None and float(merged[1]) < 1e-4, out
        unloaded = re.search(rf"^{label}: merge_and_unload: 0 adapters left, 36 plain nn.Linear in the encoder, max "
                             r"\|logit difference\| ([0-9.e+-]+)$", out, re.M)
        assert unloaded is not None and float(unloaded[1]) < 1e-4, out

    # the LoRA adapter is in PEFT's format: PEFT itself loads it, and computes what lowrank's reload computes
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", rank, 8)
    assert len(json.loads((tmp_path / "flora" / "lowrank_adapters.json").read_text())["adapters"]) == 36
    x = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = lowrank.io.load_pretrained(minilm_dir)
    lowrank.adapters.load(ours, tmp_path / "lora")
    theirs = peft.PeftModel.from_pretrained(lowrank.io.load_pretrained(minilm_dir), tmp_path / "lora").eval()
    with torch.no_grad():
        expected = ours.eval()(input_ids=x).last_hidden_state
        assert torch.allclose(theirs(input_ids=x).last_hidden_state, expected, atol=1e-5)
        assert not torch.allclose(lowrank.io.load_pretrained(minilm_dir)(input_ids=x).last_hidden_state, expected,
                                  atol=1e-3)  # the adapter changed something
