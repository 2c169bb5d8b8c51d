"""lowrank.compress: targets, rank policies, break-even, report, and all-or-nothing failure."""

import copy
import json

import pytest
import torch
from conftest import generator, low_rank_matrix
from torch import nn

import lowrank
from lowrank.nn import LowRankEmbedding, LowRankLinear, Tucker2Conv

F64 = torch.float64


class TinyLM(nn.Module):
    """Embedding, two linears, a conv, a 1x1 conv and an output head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.mix = nn.Conv1d(32, 32, 1)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        h = self.embed(idx)
        h = h + self.down(torch.relu(self.up(h)))
        h = h + self.mix(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h)


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyLM().double()


def param_count(module):
    return sum(p.numel() for p in module.parameters())


def test_default_targets_and_ratio():
    model = tiny()
    before = {name: param_count(m) for name, m in model.named_modules()}
    report = lowrank.compress(model, ratio=0.5, progress=False)
    assert isinstance(model.up, LowRankLinear) and isinstance(model.down, LowRankLinear)
    assert isinstance(model.conv, Tucker2Conv)
    assert isinstance(model.embed, nn.Embedding) and isinstance(model.mix, nn.Conv1d)  # not targeted by default
    assert isinstance(model.head, nn.Linear)  # output head, tied to the embedding
    rows = {row.name: row for row in report.layers}
    assert set(rows) == {"up", "down", "conv", "head"}
    assert rows["head"].skip_reason == "output head" and rows["head"].params_after == rows["head"].params_before
    for name in ("up", "down", "conv"):
        assert rows[name].replaced
        assert rows[name].params_before == before[name]
        assert rows[name].params_after == param_count(getattr(model, name)) <= 0.5 * before[name]
        assert 0 < rows[name].relative_error < 1
    # up is 64x32: the largest rank with r * (64 + 32) + 64 <= 0.5 * (64 * 32 + 64) is 10
    assert rows["up"].rank == 10
    assert report.params_after == sum(row.params_after for row in report.layers)
    assert report.ratio == report.params_after / report.params_before
    assert model(torch.randint(0, 50, (2, 7))).shape == (2, 7, 50)


def test_report_table_and_json():
    model = tiny()
    report = lowrank.compress(model, ratio=0.5, progress=False)
    text = str(report)
    assert "up" in text and "LowRankLinear" not in text and "output head" in text and "Linear" in text
    data = json.loads(report.to_json())
    assert [row["name"] for row in data["layers"]] == [row.name for row in report.layers]
    again = lowrank.CompressionReport.from_dict(data)
    assert again.layers == report.layers and again.ratio == report.ratio


def test_the_weight_error_reported_is_the_weight_error():
    model = tiny()
    original = copy.deepcopy(model)
    report = lowrank.compress(model, ratio=0.5, progress=False)
    row = next(r for r in report.layers if r.name == "down")
    dense = original.down.weight.detach()
    error = torch.linalg.vector_norm(model.down.weight.detach() - dense) / torch.linalg.vector_norm(dense)
    assert abs(row.relative_error - float(error)) < 1e-12


def test_planted_low_rank_layers_are_reproduced_exactly():
    model = tiny()
    with torch.no_grad():
        model.up.weight.copy_(low_rank_matrix(64, 32, 4, seed=1))
        model.down.weight.copy_(low_rank_matrix(32, 64, 4, seed=2))
    dense = copy.deepcopy(model)
    lowrank.compress(model, rank=4, include=["up", "down"], progress=False)
    idx = torch.randint(0, 50, (3, 5), generator=generator(0))
    torch.testing.assert_close(model(idx), dense(idx), rtol=1e-9, atol=1e-9)


def test_optional_kinds_and_selection():
    model = tiny()
    report = lowrank.compress(model, ratio=0.5, kinds=["linear", "conv", "embedding", "pointwise"],
                              exclude=["down"], progress=False)
    assert isinstance(model.embed, LowRankEmbedding)
    assert type(model.mix).__name__ == "SVDConv"
    assert isinstance(model.down, nn.Linear)
    assert "down" not in {row.name for row in report.layers}

    model = tiny()
    lowrank.compress(model, ratio=0.5, filter_fn=lambda name, m: isinstance(m, nn.Linear), progress=False)
    assert isinstance(model.up, LowRankLinear) and isinstance(model.conv, nn.Conv1d)


def test_method_names_and_dicts():
    from conftest import rel_err, singular_values, tail_errors, unfold

    dense = tiny()
    conv_weight = dense.conv.weight.detach()  # (32, 32, 3), bias 32: 3104 parameters, half of them 1552
    # the linears (64x32 and 32x64, "auto" = svd) at half their parameters: r * 96 + bias <= 1056 gives rank 10,
    # and a truncated SVD at rank 10 has the Eckart-Young error of the weight's spectrum
    linear_errors = {name: float(tail_errors(singular_values(getattr(dense, name).weight.detach()))[10])
                     for name in ("up", "down")}

    model = tiny()
    report = lowrank.compress(model, ratio=0.5, method="cp", progress=False)
    rows = {row.name: row for row in report.layers}
    assert type(model.conv).__name__ == "CPConv" and isinstance(model.up, LowRankLinear)
    assert rows["conv"].method == "cp" and rows["up"].method == rows["down"].method == "svd"
    for name, error in linear_errors.items():
        assert getattr(model, name).rank == rows[name].rank == 10
        weight = getattr(model, name).weight.detach()
        assert abs(rel_err(weight, getattr(dense, name).weight.detach()) - error) < 1e-10
    # CP rank R costs R * (32 + 32 + 3) parameters plus the bias: (1552 - 32) // 67 = 22
    cp = model.conv
    assert cp.rank == rows["conv"].rank == 22 and rows["conv"].params_after == 22 * 67 + 32
    x = torch.randn(2, 32, 9, dtype=F64, generator=generator(5))
    with torch.no_grad():
        torch.testing.assert_close(cp.to_dense()(x), cp(x), rtol=1e-10, atol=1e-10)
    error = rel_err(cp.weight.detach(), conv_weight)
    assert abs(rows["conv"].relative_error - error) < 1e-10
    # a CP kernel of rank 22 has multilinear ranks of at most 22, so its error is at least the Eckart-Young error
    # of each channel unfolding (32 x 96) at rank 22; and CP-ALS does better than the zero kernel
    for mode in (0, 1):
        assert error >= float(tail_errors(singular_values(unfold(conv_weight, mode)))[22]) - 1e-12
    assert error < 1

    model = tiny()
    report = lowrank.compress(model, ratio=0.5, method={"conv": "svd-channel"}, progress=False)
    rows = {row.name: row for row in report.layers}
    assert type(model.conv).__name__ == "SVDConv" and model.conv.scheme == "channel"
    assert rows["conv"].method == "svd-channel" and rows["up"].method == "svd"
    # channel SVD of the (32, 32 * 3) kernel matrix: rank r costs r * (32 + 96) plus the bias, (1552 - 32) // 128 = 11,
    # at the Eckart-Young error of that matrix
    assert model.conv.rank == rows["conv"].rank == 11 and rows["conv"].params_after == 11 * 128 + 32
    optimal = float(tail_errors(singular_values(conv_weight.reshape(32, -1)))[11])
    assert abs(rel_err(model.conv.weight.detach(), conv_weight) - optimal) < 1e-10
    assert abs(rows["conv"].relative_error - optimal) < 1e-10
    with pytest.raises(ValueError, match="'qr'"):
        lowrank.compress(tiny(), method="qr")
    with pytest.raises(ValueError, match="method for linear layers must be one of"):
        lowrank.compress(tiny(), method={"linear": "cp"})


def test_break_even_leaves_layers_dense():
    model = tiny()
    report = lowrank.compress(model, rank=30, include=["up", "down"], progress=False)
    # rank 30 on 64x32: 30 * 96 > 64 * 32 parameters
    for row in report.layers:
        assert not row.replaced and row.skip_reason.startswith("break-even")
    assert isinstance(model.up, nn.Linear) and isinstance(model.down, nn.Linear)

    report = lowrank.compress(tiny(), ratio=0.001, include=["up"], progress=False)
    assert report.layers[0].skip_reason == "no rank >= 1 fits the ratio"


def test_energy_policy_keeps_the_energy():
    model = tiny()
    spectrum = torch.linalg.svdvals(model.up.weight.detach())
    report = lowrank.compress(model, energy=0.9, include=["up"], progress=False)
    rank = report.layers[0].rank
    kept = (spectrum[:rank] ** 2).sum() / (spectrum**2).sum()
    assert kept >= 0.9 > (spectrum[: rank - 1] ** 2).sum() / (spectrum**2).sum()


def test_a_failing_layer_leaves_the_model_unchanged():
    model = tiny()
    with torch.no_grad():
        model.down.weight[3, 3] = float("nan")
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="layer 'down'.*unchanged.*NaN"):
        lowrank.compress(model, ratio=0.5, progress=False)
    assert [type(m) for m in model.modules()] == [type(m) for m in before.modules()]
    after = model.state_dict()
    for key, value in before.state_dict().items():
        assert torch.equal(after[key].nan_to_num(), value.nan_to_num()), key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.5}, "ratio must be a fraction in \\(0, 1\\), got 1.5"),
        ({"ratio": 0.5, "rank": 3}, "one rank policy"),
        ({"rank": 0}, "rank must be an int >= 1, got 0"),
        ({"energy": 0.0}, "energy must be a fraction in \\(0, 1\\], got 0.0"),
        ({"allocation": "fisher"}, "allocation need calibration data: give calibration="),
        ({"calibration": [torch.zeros(2, 5, dtype=torch.long)], "allocation": "best"}, "allocation must be one of"),
        ({"calibration": [torch.zeros(2, 5, dtype=torch.long)], "rank": 4, "allocation": "energy"},
         "allocation='energy' spends a budget: give ratio="),
        ({"calibration": lambda model: None, "heal_steps": 5}, "a callable calibration runs the model itself"),
        ({"calibration": [torch.zeros(2, 5, dtype=torch.long)], "heal_steps": -1},
         "HealConfig.steps must be an int >= 0"),
        ({"rank": lowrank.rank.VBMF(), "method": {"conv": "cp"}, "kinds": ("conv",)},
         "vbmf picks ranks from singular values, which method 'cp' has none of"),
    ],
)
def test_bad_arguments(kwargs, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        lowrank.compress(model, progress=False, **kwargs)
    assert isinstance(model.up, nn.Linear)


def test_half_precision_model():
    from conftest import rel_err

    dense = tiny()  # the float64 weights the bfloat16 model is rounded from
    reference = tiny()
    reference_report = lowrank.compress(reference, ratio=0.5, progress=False)
    model = tiny().to(torch.bfloat16)
    report = lowrank.compress(model, ratio=0.5, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    idx = torch.randint(0, 50, (4, 9), generator=generator(3))
    with torch.no_grad():
        out = model(idx)
        expected = reference(idx)
    assert out.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits: each rounding moves a tensor by at most u = 2^-8 of its norm. The
    # bfloat16 compression factorizes the weight rounded once (||W_bf16 - W|| <= u ||W||) and rounds the
    # factors and their product (about u ||W|| each, the singular values being split evenly between the
    # factors), and a relative error moves by no more than these perturbations: at most 3u, whether measured
    # against the float64 weights or (in the report) against the bfloat16 ones
    u = 2.0**-8
    rows, reference_rows = {r.name: r for r in report.layers}, {r.name: r for r in reference_report.layers}
    assert rows.keys() == reference_rows.keys()
    replaced = [name for name, row in rows.items() if row.replaced]
    assert replaced == [name for name, row in reference_rows.items() if row.replaced] == ["up", "down", "conv"]
    for name in replaced:
        row, reference_row = rows[name], reference_rows[name]
        assert row.rank == reference_row.rank and row.params_after == reference_row.params_after
        assert 0.1 < reference_row.relative_error < 1  # a real truncation, far larger than u
        assert abs(row.relative_error - reference_row.relative_error) <= 3 * u
        approx = model.get_submodule(name).dense_weight().detach()
        recomputed = rel_err(approx, dense.get_submodule(name).weight.detach())
        assert abs(recomputed - reference_row.relative_error) <= 3 * u
    # the forward rounds the embedding, each layer's weights and output and each sum (about ten roundings of
    # at most u each) and runs on weights within 3u of the float64 compressed ones: 8u bounds their sum,
    # while the compression itself moves the output by about 0.2 (50u) from the dense model's
    assert rel_err(out, expected) <= 8 * u


def test_kinds_select_layer_types():
    model = tiny()
    report = lowrank.compress(model, ratio=0.5, kinds=["conv"], progress=False)
    assert {row.name for row in report.layers} == {"conv"}
    assert isinstance(model.up, nn.Linear) and isinstance(model.conv, Tucker2Conv)
    with pytest.raises(ValueError, match="kinds must be a sequence of layer kinds"):
        lowrank.compress(tiny(), kinds=["attention"])


def test_hugging_face_conv1d_layers_are_compressed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(48, 32), nn.ReLU(), nn.Linear(48, 8)).double()  # Conv1D(nf=out, nx=in)
    dense = copy.deepcopy(model)
    report = lowrank.compress(model, ratio=0.5, progress=False)
    row = report.layers[0]
    assert row.replaced and row.type == "Conv1D" and row.shape == (32, 48)  # the layer's own (in, out) weight
    expected = torch.linalg.vector_norm(model[0].to_dense().weight - dense[0].weight) / torch.linalg.vector_norm(
        dense[0].weight
    )
    assert abs(row.relative_error - float(expected.detach())) < 1e-12
    x = torch.randn(5, 32, dtype=F64, generator=generator(1))
    torch.testing.assert_close(model(x), model[2](torch.relu(model[0].to_dense()(x))))


def test_vbmf_policy_finds_planted_tucker2_ranks_of_a_conv():
    gen = generator(31)
    core = torch.randn(6, 5, 3, 3, generator=gen, dtype=F64) * 10
    left = torch.linalg.qr(torch.randn(48, 6, generator=gen, dtype=F64)).Q
    right = torch.linalg.qr(torch.randn(40, 5, generator=gen, dtype=F64)).Q
    weight = torch.einsum("oa,ib,abhw->oihw", left, right, core)
    weight = weight + 0.01 * torch.randn(weight.shape, generator=gen, dtype=F64)
    model = nn.Sequential(nn.Conv2d(40, 48, 3, padding=1)).double()
    with torch.no_grad():
        model[0].weight.copy_(weight)
    report = lowrank.compress(model, rank=lowrank.rank.VBMF(), progress=False)
    assert report.layers[0].rank == (6, 5)
    assert report.settings["rank"] == "vbmf"
