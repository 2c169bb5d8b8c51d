"""Loss terms of lowrank.train against explicit float64 computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.nn import LowRankEmbedding, LowRankLinear, TTLinear, Tucker2Conv
from lowrank.train import frobenius_decay, group_lasso, nuclear_norm, rank_dropout

F64 = torch.float64


def factorized_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        LowRankEmbedding.from_dense(nn.Embedding(20, 12), 4),
        LowRankLinear.from_dense(nn.Linear(12, 10), 3),
        Tucker2Conv.from_dense(nn.Conv2d(6, 8, 3), (3, 2)),
    ).to(F64)


def test_nuclear_norm_sums_singular_values_and_its_gradient_is_u_vt() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(9, 6), nn.Conv2d(3, 5, 2), nn.Linear(6, 2)).to(F64)
    value = nuclear_norm(model, exclude="2")
    weights = [model[0].weight, model[1].weight.reshape(5, -1)]
    expected = sum(float(torch.linalg.svdvals(w.detach()).sum()) for w in weights)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    value.backward()
    u, _, vh = torch.linalg.svd(model[0].weight.detach(), full_matrices=False)
    torch.testing.assert_close(model[0].weight.grad, u @ vh)
    assert model[2].weight.grad is None


def test_nuclear_norm_reads_convolutions_by_the_spatial_scheme() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, (2, 3))).to(F64)
    weight = model[0].weight.detach()
    spatial = weight.permute(1, 2, 0, 3).reshape(3 * 2, 4 * 3)
    expected = float(torch.linalg.svdvals(spatial).sum())
    assert float(nuclear_norm(model, conv_scheme="spatial").detach()) == pytest.approx(expected, rel=1e-12)


def test_frobenius_decay_is_the_squared_norm_of_each_product_and_differentiates_like_it() -> None:
    model = factorized_model()
    value = frobenius_decay(model, kinds=("linear", "conv", "embedding"))
    expected = sum(float(m.weight.detach().square().sum()) for m in model)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12)
    value.backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    sum(m.weight.square().sum() for m in model).backward()  # the explicit product, rebuilt
    reference = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b)


def _component_norms(module: nn.Module, axis) -> list[float]:
    """Norm of every entry component ``i`` owns, gathered entry list by entry list."""
    groups = getattr(module, "groups", 1)
    norms = []
    for i in range(axis.size):
        entries = []
        for name, dim, grouped in axis.slices:
            parameter = module.get_parameter(name).detach()
            rows = [g * axis.size + i for g in range(groups)] if grouped else [i]
            entries += [parameter.select(dim, r).flatten() for r in rows]
        norms.append(float(torch.cat(entries).norm()))
    return norms


@pytest.mark.parametrize("hierarchical", [False, True])
def test_group_lasso_sums_component_norms_or_their_nested_tails(hierarchical: bool) -> None:
    model = factorized_model()
    expected = 0.0
    for module in model:
        for axis in module.rank_axes():
            norms = _component_norms(module, axis)
            if hierarchical:
                expected += sum(sum(n**2 for n in norms[b:]) ** 0.5 for b in range(len(norms)))
            else:
                expected += sum(norms)
    value = group_lasso(model, hierarchical=hierarchical, kinds=("linear", "conv", "embedding"))
    assert float(value.detach()) == pytest.approx(expected, rel=1e-12)


def test_group_lasso_has_a_finite_gradient_at_a_zero_component() -> None:
    model = nn.Sequential(LowRankLinear.from_dense(nn.Linear(6, 6), 3))
    with torch.no_grad():
        model[0].first[2].zero_()
        model[0].second[:, 2].zero_()
    group_lasso(model, hierarchical=False).backward()
    assert torch.isfinite(model[0].first.grad).all()
    assert torch.equal(model[0].first.grad[2], torch.zeros(6))


def test_rank_dropout_sets_the_option_on_modules_with_components_only() -> None:
    model = nn.Sequential(LowRankLinear.from_dense(nn.Linear(16, 16), 3), TTLinear.from_dense(nn.Linear(16, 16), 2))
    assert rank_dropout(model, 0.2) == ["0"]
    assert model[0].rank_dropout.p == 0.2 and model[1].rank_dropout is None
    rank_dropout(model, 0.0)
    assert model[0].rank_dropout is None


def test_terms_refuse_models_without_what_they_penalise() -> None:
    dense = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no factorized module of the Sequential matches the targets"):
        frobenius_decay(dense)
    with pytest.raises(ValueError, match="group_lasso found no factorized module with rank components"):
        group_lasso(nn.Sequential(TTLinear.from_dense(nn.Linear(16, 16), 2)))
    with pytest.raises(TypeError, match="unexpected keyword argument.s. includ; the target shortcuts are include"):
        frobenius_decay(nn.Sequential(LowRankLinear.from_dense(nn.Linear(8, 8), 2)), includ="0")
    with pytest.raises(ValueError, match=r"p must be a fraction in \[0, 1\), got 1.0"):
        rank_dropout(nn.Sequential(LowRankLinear.from_dense(nn.Linear(8, 8), 2)), 1.0)
    with pytest.raises(ValueError, match="conv_scheme must be one of"):
        nuclear_norm(dense, conv_scheme="depth")


def test_nuclear_norm_of_half_precision_weights_is_taken_in_float32() -> None:
    model = nn.Sequential(nn.Linear(8, 6)).to(torch.bfloat16)
    expected = float(torch.linalg.svdvals(model[0].weight.detach().float()).sum())
    assert float(nuclear_norm(model).detach()) == pytest.approx(expected, rel=1e-6)
