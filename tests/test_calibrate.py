"""lowrank.calibrate: calibration data, hook statistics (Gram, Fisher) and data-aware low-rank factors.

References are independent of the library: float64 ``torch.linalg`` on inputs captured or
computed by hand, ``torch.linalg.lstsq`` for least squares, analytic Jacobians of linear models.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import generator, randn, random_orthonormal
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.pytorch_utils import Conv1D

from lowrank.calibrate import (
    CalibrationBatch,
    asvd_low_rank,
    calibration_batches,
    cholesky_factor,
    collect_input_statistics,
    collect_output_fisher,
    collect_paired_statistics,
    collect_weight_gradients,
    model_output_tensor,
    refit_second,
    relative_output_error,
    run_calibration,
    shrunk_to_diagonal,
    whitened_low_rank,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

F64 = torch.float64


def fro(x):
    return float(torch.linalg.matrix_norm(x.to(F64)))


def correlated_inputs(n_features, n_samples, seed, decay=0.7):
    """``(n_features, n_samples)`` columns with covariance of spectrum ``decay ** k``: strongly correlated."""
    gen = generator(seed)
    basis = random_orthonormal(n_features, n_features, gen)
    scales = decay ** torch.arange(n_features, dtype=F64)
    return (basis * scales) @ randn(n_features, n_samples, gen=gen)


def svd_truncation(w, rank):
    """Best rank-``rank`` approximation of ``w`` in the Frobenius norm (Eckart-Young), float64."""
    u, s, vh = torch.linalg.svd(w.to(F64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def set_linear(layer, gen):
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


def mlp(seed=0, dtype=F64):
    gen = generator(seed)
    layers = [nn.Linear(6, 8), nn.ReLU(), Conv1D(5, 8)]  # Conv1D(nf=out, nx=in): weight (in, out)
    return nn.Sequential(*[set_linear(layer, gen) for layer in layers]).to(dtype).eval()


# ----------------------------------------------------------------------------- whitening


def test_whitening_lowers_the_output_error_of_plain_svd():
    gen = generator(0)
    w = randn(24, 32, gen=gen)
    x = correlated_inputs(32, 400, seed=1)
    for rank in (4, 8, 12):
        first, second, _ = whitened_low_rank(w.float(), (x @ x.T).float(), rank)
        assert first.shape == (rank, 32) and second.shape == (24, rank) and first.dtype == torch.float32
        whitened = fro((w - second.double() @ first.double()) @ x)
        plain = fro((w - svd_truncation(w, rank)) @ x)
        assert whitened < 0.5 * plain, (rank, whitened, plain)


@pytest.mark.parametrize("rank", [1, 5, 11])
def test_whitened_low_rank_is_the_optimal_output_approximation(rank):
    gen = generator(2)
    w = randn(12, 20, gen=gen)
    x = correlated_inputs(20, 60, seed=3, decay=0.85)  # full row rank: 20 features, 60 samples
    first, second, spectrum = whitened_low_rank(w, x @ x.T, rank)
    achieved = fro((w - second @ first) @ x) ** 2
    # Independent optimum: the best rank-r approximation of W X itself (Eckart-Young).
    reference = torch.linalg.svdvals(w @ x)
    assert achieved == pytest.approx(float((reference[rank:] ** 2).sum()), rel=1e-8)
    assert torch.allclose(spectrum, reference, rtol=1e-9, atol=1e-12)
    assert achieved == pytest.approx(float((spectrum[rank:] ** 2).sum()), rel=1e-8)


def test_two_sided_weighting_is_optimal_for_the_weighted_error():
    gen = generator(4)
    w = randn(10, 14, gen=gen)
    x = correlated_inputs(14, 50, seed=5)
    y = correlated_inputs(10, 30, seed=6, decay=0.6)  # F = Y Y^T, a strongly anisotropic output weighting
    rank = 4

    def weighted_error_sq(approx):
        return fro(y.T @ (w - approx) @ x) ** 2

    first, second, spectrum = whitened_low_rank(w, x @ x.T, rank, output_gram=y @ y.T)
    achieved = weighted_error_sq(second @ first)
    reference = torch.linalg.svdvals(y.T @ w @ x)[:10]  # (30, 50) of rank 10
    assert torch.allclose(spectrum, reference, rtol=1e-9, atol=1e-12)
    assert achieved == pytest.approx(float((spectrum[rank:] ** 2).sum()), rel=1e-8)
    assert achieved == pytest.approx(float((reference[rank:] ** 2).sum()), rel=1e-8)
    one_sided_first, one_sided_second, _ = whitened_low_rank(w, x @ x.T, rank)
    assert achieved < 0.9 * weighted_error_sq(one_sided_second @ one_sided_first)


def test_factors_are_balanced_and_scale_free():
    gen = generator(7)
    w = randn(8, 16, gen=gen)
    x = correlated_inputs(16, 40, seed=8)
    first, second, _ = whitened_low_rank(w, x @ x.T, 5)
    assert torch.allclose(torch.linalg.vector_norm(first, dim=1), torch.linalg.vector_norm(second, dim=0))
    # The Gram matrix's scale (the number of tokens) changes neither the product nor the factors' sizes.
    first_big, second_big, _ = whitened_low_rank(w, 1e6 * (x @ x.T), 5)
    assert torch.allclose(second_big @ first_big, second @ first, atol=1e-9)
    assert torch.allclose(first_big.abs(), first.abs(), atol=1e-9)


def test_cholesky_factor_of_singular_gram_matrices():
    gen = generator(9)
    x = randn(5, 20, gen=gen)  # 5 samples of 20 features: Gram matrix of rank 5
    cases = {"rank 5": x.T @ x, "rank 1": torch.ones(4, 4, dtype=F64), "zero": torch.zeros(3, 3, dtype=F64)}
    for name, gram in cases.items():
        factor = cholesky_factor(gram)
        assert factor.dtype == F64 and torch.isfinite(factor).all(), name
        assert torch.equal(factor, factor.tril()) and (factor.diagonal() > 0).all(), name
        scale = max(float(gram.diagonal().mean()), 1.0)
        assert fro(factor @ factor.T - gram) <= 1e-12 * scale * gram.shape[0], name
    # A float32 Gram matrix is factored in float64.
    assert cholesky_factor((x.T @ x).float()).dtype == F64
    with pytest.raises(ValueError, match="not positive semi-definite"):
        cholesky_factor(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="negative diagonal"):
        cholesky_factor(-torch.eye(3))
    # the refit's A G A^T of a singular G: a row of A in G's null space gives a zero diagonal entry, which
    # rounding can push a hair below zero (as 2 calibration lines of MiniLM did): it factors all the same
    a = randn(6, 20, gen=gen)
    a[2] = torch.linalg.svd(x).Vh[-1]  # x (5 samples) sends this direction to zero
    product = a @ (x.T @ x) @ a.T
    product[2, 2] = -4e-18 * float(product.diagonal().max())
    factor = cholesky_factor(product)
    assert fro(factor @ factor.T - product) <= 1e-12 * float(product.diagonal().max()) * 6
    with pytest.raises(ValueError, match="negative diagonal"):  # beyond rounding: refused
        cholesky_factor(torch.diag(torch.tensor([1.0, -1e-9], dtype=F64)))
    with pytest.raises(ValueError, match="square"):
        cholesky_factor(torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        cholesky_factor(torch.full((2, 2), float("nan")))


def test_whitened_low_rank_with_fewer_samples_than_features():
    gen = generator(10)
    w = randn(12, 30, gen=gen)
    x = randn(30, 8, gen=gen)  # 8 samples: the Gram matrix has rank 8 of 30
    for rank in (3, 8, 12):
        first, second, spectrum = whitened_low_rank(w, x @ x.T, rank)
        assert torch.isfinite(first).all() and torch.isfinite(second).all()
        assert fro(second @ first) <= 2 * fro(w)  # no blow-up in the directions the data never visits
        reference = torch.linalg.svdvals(w @ x)
        optimum = float((reference[rank:] ** 2).sum())
        assert fro((w - second @ first) @ x) ** 2 == pytest.approx(optimum, rel=1e-6, abs=1e-9 * fro(w @ x) ** 2)
        assert torch.allclose(spectrum[:8], reference, rtol=1e-6)


def test_asvd_shapes_alpha_zero_and_outlier_channels():
    gen = generator(11)
    w = randn(16, 24, gen=gen)
    # Inputs with a few outlier channels, the case ASVD is made for.
    channel_scale = torch.ones(24, dtype=F64)
    channel_scale[[2, 9, 17]] = 30.0
    x = randn(24, 300, gen=gen) * channel_scale[:, None]
    abs_mean = x.abs().mean(1)
    first, second, spectrum = asvd_low_rank(w.float(), abs_mean, 6)
    assert first.shape == (6, 24) and second.shape == (16, 6) and first.dtype == torch.float32
    assert torch.allclose(spectrum, torch.linalg.svdvals(w.float().double() * abs_mean.sqrt()), rtol=1e-9)
    plain = svd_truncation(w, 6)
    assert fro((w - second.double() @ first.double()) @ x) < 0.8 * fro((w - plain) @ x)
    first0, second0, spectrum0 = asvd_low_rank(w, abs_mean, 6, alpha=0.0)
    assert torch.allclose(second0 @ first0, plain, atol=1e-10)
    assert torch.allclose(spectrum0, torch.linalg.svdvals(w), rtol=1e-10)
    # A dead channel (mean 0) neither breaks the factors nor matters to the outputs.
    abs_mean[5] = 0.0
    first, second, _ = asvd_low_rank(w, abs_mean, 6)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    with pytest.raises(ValueError, match=r"rank \(an int in \[1, 16\]\) for a 16x24 weight must be at most 16, got 17"):
        asvd_low_rank(w, abs_mean, 17)
    with pytest.raises(ValueError, match="abs_mean must be shape"):
        asvd_low_rank(w, abs_mean[:5], 4)


def test_refit_second_is_the_least_squares_solution_and_never_hurts():
    gen = generator(12)
    w = randn(14, 20, gen=gen)
    x = correlated_inputs(20, 200, seed=13)
    u, s, vh = torch.linalg.svd(w)
    for rank in (2, 6, 10):
        first, second = vh[:rank], u[:, :rank] * s[:rank]  # plain SVD factors
        refit = refit_second(w, first, x @ x.T)
        reference = torch.linalg.lstsq((first @ x).T, (w @ x).T).solution.T
        assert torch.allclose(refit, reference, rtol=1e-8, atol=1e-10)
        assert fro((w - refit @ first) @ x) <= fro((w - second @ first) @ x) * (1 + 1e-12)
    # Inputs differ between the dense and the compressed path: the cross moment enters.
    x_c = x + 0.3 * randn(*x.shape, gen=gen)
    first = vh[:5]
    refit = refit_second(w, first, x_c @ x_c.T, cross=x @ x_c.T)
    reference = torch.linalg.lstsq((first @ x_c).T, (w @ x).T).solution.T
    assert torch.allclose(refit, reference, rtol=1e-8, atol=1e-10)
    assert refit_second(w.float(), first.float(), x @ x.T).dtype == torch.float32
    with pytest.raises(ValueError, match=r"first must have shape \(rank, 20\)"):
        refit_second(w, first[:, :10], x @ x.T)


def test_a_ridge_pulls_the_refit_towards_its_prior_as_the_augmented_least_squares_does():
    gen = generator(15)
    w = randn(14, 20, gen=gen)
    x = correlated_inputs(20, 200, seed=16)
    x_c = x + 0.3 * randn(*x.shape, gen=gen)
    u, s, vh = torch.linalg.svd(w)
    first, prior = vh[:5], u[:, :5] * s[:5]
    hessian = first @ x_c @ x_c.T @ first.T
    for damping in (0.01, 0.3, 3.0):
        refit = refit_second(w, first, x_c @ x_c.T, cross=x @ x_c.T, damping=damping, prior=prior)
        # min ||W X - B A X_c||^2 + lam ||B - P||^2 as one least-squares problem: rows sqrt(lam) I appended
        lam = damping * float(hessian.diagonal().mean())
        design = torch.cat([(first @ x_c).T, lam**0.5 * torch.eye(5, dtype=F64)])
        target = torch.cat([(w @ x).T, lam**0.5 * prior.T])
        reference = torch.linalg.lstsq(design, target).solution.T
        assert torch.allclose(refit, reference, rtol=1e-7, atol=1e-9), damping
    full = refit_second(w, first, x_c @ x_c.T, cross=x @ x_c.T)
    assert torch.allclose(refit_second(w, first, x_c @ x_c.T, cross=x @ x_c.T, damping=0.0, prior=prior), full)
    kept = refit_second(w, first, x_c @ x_c.T, cross=x @ x_c.T, damping=1e9, prior=prior)
    assert torch.allclose(kept, prior, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match=r"prior must have shape \(14, 5\)"):
        refit_second(w, first, x_c @ x_c.T, damping=1.0, prior=prior[:, :4])


def test_shrinkage_keeps_the_diagonal_and_scales_the_correlations():
    x = correlated_inputs(8, 50, seed=17)
    gram = x @ x.T
    for amount in (0.0, 0.25, 1.0):
        shrunk = shrunk_to_diagonal(gram, amount)
        assert torch.equal(shrunk.diagonal(), gram.diagonal())
        off = ~torch.eye(8, dtype=torch.bool)
        assert torch.allclose(shrunk[off], (1 - amount) * gram[off], rtol=1e-15, atol=0)
    assert shrunk_to_diagonal(gram, 0.0) is gram
    with pytest.raises(ValueError, match="shrinkage must be in \\[0, 1\\], got 1.5"):
        shrunk_to_diagonal(gram, 1.5)


def test_relative_output_error_and_argument_checks():
    gen = generator(14)
    w = randn(6, 9, gen=gen)
    x, y = randn(9, 40, gen=gen), randn(6, 6, gen=gen)
    approx = svd_truncation(w, 3)
    assert relative_output_error(w, approx, x @ x.T) == pytest.approx(fro((w - approx) @ x) / fro(w @ x), rel=1e-10)
    two_sided = relative_output_error(w, approx, x @ x.T, output_gram=y @ y.T)
    assert two_sided == pytest.approx(fro(y.T @ (w - approx) @ x) / fro(y.T @ w @ x), rel=1e-10)
    with pytest.raises(ValueError, match=r"gram must be shape \(9, 9\)"):
        whitened_low_rank(w, torch.eye(6, dtype=F64), 2)
    with pytest.raises(ValueError, match=r"output_gram must be shape \(6, 6\)"):
        whitened_low_rank(w, torch.eye(9, dtype=F64), 2, output_gram=torch.eye(9, dtype=F64))
    with pytest.raises(ValueError, match=r"rank \(an int in \[1, 6\]\) for a 6x9 weight must be at least 1, got 0"):
        whitened_low_rank(w, torch.eye(9, dtype=F64), 0)
    with pytest.raises(TypeError, match=r"rank \(an int in \[1, 6\]\) must be an int"):
        whitened_low_rank(w, torch.eye(9, dtype=F64), 2.0)


# ----------------------------------------------------------------------------- calibration data


class FakeTokenizer:
    """Records its calls; one token per word, padded with zeros."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts, **kwargs):
        self.calls.append((list(texts), kwargs))
        lengths = [min(len(t.split()), kwargs["max_length"]) for t in texts]
        width = max(lengths)
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
        return {"input_ids": mask * 7, "attention_mask": mask}


def test_texts_are_sorted_tokenized_and_masked():
    tok = FakeTokenizer()
    texts = ["a b c d e", "a", "a b c", "a b", "a b c d e f g h"]
    batches = calibration_batches(texts, tokenizer=tok, batch_size=2, max_length=6)
    assert [call[0] for call in tok.calls] == [["a", "a b"], ["a b c", "a b c d e"], ["a b c d e f g h"]]
    assert all(call[1] == {"padding": True, "truncation": True, "max_length": 6, "return_tensors": "pt"}
               for call in tok.calls)
    assert [b.token_mask.sum().item() for b in batches] == [3, 8, 6]
    for batch in batches:
        assert batch.args == () and set(batch.kwargs) == {"input_ids", "attention_mask"}
        assert batch.token_mask.dtype == torch.bool
        assert torch.equal(batch.token_mask, batch.kwargs["attention_mask"].bool())
    assert len(calibration_batches("one text", tokenizer=tok)) == 1
    with pytest.raises(ValueError, match="no tokenizer"):
        calibration_batches(texts)


def test_loaders_dicts_tuples_tensors_and_devices():
    gen = generator(15)
    x, labels = randn(10, 4, gen=gen), torch.arange(10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=4)
    batches = calibration_batches(loader)  # (inputs, targets): the first element is the input
    assert [b.args[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b.args[0] for b in batches]), x)
    assert all(b.kwargs == {} and b.token_mask is None for b in batches)

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    inputs = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": mask}
    (from_dict,) = calibration_batches([inputs])
    (from_tuple,) = calibration_batches([(inputs, torch.zeros(2))])
    for batch in (from_dict, from_tuple):
        assert batch.args == () and set(batch.kwargs) == {"input_ids", "attention_mask"}
        assert torch.equal(batch.token_mask, mask.bool())

    ready = CalibrationBatch((x,), {}, None)
    assert calibration_batches([x, ready])[1] is ready
    assert len(calibration_batches((x[i : i + 1] for i in range(10)), max_batches=3)) == 3
    moved = calibration_batches([(inputs, labels)], device="meta")[0]
    assert moved.kwargs["input_ids"].device.type == "meta" and moved.token_mask.device.type == "meta"


def test_calibration_data_errors():
    with pytest.raises(ValueError, match="empty"):
        calibration_batches([])
    with pytest.raises(ValueError, match="empty"):
        calibration_batches(iter([]))
    with pytest.raises(TypeError, match="wrap a single batch in a list"):
        calibration_batches(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="mixes strings"):
        calibration_batches(["text", torch.zeros(2)])
    with pytest.raises(TypeError, match="calibration batch 1 is a int"):
        calibration_batches([torch.zeros(2), 3])
    with pytest.raises(TypeError, match="callable"):
        calibration_batches(lambda model: None)
    with pytest.raises(TypeError, match="token_mask must be a 2-D"):
        CalibrationBatch((), {}, torch.ones(2, 3))
    model = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="calibration_batches"):
        run_calibration(model, [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="empty"):
        run_calibration(model, [])


def test_run_calibration_batches_callable_and_on_batch():
    model = nn.Linear(4, 2)
    seen, order = [], []
    handle = model.register_forward_hook(lambda m, a, o: seen.append((a[0].shape, torch.is_grad_enabled())))
    batches = calibration_batches([torch.zeros(3, 4), torch.zeros(5, 4)])
    run_calibration(model, batches, on_batch=lambda b: order.append((b.args[0].shape[0], len(seen))))
    assert order == [(3, 0), (5, 1)]  # on_batch runs before each forward
    assert seen == [(torch.Size([3, 4]), False), (torch.Size([5, 4]), False)]
    run_calibration(model, lambda m: m(torch.zeros(7, 4)), grad=True)
    assert seen[-1] == (torch.Size([7, 4]), True)
    handle.remove()


# ----------------------------------------------------------------------------- input statistics


def test_input_statistics_match_hand_computed_inputs():
    model = mlp()
    gen = generator(16)
    data = [randn(2, 7, 6, gen=gen), randn(3, 5, 6, gen=gen)]
    stats = collect_input_statistics(model, {"first": model[0], "conv1d": model[2]}, calibration_batches(data))
    x0 = torch.cat([d.reshape(-1, 6) for d in data])
    x2 = torch.relu(x0 @ model[0].weight.T + model[0].bias)  # the Conv1D's inputs, by hand
    for name, x in (("first", x0), ("conv1d", x2)):
        assert stats[name].count == 29 and stats[name].gram.dtype == F64
        assert torch.allclose(stats[name].gram, x.T @ x, rtol=1e-12, atol=1e-12)
        assert torch.allclose(stats[name].abs_mean, x.abs().mean(0), rtol=1e-12)
        assert torch.allclose(stats[name].second_moment, x.T @ x / 29, rtol=1e-12)
    assert stats["conv1d"].in_features == 8
    # A callable calibration sees the same inputs.
    from_callable = collect_input_statistics(model, {"first": model[0]}, lambda m: [m(d) for d in data])
    assert torch.allclose(from_callable["first"].gram, stats["first"].gram, rtol=1e-12)
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks


def test_input_statistics_skip_padding_rows():
    model = mlp()
    gen = generator(17)
    x = randn(2, 4, 6, gen=gen)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    padded = x.clone()
    padded[~mask] = 1e3  # padding rows hold garbage that must not count
    stats = collect_input_statistics(model, {"first": model[0]}, [CalibrationBatch((padded,), {}, mask)])
    kept = x[mask]
    assert stats["first"].count == 4
    assert torch.allclose(stats["first"].gram, kept.T @ kept, rtol=1e-12)


def test_hooks_are_removed_and_modes_restored_when_the_model_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            self.drop(self.lin(x))
            raise RuntimeError("boom")

    model = Boom().train()
    model.lin.weight.requires_grad_(False)
    batches = calibration_batches([torch.zeros(2, 4)])
    with pytest.raises(RuntimeError, match="boom"):
        collect_input_statistics(model, {"lin": model.lin}, batches)
    with pytest.raises(RuntimeError, match="boom"):
        collect_output_fisher(model, {"lin": model.lin}, batches)
    for module in (model, model.lin):
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert model.training and model.drop.training and model.lin.training
    assert not model.lin.weight.requires_grad and model.lin.bias.requires_grad


def test_layer_that_never_ran_is_named():
    model = mlp()
    ghost = nn.Linear(6, 3)
    batches = calibration_batches([torch.zeros(2, 6, dtype=F64)])
    with pytest.raises(ValueError, match="layer 'ghost' received no input during calibration"):
        collect_input_statistics(model, {"first": model[0], "ghost": ghost}, batches)
    with pytest.raises(ValueError, match="layer 'ghost' received no input during calibration"):
        collect_output_fisher(model, {"ghost": ghost}, batches)
    with pytest.raises(ValueError, match="layers is empty"):
        collect_input_statistics(model, {}, batches)
    with pytest.raises(ValueError, match=r"layer 'first': input of shape \(2, 5\) does not end in its 6"):
        collect_input_statistics(nn.Sequential(model[0]), {"first": model[0]}, [CalibrationBatch((torch.zeros(2, 5),))])
    assert not model[0]._forward_pre_hooks and not ghost._forward_pre_hooks


# ----------------------------------------------------------------------------- output Fisher


def linear_pair(seed=0):
    gen = generator(seed)
    return nn.Sequential(set_linear(nn.Linear(4, 5), gen), set_linear(nn.Linear(5, 3), gen)).double()


def test_output_fisher_matches_the_analytic_jacobian():
    model = linear_pair()
    gen = generator(18)
    data = [randn(2, 3, 4, gen=gen), randn(2, 3, 4, gen=gen)]
    mask = torch.tensor([[True, True, False], [True, True, True]])
    batches = [CalibrationBatch((data[0],)), CalibrationBatch((data[1],), {}, mask)]
    n_probes, seed = 3, 5
    fisher = collect_output_fisher(model, {"a": model[0], "b": model[1]}, batches, n_probes=n_probes, seed=seed)
    # The documented probes: eps ~ N(0, I) of the output's shape, zero at padding, from a seeded CPU generator.
    probes = torch.Generator().manual_seed(seed)
    expected = torch.zeros(3, 3, dtype=F64)
    for batch in batches:
        for _ in range(n_probes):
            eps = torch.randn(2, 3, 3, generator=probes, dtype=torch.float32).double()
            rows = eps.reshape(-1, 3) if batch.token_mask is None else eps[batch.token_mask]
            expected += rows.T @ rows  # the gradient at the output layer is eps itself
    expected /= n_probes
    w2 = model[1].weight.detach()
    assert torch.allclose(fisher["b"], expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(fisher["a"], w2.T @ expected @ w2, rtol=1e-10, atol=1e-12)  # J = W2 for the first layer


def test_output_fisher_with_a_loss_is_the_empirical_fisher_and_restores_the_model():
    model = linear_pair(1).train()
    model[0].bias.requires_grad_(False)
    gen = generator(19)
    x, c = randn(4, 2, 4, gen=gen), randn(4, 2, 3, gen=gen)
    batches = calibration_batches([x])
    fisher = collect_output_fisher(model, {"a": model[0], "b": model[1]}, batches,
                                   loss_fn=lambda m, b: (m(*b.args) * c).sum())
    rows = c.reshape(-1, 3)  # d loss / d output = c
    w2 = model[1].weight.detach()
    assert torch.allclose(fisher["b"], rows.T @ rows, rtol=1e-12)
    assert torch.allclose(fisher["a"], w2.T @ rows.T @ rows @ w2, rtol=1e-10)
    assert model.training and model[0].training and model[1].training
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="scalar"):
        collect_output_fisher(model, {"b": model[1]}, batches, loss_fn=lambda m, b: m(*b.args))
    with pytest.raises(ValueError, match="n_probes applies to the default probe loss only"):
        collect_output_fisher(model, {"b": model[1]}, batches, loss_fn=lambda m, b: m(*b.args).sum(), n_probes=2)


def test_output_fisher_estimates_the_increase_of_the_output_distance():
    model = linear_pair(2)
    gen = generator(20)
    x = randn(100, 4, gen=gen)
    batches = calibration_batches([x])
    fisher = collect_output_fisher(model, {"a": model[0]}, batches, n_probes=400, seed=1)["a"]
    w2 = model[1].weight.detach()
    # E[F] = sum_t J_t^T J_t = 100 W2^T W2
    assert fro(fisher - 100 * w2.T @ w2) < 0.05 * fro(100 * w2.T @ w2)
    # 1/2 tr(dW G dW^T F) / count estimates 1/2 ||f - f_dense||^2 for a change dW of the first layer.
    stats = collect_input_statistics(model, {"a": model[0]}, batches)["a"]
    d = 0.1 * randn(5, 4, gen=gen)
    estimate = float(torch.trace(d @ stats.gram @ d.T @ fisher)) / stats.count
    actual = fro(x @ d.T @ w2.T) ** 2
    assert estimate == pytest.approx(actual, rel=0.1)


def test_output_fisher_on_conv1d_and_callable_and_errors():
    model = mlp()
    gen = generator(21)
    x = randn(3, 6, gen=gen)
    fisher = collect_output_fisher(model, {"conv1d": model[2]}, calibration_batches([x]), n_probes=2)
    same = collect_output_fisher(model, {"conv1d": model[2]}, lambda m: m(x), n_probes=2)
    assert fisher["conv1d"].shape == (5, 5) and torch.allclose(fisher["conv1d"], same["conv1d"])
    with pytest.raises(RuntimeError, match="layer 'conv1d' ran without gradient recording"):
        collect_output_fisher(model, {"conv1d": model[2]}, lambda m: torch.no_grad()(m)(x))
    with pytest.raises(TypeError, match="loss_fn needs a sequence"):
        collect_output_fisher(model, {"conv1d": model[2]}, lambda m: m(x), loss_fn=lambda m, b: m(x).sum())
    assert not model[2]._forward_hooks and not model._forward_hooks


def test_model_output_tensor():
    t = torch.zeros(2)
    assert model_output_tensor(t) is t
    assert model_output_tensor((t, torch.ones(1))) is t
    assert model_output_tensor({"loss": torch.ones(()), "logits": t}) is t
    assert model_output_tensor(BaseModelOutputWithPooling(last_hidden_state=t, pooler_output=torch.ones(2))) is t
    with pytest.raises(TypeError, match="cannot find the output tensor"):
        model_output_tensor("text")


# ----------------------------------------------------------------------------- the bundled MiniLM


@pytest.fixture(scope="module")
def minilm():
    from minilm_task import checkpoint_dir, tokenizer

    from lowrank.io import load_pretrained

    return load_pretrained(checkpoint_dir()), tokenizer()


TEXTS = [
    "Lists are mutable sequences.",
    "The with statement wraps the execution of a block with methods defined by a context manager.",
    "A tuple.",
    "Dictionaries map hashable keys to arbitrary values and keep insertion order.",
    "Exceptions are raised when an error occurs, and may be handled by try statements and except clauses.",
]
LAYERS = ("encoder.layer.0.attention.self.query", "encoder.layer.5.output.dense", "pooler.dense")


def test_minilm_statistics_with_padding_equal_those_of_each_sentence_alone(minilm):
    model, tok = minilm
    layers = {name: model.get_submodule(name) for name in LAYERS}
    padded = calibration_batches(TEXTS, tokenizer=tok, batch_size=len(TEXTS))
    alone = calibration_batches(TEXTS, tokenizer=tok, batch_size=1)
    assert len(padded) == 1 and not padded[0].token_mask.all()
    stats_padded = collect_input_statistics(model, layers, padded)
    stats_alone = collect_input_statistics(model, layers, alone)
    n_tokens = sum(len(tok(text, truncation=True, max_length=128)["input_ids"]) for text in TEXTS)
    for name in LAYERS:
        expected_count = len(TEXTS) if name == "pooler.dense" else n_tokens  # the pooler sees one row per text
        assert stats_padded[name].count == stats_alone[name].count == expected_count, name
        gram, reference = stats_padded[name].gram, stats_alone[name].gram
        assert fro(gram - reference) <= 1e-5 * fro(reference), name
    # Without the mask, padding rows would count and change the statistics.
    unmasked = [CalibrationBatch(b.args, b.kwargs, None) for b in padded]
    query = LAYERS[0]
    stats_unmasked = collect_input_statistics(model, {query: layers[query]}, unmasked)[query]
    assert stats_unmasked.count > n_tokens
    assert fro(stats_unmasked.gram - stats_alone[query].gram) > 1e-2 * fro(stats_alone[query].gram)


def test_minilm_output_fisher_and_whitening(minilm):
    model, tok = minilm
    batches = calibration_batches(TEXTS, tokenizer=tok, batch_size=3)
    name = "encoder.layer.5.output.dense"
    layer = model.get_submodule(name)
    fisher = collect_output_fisher(model, {name: layer}, batches)[name]
    assert fisher.shape == (384, 384) and torch.allclose(fisher, fisher.T)
    assert torch.linalg.eigvalsh(fisher).min() > -1e-8 * fisher.diagonal().mean()
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="layer 'pooler.dense' received no gradient"):
        collect_output_fisher(model, {"pooler.dense": model.pooler.dense}, batches)
    # On real activations, whitening preserves the layer's outputs better than a plain SVD.
    stats = collect_input_statistics(model, {name: layer}, batches)[name]
    w = layer.weight.detach()
    first, second, _ = whitened_low_rank(w, stats.gram, 96)
    whitened = relative_output_error(w, second @ first, stats.gram)
    plain = relative_output_error(w, svd_truncation(w, 96).float(), stats.gram)
    assert whitened < plain


def test_weight_gradients_match_autograd_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model[2].weight.grad = torch.ones_like(model[2].weight)  # a user's gradient, kept
    model[0].bias.requires_grad_(False)
    xs = [torch.randn(4, 5, dtype=torch.float64) for _ in range(3)]

    def loss_fn(m, batch):
        return m(*batch.args).pow(2).sum()

    grads = collect_weight_gradients(model, {"0": model[0], "2": model[2]}, calibration_batches(xs), loss_fn)
    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    for x in xs:
        loss_fn(reference, CalibrationBatch((x,))).backward()
    torch.testing.assert_close(grads["0"], reference[0].weight.grad)
    torch.testing.assert_close(grads["2"], reference[2].weight.grad)
    assert torch.equal(model[2].weight.grad, torch.ones(3, 7, dtype=torch.float64)) and model[0].weight.grad is None
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad


def test_stopping_each_forward_early_gives_the_same_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    batches = calibration_batches([torch.randn(4, 5, dtype=torch.float64) for _ in range(3)])
    seen = []
    model[4].register_forward_pre_hook(lambda m, a: seen.append(1))
    layers = {"0": model[0], "2": model[2]}
    early = collect_input_statistics(model, layers, batches, stop_early=True)
    assert not seen  # the last layer never ran: each pass stopped once both inputs were in
    full = collect_input_statistics(model, layers, batches)
    for name in layers:
        torch.testing.assert_close(early[name].gram, full[name].gram, rtol=0, atol=0)
        assert early[name].count == full[name].count == 12
    with pytest.raises(TypeError, match="stop_early needs a sequence of CalibrationBatch"):
        collect_input_statistics(model, layers, lambda m: None, stop_early=True)


def parameter_state(model):
    return [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]


def assert_same_state(before, after):
    assert [flag for flag, _ in after] == [flag for flag, _ in before]
    for (_, grad_before), (_, grad_after) in zip(before, after):
        assert (grad_before is None) == (grad_after is None)
        if grad_before is not None:
            assert torch.equal(grad_before, grad_after)


def failing_losses():
    def raising(m, batch):
        m(*batch.args).sum().backward()  # gradients are written before the failure
        raise RuntimeError("user loss failed")

    def not_scalar(m, batch):
        return m(*batch.args)

    return [(raising, RuntimeError, "user loss failed"), (not_scalar, ValueError, "loss_fn must return a scalar")]


@pytest.mark.parametrize("collector", ["fisher", "gradients"])
def test_a_failing_loss_leaves_every_flag_and_gradient_as_it_was(collector):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().train()
    model[0].bias.requires_grad_(False)
    model[2].weight.grad = torch.full_like(model[2].weight, 3.0)  # a user's gradient
    outside = nn.Linear(3, 3).double()  # a watched layer that is not part of the model
    outside.weight.requires_grad_(False)
    batches = calibration_batches([torch.randn(4, 5, dtype=F64) for _ in range(2)])
    layers = {"0": model[0], "2": model[2], "outside": outside}
    before, before_outside = parameter_state(model), parameter_state(outside)
    for loss_fn, error, message in failing_losses():
        with pytest.raises(error, match=message):
            if collector == "fisher":
                collect_output_fisher(model, layers, batches, loss_fn=loss_fn)
            else:
                collect_weight_gradients(model, layers, batches, loss_fn)
        assert_same_state(before, parameter_state(model))
        assert_same_state(before_outside, parameter_state(outside))
        assert model.training and model[0].training
        assert not model[0]._forward_hooks and not model[2]._forward_hooks and not outside._forward_hooks


def test_paired_statistics_stopped_early_equal_the_full_ones():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    model = copy.deepcopy(reference)
    with torch.no_grad():
        model[0].weight.add_(0.1 * torch.randn(7, 5, dtype=F64))  # the compressed path sees other inputs
    x = torch.randn(2, 3, 5, dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    batches = [CalibrationBatch((x,), {}, mask), *calibration_batches([torch.randn(4, 5, dtype=F64)])]
    seen = []
    for network in (reference, model):
        network[4].register_forward_pre_hook(lambda m, a: seen.append(1))
    names = ["0", "2"]
    early = collect_paired_statistics(model, reference, names, batches, stop_early=True)
    assert not seen  # neither model ran its last layer
    full = collect_paired_statistics(model, reference, names, batches)
    assert len(seen) == 4
    for name in names:
        torch.testing.assert_close(early[name][0], full[name][0], rtol=0, atol=0)
        torch.testing.assert_close(early[name][1], full[name][1], rtol=0, atol=0)
    # By hand: the second layers' inputs in each model, padding rows left out.
    rows = torch.cat([x[mask], batches[1].args[0]])
    dense, compressed = torch.tanh(reference[0](rows)), torch.tanh(model[0](rows))
    torch.testing.assert_close(full["2"][0], compressed.T @ compressed)
    torch.testing.assert_close(full["2"][1], dense.T @ compressed)
    with pytest.raises(TypeError, match="collect_paired_statistics needs a sequence of CalibrationBatch"):
        collect_paired_statistics(model, reference, names, lambda m: None)
