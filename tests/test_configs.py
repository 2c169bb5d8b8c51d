"""compress()'s configs: shortcuts and configs are the same call, values are checked once, the report keeps them."""

import copy

import pytest
import torch
from conftest import generator, randn
from torch import nn

import lowrank
from lowrank import CalibrationConfig, HealConfig, Targets
from lowrank.nn import LowRankLinear
from lowrank.rank import ParamFraction

F64 = torch.float64


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 16)).double()


def batches(count=3, seed=1):
    return [randn(32, 24, gen=generator(seed + k)) for k in range(count)]


def ranks(model):
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def test_shortcuts_build_the_same_configs_as_the_configs():
    by_keywords, by_configs = mlp(), mlp()
    a = lowrank.compress(by_keywords, 0.4, include=["0", "2"], calibration=batches(), allocation="energy",
                         refit=False, heal_steps=3, heal_lr=1e-3, progress=False)
    b = lowrank.compress(by_configs, 0.4, targets=Targets(include=("0", "2")),
                         calibration=CalibrationConfig(batches(), allocation="energy", refit=False),
                         heal=HealConfig(steps=3, lr=1e-3), progress=False)
    assert a.settings == b.settings and ranks(by_keywords) == ranks(by_configs)
    x = randn(5, 24, gen=generator(9))
    torch.testing.assert_close(by_keywords(x), by_configs(x), rtol=0, atol=0)
    # the report's settings are the configs' own dict forms
    assert a.settings["targets"] == Targets(include=("0", "2")).to_dict()
    assert a.settings["heal"] == {"steps": 3, "seconds": None, "lr": 1e-3, "holdout": 0.25, "eval_every": None,
                                  "patience": 3}
    assert a.settings["calibration"]["allocation"] == "energy" and a.settings["calibration"]["batches"] == 3
    assert a.healing["steps"] == 3


def test_a_shortcut_overrides_the_field_of_a_config_given_too():
    model = mlp()
    report = lowrank.compress(model, 0.5, targets=Targets(include=("0",)), include=["4"], progress=False)
    assert [row.name for row in report.layers] == ["4"]
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) heal_step; its shortcuts are include"):
        lowrank.compress(mlp(), 0.5, heal_step=3)


def test_ratio_and_param_fraction_mean_the_same_budget_bias_included():
    plain, fraction = mlp(), mlp()
    a = lowrank.compress(plain, 0.3, progress=False)
    b = lowrank.compress(fraction, rank=ParamFraction(0.3), progress=False)
    assert ranks(plain) == ranks(fraction)
    for row in a.layers:  # every layer: factors plus bias within 0.3 of weight plus bias, one more rank is not
        out_features, in_features = row.shape
        dense = out_features * in_features + out_features
        assert row.params_after <= 0.3 * dense < row.params_after + out_features + in_features
    assert [row.params_after for row in a.layers] == [row.params_after for row in b.layers]
    # with calibration, the ratio is one budget spent across the layers; ParamFraction is every layer's own
    spent, own = mlp(), mlp()
    spent_report = lowrank.compress(spent, 0.3, calibration=batches(), progress=False)
    own_report = lowrank.compress(own, rank=ParamFraction(0.3), calibration=batches(), progress=False)
    assert spent_report.params_after <= 0.3 * spent_report.params_before
    assert ranks(own) == ranks(plain)
    assert all(row.params_after <= 0.3 * row.params_before for row in own_report.layers)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CalibrationConfig(batches(), allocation="best"), "CalibrationConfig.allocation must be one of"),
        (lambda: CalibrationConfig(batches(), whiten="yes"), "CalibrationConfig.whiten must be True, False or 'asvd'"),
        (lambda: CalibrationConfig(batches(), whiten=1), "CalibrationConfig.whiten must be True, False or 'asvd'"),
        (lambda: CalibrationConfig(batches(), allocation="sensitivity"), "allocation='sensitivity' needs loss_fn="),
        (lambda: CalibrationConfig(batches(), n_probes=0), "CalibrationConfig.n_probes must be an int >= 1, got 0"),
        (lambda: CalibrationConfig(batches(), n_probes=2, loss_fn=lambda m, b: m(*b.args).sum()),
         "n_probes applies to the default probe loss only"),
        (lambda: CalibrationConfig(batches(), refit="no"), "CalibrationConfig.refit must be True or False"),
        (lambda: CalibrationConfig([]), "calibration data is empty"),
        (lambda: CalibrationConfig(["a text"]), "no tokenizer was given"),
        (lambda: HealConfig(steps=-1), "HealConfig.steps must be an int >= 0, got -1"),
        (lambda: HealConfig(seconds=0), "HealConfig.seconds must be a finite number > 0, got 0"),
        (lambda: HealConfig(lr=float("nan")), "HealConfig.lr must be a finite number > 0, got nan"),
    ],
)
def test_configs_check_their_values_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heal_steps": 5}, "healing needs calibration data: give calibration="),
        ({"calibration": batches(), "rank": 4, "allocation": "fisher"},
         "allocation='fisher' spends a budget: give ratio=, or allocation='uniform'"),
        ({"calibration": lambda model: None, "allocation": "energy", "heal_seconds": 1.0},
         "a callable calibration runs the model itself: it does not support healing"),
        ({"calibration": lambda model: None, "allocation": "fisher"}, "it does not support allocation='fisher'"),
        ({"ratio": 1.0}, "ratio must be a fraction in \\(0, 1\\), got 1.0"),
    ],
)
def test_compress_refuses_combinations_before_changing_anything(kwargs, message):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        lowrank.compress(model, progress=False, **kwargs)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.Tanh) for m in model.modules())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_texts_are_tokenised_once_into_batches():
    calls = []

    def tokenizer(texts, **options):
        calls.append((len(texts), options["max_length"]))
        ids = torch.ones(len(texts), 4, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    config = CalibrationConfig(["a", "bb", "ccc"], tokenizer=tokenizer, batch_size=2, max_length=7)
    assert calls == [(2, 7), (1, 7)] and len(config.data) == 2
    assert config.data[0].token_mask.dtype == torch.bool
    moved = config.to("cpu")
    assert len(moved.data) == 2 and calls == [(2, 7), (1, 7)]  # moving re-checks, never re-tokenises


def test_knobs_that_were_out_of_reach_reach_their_steps(monkeypatch):
    seen = {}
    original = lowrank.data_aware.collect_output_fisher

    def spy(*args, **kwargs):
        seen["n_probes"] = kwargs["n_probes"]
        return original(*args, **kwargs)

    adam = torch.optim.Adam

    def spy_adam(parameters, lr):
        seen["lr"] = lr
        return adam(parameters, lr=lr)

    monkeypatch.setattr(lowrank.data_aware, "collect_output_fisher", spy)
    monkeypatch.setattr(torch.optim, "Adam", spy_adam)
    report = lowrank.compress(mlp(), 0.5, calibration=batches(), allocation="fisher", n_probes=3, heal_steps=2,
                              heal_lr=5e-3, progress=False)
    assert seen == {"n_probes": 3, "lr": 5e-3}
    assert report.settings["calibration"]["n_probes"] == 3 and report.settings["heal"]["lr"] == 5e-3


def test_numpy_scalars_are_kept_as_plain_numbers_and_the_report_saves(tmp_path):
    import numpy as np

    model = mlp()
    report = lowrank.compress(model, energy=np.float32(0.9), progress=False)
    assert type(report.settings["energy"]) is float
    config = CalibrationConfig(batches(), n_probes=np.int64(2))
    assert type(config.n_probes) is int and type(HealConfig(steps=np.int64(3)).steps) is int
    lowrank.save(model, tmp_path / "out", report=report)  # JSON: no NumPy scalar left in the report


def test_configs_are_checked_for_their_type_and_batches_are_not_reshaped_after_the_fact():
    with pytest.raises(TypeError, match="targets= takes a lowrank.Targets \\(name globs go to include=\\), got list"):
        lowrank.compress(mlp(), 0.5, targets=["0"])
    with pytest.raises(TypeError, match="heal= takes a lowrank.HealConfig, got dict"):
        lowrank.compress(mlp(), 0.5, heal={"steps": 2})
    config = CalibrationConfig(batches())
    with pytest.raises(ValueError, match="batch_size shape the batches that a CalibrationConfig made already"):
        lowrank.compress(mlp(), 0.5, calibration=config, batch_size=1)


def test_the_report_records_the_allocation_that_ran():
    assert lowrank.compress(mlp(), 0.5, calibration=batches(), progress=False).settings["calibration"][
        "allocation"] == "energy"
    assert lowrank.compress(mlp(), rank=4, calibration=batches(), progress=False).settings["calibration"][
        "allocation"] == "uniform"


def test_a_policy_bound_beyond_the_module_is_capped_like_every_method():
    # min_rank above what a 64x64 linear takes: capped at 64 (then left dense by break-even), for every method
    for method, kwargs in (("svd", {"rank": ParamFraction(0.1, min_rank=1000)}), ("tt", {"rank": 1000})):
        model = nn.Sequential(nn.Linear(64, 64))
        report = lowrank.compress(model, method=method, progress=False, **kwargs)
        assert report.layers[0].skip_reason.startswith("break-even") and isinstance(model[0], nn.Linear)
    conv = nn.Sequential(nn.Conv2d(16, 16, 3))
    report = lowrank.compress(conv, rank=1000, method="cp", progress=False)
    assert report.layers[0].rank == 16 * 16 * 9 // 16 and report.layers[0].skip_reason.startswith("break-even")


def test_an_old_report_keeps_what_healing_did():
    old = {"settings": {"ratio": 0.5, "heal": {"steps": 3, "seconds": 0.1, "loss_before": 1.0, "loss_after": 0.5}},
           "layers": []}
    report = lowrank.CompressionReport.from_dict(old)
    assert report.healing["loss_after"] == 0.5 and "heal" not in report.settings
