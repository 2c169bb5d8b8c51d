"""Data-aware compression: whitening, budget allocation, sequential calibration, healing, all-or-nothing."""

import copy
import sys

import pytest
import torch
from conftest import generator, randn
from torch import nn

import lowrank
from lowrank.calibrate import calibration_batches, collect_input_statistics, whitened_low_rank
from lowrank.data_aware import break_even_rank, layer_groups
from lowrank.nn import LowRankLinear

F64 = torch.float64


class Block(nn.Module):
    """Two linear layers in a row, then a third in another parent: groups (a.first, a.second), (head,)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential()
        self.a.first = nn.Linear(24, 32)
        self.a.second = nn.Linear(32, 24)
        self.head = nn.Linear(24, 16)

    def forward(self, x):
        return self.head(torch.tanh(self.a.second(torch.tanh(self.a.first(x)))))


def block(seed=0):
    torch.manual_seed(seed)
    return Block().double().eval()


def correlated_inputs(rows, seed):
    """Inputs ``(rows, 24)`` concentrated near one 6-dimensional subspace (strongly correlated features)."""
    basis = randn(6, 24, gen=generator(0))
    gen = generator(seed)
    return randn(rows, 6, gen=gen) @ basis * 3 + 0.05 * randn(rows, 24, gen=gen)


def calibration(seed=1, batches=4):
    return [correlated_inputs(64, seed + k) for k in range(batches)]


def output_error(model, reference, x):
    with torch.no_grad():
        expected = reference(x)
        return float(torch.linalg.norm(model(x) - expected) / torch.linalg.norm(expected))


def test_whitening_lowers_the_output_error_against_plain_svd():
    held_out = correlated_inputs(256, seed=50)
    dense = block()
    plain, whitened = copy.deepcopy(dense), copy.deepcopy(dense)
    # rank 8 or more everywhere: enough for the 6-dimensional inputs, not for the weights' own spectra
    lowrank.compress(plain, 0.6, progress=False)
    lowrank.compress(whitened, 0.6, calibration=calibration(), allocation="uniform", progress=False)
    assert [m.rank for m in plain.modules() if isinstance(m, LowRankLinear)] == [
        m.rank for m in whitened.modules() if isinstance(m, LowRankLinear)
    ]
    assert output_error(whitened, dense, held_out) < 0.5 * output_error(plain, dense, held_out)


def test_the_first_layer_is_the_optimal_whitened_truncation_and_later_ones_see_compressed_inputs():
    dense, model = block(), block()
    data = calibration()
    report = lowrank.compress(model, 0.4, calibration=data, allocation="uniform", refit=False, progress=False)
    rank = model.a.first.rank
    gram = sum(x.T @ x for x in data)
    first, second, _ = whitened_low_rank(dense.a.first.weight.detach(), gram, rank)
    torch.testing.assert_close(model.a.first.weight, second @ first, rtol=1e-9, atol=1e-9)
    # the head is calibrated on the inputs of the model whose first two layers are already compressed
    partial = copy.deepcopy(model)
    partial.head = copy.deepcopy(dense.head)
    stats = collect_input_statistics(partial, {"head": partial.head}, calibration_batches(data))
    first, second, _ = whitened_low_rank(dense.head.weight.detach(), stats["head"].gram, model.head.rank)
    torch.testing.assert_close(model.head.weight, second @ first, rtol=1e-9, atol=1e-9)
    rows = {row.name: row for row in report.layers}
    assert all(0 <= rows[name].output_error < 1 for name in ("a.first", "a.second", "head"))
    assert report.settings["calibration"]["allocation"] == "uniform"


@pytest.mark.parametrize("allocation", ["energy", "fisher"])
@pytest.mark.parametrize("ratio", [0.2, 0.45, 0.7])
def test_global_allocation_respects_the_budget_and_break_even(allocation, ratio):
    import math

    model = block()
    report = lowrank.compress(model, ratio, calibration=calibration(), allocation=allocation, progress=False)
    assert report.params_after <= ratio * report.params_before
    for name, layer in block().named_modules():
        replaced = model.get_submodule(name) if name else None
        if isinstance(replaced, LowRankLinear):
            assert 1 <= replaced.rank <= break_even_rank(layer)
    # The score each allocation spends the budget on, recomputed from the dense model without the library. With
    # G a layer's input Gram matrix on the calibration data, dropping component k of the whitened weight W S
    # (S S^T = G) costs s_k^2, the k-th eigenvalue of W G W^T; "energy" divides these by their sum. "fisher"
    # weights the outputs by F = sum_t J_t^T J_t, J_t the Jacobian of the model's output row t with respect to
    # the layer's output row t (the expectation of the library's random probes; rows do not interact in this
    # model), so s_k^2 is the k-th eigenvalue of L^T W G W^T L with F = L L^T.
    dense = block()
    names = ["a.first", "a.second", "head"]
    grams, fishers, outputs = dict.fromkeys(names, 0), dict.fromkeys(names, 0), {}

    def watch(name):
        def hook(module, args, out):
            grams[name] = grams[name] + args[0].detach().T @ args[0].detach()
            outputs[name] = out

        return hook

    handles = [dense.get_submodule(name).register_forward_hook(watch(name)) for name in names]
    for x in calibration():
        f = dense(x)
        for j in range(f.shape[1]):  # one output coordinate at a time: the rows of J_t^T, summed over t
            grads = torch.autograd.grad(f[:, j].sum(), [outputs[name] for name in names], retain_graph=True)
            for name, g in zip(names, grads):
                fishers[name] = fishers[name] + g.T @ g
    for handle in handles:
        handle.remove()
    scores = {}
    for name in names:
        weight = dense.get_submodule(name).weight.detach()
        product = weight @ grams[name] @ weight.T
        if allocation == "fisher":
            root = torch.linalg.cholesky(fishers[name])
            product = root.T @ product @ root
        eigenvalues = torch.linalg.eigvalsh(product).flip(0).clamp_min(0)[: min(weight.shape)]
        scores[name] = eigenvalues / eigenvalues.sum() if allocation == "energy" else eigenvalues

    def dropped(ranks):
        return sum(0.0 if ranks[name] is None else float(scores[name][ranks[name]:].sum()) for name in names)

    # the uniform allocation of the same ratio, by hand: each layer the largest rank within the ratio of its own
    # parameters, dense above break-even (the largest r with r * (in + out) < in * out); it fits the budget too
    uniform, uniform_params = {}, 0
    for name in names:
        layer = dense.get_submodule(name)
        out_features, in_features = layer.weight.shape
        own = layer.weight.numel() + out_features
        rank = (math.floor(ratio * own + 1e-9) - out_features) // (in_features + out_features)
        uniform[name] = rank if 1 <= rank <= (out_features * in_features - 1) // (out_features + in_features) else None
        uniform_params += own if uniform[name] is None else rank * (in_features + out_features) + out_features
    assert uniform_params <= ratio * report.params_before
    allocated = {row.name: row.rank if row.replaced else None for row in report.layers}
    assert allocated.keys() == uniform.keys()
    # the layers' whitened spectra differ (a.first's inputs are nearly 6-dimensional, so its spectrum ends after
    # six components; the others decay slowly): the global allocation moves parameters between the layers, and
    # drops no more score than the uniform one, which it could have chosen
    assert allocated != uniform
    assert dropped(allocated) <= dropped(uniform)


def test_allocation_spends_the_budget_where_the_outputs_change_least():
    # the head's inputs are nearly 6-dimensional, so global allocation gives it little and the others more
    model = block()
    lowrank.compress(model, 0.45, calibration=calibration(), allocation="energy", progress=False)
    uniform = block()
    lowrank.compress(uniform, 0.45, calibration=calibration(), allocation="uniform", progress=False)
    held_out = correlated_inputs(256, seed=60)
    assert output_error(model, block(), held_out) <= output_error(uniform, block(), held_out) * 1.05


def test_rank_policies_read_the_whitened_spectrum():
    model = block()
    report = lowrank.compress(model, rank=lowrank.rank.Energy(0.999), calibration=calibration(), progress=False)
    # the inputs live near a 6-dimensional subspace: 99.9% of the output energy needs few components
    assert isinstance(model.a.first, LowRankLinear) and model.a.first.rank <= 8
    assert report.settings["rank"] == "energy:0.999"


def test_a_failure_midway_leaves_the_model_unchanged(monkeypatch):
    model = block()
    before = copy.deepcopy(model.state_dict())
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the first factorization succeeds, the second fails (spectra: whitened_spectrum)
            raise RuntimeError("boom")
        return whitened_low_rank(*args, **kwargs)

    monkeypatch.setattr("lowrank.data_aware.whitened_low_rank", failing)
    with pytest.raises(RuntimeError, match="data-aware compression of the linear layers failed; the model is "
                                           "unchanged: boom"):
        lowrank.compress(model, 0.4, calibration=calibration(), allocation="uniform", progress=False)
    assert all(type(m) in (Block, nn.Sequential, nn.Linear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_healing_trains_only_the_factors_and_lowers_the_distillation_loss():
    model = block()
    data = calibration(batches=2)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = lowrank.compress(model, 0.3, calibration=data, allocation="uniform", heal_steps=40, progress=False)
    assert report.settings["heal"] == {"steps": 40, "seconds": None, "lr": 1e-4, "holdout": 0.25, "eval_every": None,
                                       "patience": 3}
    healed = report.healing
    assert healed["steps"] == 40 and healed["loss_after"] < healed["loss_before"]
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            torch.testing.assert_close(p, frozen[name], rtol=0, atol=0)  # biases are not factors: frozen
        assert p.requires_grad and p.grad is None


def test_sensitivity_allocation_reads_a_user_loss():
    model = block()
    target = torch.randn(64, 16, dtype=F64, generator=generator(70))

    def loss_fn(m, batch):
        return torch.mean((m(*batch.args) - target) ** 2)

    report = lowrank.compress(model, 0.45, calibration=calibration(), allocation="sensitivity", loss_fn=loss_fn,
                              progress=False)
    assert report.params_after <= 0.45 * report.params_before
    assert report.settings["calibration"]["allocation"] == "sensitivity"
    with pytest.raises(ValueError, match="allocation='sensitivity' needs loss_fn="):
        lowrank.compress(block(), 0.45, calibration=calibration(), allocation="sensitivity", progress=False)


def test_first_order_scores_match_the_change_of_a_linear_loss():
    from lowrank.data_aware import first_order_scores

    gen = generator(71)
    weight, x, direction = randn(8, 6, gen=gen), randn(40, 6, gen=gen), randn(8, 6, gen=gen)
    gram = x.T @ x
    scores = first_order_scores(weight, gram, direction)  # the loss <direction, W> has gradient `direction`
    chol = torch.linalg.cholesky(gram)
    u, s, vh = torch.linalg.svd(weight @ chol, full_matrices=False)
    for k in range(6):
        component = s[k] * torch.outer(u[:, k], torch.linalg.solve(chol.T, vh[k]))
        assert abs(float(scores[k]) - abs(float((direction * component).sum()))) < 1e-9 * float(scores.max())
    torch.testing.assert_close(sum(s[k] * torch.outer(u[:, k], torch.linalg.solve(chol.T, vh[k])) for k in range(6)),
                               weight)


def test_layer_groups_follow_the_parents():
    assert layer_groups(["l.0.q", "l.0.k", "l.0.v", "l.0.out", "l.1.q", "head"]) == [
        ["l.0.q", "l.0.k", "l.0.v", "l.0.out"], ["l.1.q"], ["head"]
    ]


@pytest.mark.parametrize("ratio", [0.8])
def test_minilm_data_aware_compression_keeps_embeddings_closer_than_plain_svd(ratio):
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from minilm_task import checkpoint_dir, embed, retrieval_pairs, tokenizer

    tok = tokenizer()
    pairs = retrieval_pairs()
    texts = [query for query, _ in pairs[:48]]
    held_out = [document for _, document in pairs[100:132]]
    dense = lowrank.io.load_pretrained(checkpoint_dir())
    plain, calibrated = copy.deepcopy(dense), copy.deepcopy(dense)
    lowrank.compress(plain, ratio, include=["encoder.*"], progress=False)
    report = lowrank.compress(calibrated, ratio, include=["encoder.*"], calibration=texts, tokenizer=tok,
                              progress=False)
    assert report.params_after <= ratio * report.params_before
    reference = embed(dense, tok, held_out)
    cosine = {name: float((embed(m, tok, held_out) * reference).sum(1).mean())
              for name, m in (("plain", plain), ("calibrated", calibrated))}
    assert cosine["calibrated"] > cosine["plain"] + 0.1


def test_refit_makes_a_later_layer_reproduce_the_dense_outputs_better():
    data = calibration()
    models = {}
    for refit in (False, True):
        models[refit] = block()
        lowrank.compress(models[refit], 0.4, calibration=data, allocation="uniform", refit=refit, progress=False)
    dense = block()

    def head_io(model):
        seen = []
        handle = model.head.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
        with torch.no_grad():
            for x in data:
                model(x)
        handle.remove()
        return torch.cat([i for i, _ in seen]), torch.cat([o for _, o in seen])

    dense_in, dense_out = head_io(dense)
    errors = {}
    for refit, model in models.items():
        compressed_in, _ = head_io(model)
        # the head's own output error against the dense head on the dense inputs (its biases cancel)
        with torch.no_grad():
            errors[refit] = float(torch.linalg.norm(model.head(compressed_in) - dense_out))
    assert errors[True] < errors[False]
    assert models[True].a.first.rank == models[False].a.first.rank
    torch.testing.assert_close(models[True].a.first.weight, models[False].a.first.weight)  # nothing upstream
    assert dense_in.shape[0] == 256


def test_a_failure_while_healing_leaves_the_model_unchanged(monkeypatch):
    model = block()
    before = copy.deepcopy(model.state_dict())

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sys.modules["lowrank.compress"], "heal_factors", broken)  # the module, not the function
    with pytest.raises(RuntimeError, match="the model is unchanged: out of memory"):
        lowrank.compress(model, 0.4, calibration=calibration(), heal_steps=5, progress=False)
    assert all(type(m) in (Block, nn.Sequential, nn.Linear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_asvd_scaling_is_a_cheaper_data_aware_option():
    held_out = correlated_inputs(256, seed=80)
    dense = block()
    plain, asvd = copy.deepcopy(dense), copy.deepcopy(dense)
    lowrank.compress(plain, 0.6, progress=False)
    report = lowrank.compress(asvd, 0.6, calibration=calibration(), allocation="uniform", whiten="asvd",
                              progress=False)
    assert report.settings["calibration"]["whiten"] == "asvd"
    assert output_error(asvd, dense, held_out) < output_error(plain, dense, held_out)
    with pytest.raises(ValueError, match="whiten must be True, False or 'asvd', got 'yes'"):
        lowrank.compress(block(), 0.6, calibration=calibration(), whiten="yes", progress=False)


def test_a_layer_the_output_does_not_depend_on_keeps_its_own_ratio():
    class WithPooler(Block):
        def __init__(self):
            super().__init__()
            self.pooler = nn.Linear(16, 16)

        def forward(self, x):
            hidden = super().forward(x)
            self.pooler(hidden)  # computed, but not part of the output
            return hidden

    torch.manual_seed(0)
    model = WithPooler().double().eval()
    report = lowrank.compress(model, 0.45, calibration=calibration(), allocation="fisher", progress=False)
    pooler = next(row for row in report.layers if row.name == "pooler")
    assert pooler.replaced and pooler.params_after <= 0.45 * pooler.params_before
    assert report.params_after <= 0.45 * report.params_before


def test_full_shrinkage_whitens_by_the_input_channels_norms_alone():
    """shrinkage=1 whitens by diag(G): the spectrum is that of W scaled by each input channel's root mean square."""
    dense, model = block(), block()
    data = calibration()
    report = lowrank.compress(model, 0.6, calibration=data, allocation="uniform", sequential=False, refit=False,
                              shrinkage=1.0, progress=False)
    x = torch.cat(data)
    expected = torch.linalg.svdvals(dense.a.first.weight.detach() * torch.linalg.vector_norm(x, dim=0))
    row = next(r for r in report.layers if r.name == "a.first")
    torch.testing.assert_close(torch.tensor(row.spectrum, dtype=F64), expected, rtol=1e-3, atol=1e-3 * expected[0])
    # the factors are the truncation in that metric: W' S = (W S)_r with S = diag(norms)
    scale = torch.linalg.vector_norm(x, dim=0)
    u, s, vh = torch.linalg.svd(dense.a.first.weight.detach() * scale)
    truncated = (u[:, :row.rank] * s[:row.rank]) @ vh[:row.rank] / scale
    assert torch.allclose(model.a.first.weight.detach(), truncated, atol=1e-8)
    assert report.settings["calibration"]["shrinkage"] == 1.0


def test_a_large_ridge_keeps_the_unrefitted_factors_and_none_is_the_full_refit():
    data = calibration()
    runs = {}
    for label, settings in {"refit": {"refit": True}, "ridge 0": {"refit": True, "ridge": 0.0},
                            "huge ridge": {"refit": True, "ridge": 1e9}, "no refit": {},
                            "some ridge": {"refit": True, "ridge": 0.5}}.items():
        model = block()
        lowrank.compress(model, 0.6, calibration=data, allocation="uniform", progress=False, **settings)
        runs[label] = torch.cat([m.second.detach().flatten() for m in model.modules() if isinstance(m, LowRankLinear)])
    assert torch.equal(runs["ridge 0"], runs["refit"])
    assert torch.allclose(runs["huge ridge"], runs["no refit"], rtol=1e-6, atol=1e-8)
    assert not torch.allclose(runs["refit"], runs["no refit"], atol=1e-4)  # the refit does move them here
    between = float(torch.linalg.vector_norm(runs["some ridge"] - runs["no refit"]))
    assert 0 < between < float(torch.linalg.vector_norm(runs["refit"] - runs["no refit"]))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("shrinkage", -0.1, "shrinkage must be a number in \\[0, 1\\], got -0.1"),
    ("shrinkage", 1.5, "shrinkage must be a number in \\[0, 1\\], got 1.5"),
    ("ridge", -1.0, "ridge must be a finite number >= 0, got -1.0"),
    ("ridge", float("inf"), "ridge must be a finite number >= 0, got inf"),
])
def test_bad_shrinkage_or_ridge_is_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=f"CalibrationConfig.{message}"):
        lowrank.CalibrationConfig(calibration(), **{field: value})


@pytest.mark.parametrize("settings", [{"refit": False}, {"sequential": False}, {"whiten": "asvd"}])
def test_a_ridge_without_a_refit_is_refused(settings):
    with pytest.raises(ValueError, match="CalibrationConfig.ridge=0.5 pulls the refit, which does not run here"):
        lowrank.CalibrationConfig(calibration(), ridge=0.5, **settings)


def relative_distance(model, reference, x):
    """The healing loss written out: mean squared difference over the dense output's mean square."""
    with torch.no_grad():
        target = reference(x)
        return float(((model(x) - target) ** 2).mean() / (target**2).mean())


def test_early_stopping_keeps_the_factors_best_on_the_held_out_batches():
    dense, model = block(), block()
    train = calibration(seed=1, batches=3)
    other = randn(64, 24, gen=generator(77)) * 2  # the held-out batch: inputs of every direction, not the subspace
    report = lowrank.compress(model, 0.4, calibration=[*train, other], allocation="uniform", heal_steps=400,
                              heal_lr=0.05, heal_holdout=0.25, heal_eval_every=3, heal_patience=2, progress=False)
    healing = report.healing
    assert healing["stopped_early"] and healing["steps"] < 400
    assert healing["best_step"] % 3 == 0 and healing["steps"] == healing["best_step"] + 2 * 3
    # the factors kept are those of the best held-out loss: recomputed here on the held-out batch
    assert relative_distance(model, dense, other) == pytest.approx(healing["held_out_after"], rel=1e-9)
    assert healing["held_out_after"] <= healing["held_out_before"]
    # a run that ends between two measurements is measured at its end: its training is not thrown away
    model = block()
    held_alike = correlated_inputs(64, seed=90)  # held out, but of the training batches' distribution
    report = lowrank.compress(model, 0.4, calibration=[*train, held_alike], allocation="uniform", heal_steps=4,
                              heal_lr=1e-3, heal_holdout=0.25, heal_eval_every=5, progress=False)
    assert report.healing["best_step"] == 4 and report.healing["steps"] == 4
    assert report.healing["held_out_after"] < report.healing["held_out_before"]
    assert relative_distance(model, dense, held_alike) == pytest.approx(report.healing["held_out_after"], rel=1e-9)
    # without a holdout the same run trains on every batch up to the step bound
    model = block()
    report = lowrank.compress(model, 0.4, calibration=[*train, other], allocation="uniform", heal_steps=40,
                              heal_lr=0.05, heal_holdout=0, progress=False)
    assert report.healing["steps"] == 40 and report.healing["held_out_after"] is None
    with pytest.raises(ValueError, match="HealConfig.holdout must be a share in \\[0, 1\\), got 1.0"):
        lowrank.HealConfig(steps=1, holdout=1.0)
    with pytest.raises(ValueError, match="heal_holdout=0.5 .* needs at least 2 batches, got 1"):
        lowrank.compress(block(), 0.4, calibration=train[:1], heal_steps=5, heal_holdout=0.5, progress=False)
