"""Rank components of every factorized module with a rank, checked against explicit slices and dense products."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.nn import CPConv, LowRankEmbedding, LowRankLinear, SVDConv, TTLinear, Tucker2Conv
from lowrank.nn.components import active_params, component_squares, keep_components, zero_components

F64 = torch.float64

CASES = {
    "linear": (lambda: LowRankLinear.from_dense(nn.Linear(20, 12), 5), lambda: torch.randn(3, 20)),
    "embedding": (lambda: LowRankEmbedding.from_dense(nn.Embedding(30, 10), 4), lambda: torch.randint(0, 30, (7,))),
    "tucker2-grouped": (lambda: Tucker2Conv.from_dense(nn.Conv2d(8, 12, 3, groups=2), (3, 2)),
                        lambda: torch.randn(2, 8, 9, 9)),
    "cp-grouped": (lambda: CPConv.from_dense(nn.Conv2d(8, 12, 3, groups=2), 3), lambda: torch.randn(2, 8, 9, 9)),
    "svd-channel-grouped": (lambda: SVDConv.from_dense(nn.Conv2d(8, 12, 3, groups=2), 3),
                            lambda: torch.randn(2, 8, 9, 9)),
    "svd-spatial": (lambda: SVDConv.from_dense(nn.Conv2d(8, 12, 3), 3, scheme="spatial"),
                    lambda: torch.randn(2, 8, 9, 9)),
    "cp-3d": (lambda: CPConv.from_dense(nn.Conv3d(4, 6, (3, 1, 2)), 3), lambda: torch.randn(2, 4, 5, 5, 5)),
}


def build(case: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    make_module, make_input = CASES[case]
    module = make_module().to(F64)
    x = make_input()
    return module, x.to(F64) if x.is_floating_point() else x


@pytest.mark.parametrize("case", sorted(CASES))
def test_slices_are_the_rank_dims_of_the_parameters(case: str) -> None:
    module, _ = build(case)
    groups = getattr(module, "groups", 1)
    for axis in module.rank_axes():
        for name, dim, grouped in axis.slices:
            assert module.get_parameter(name).shape[dim] == axis.size * (groups if grouped else 1), (name, dim)


@pytest.mark.parametrize("case", sorted(CASES))
def test_zeroed_components_removed_give_the_same_outputs_and_the_counted_size(case: str) -> None:
    module, x = build(case)
    keep = {}
    for axis in module.rank_axes():
        zero_components(module, axis, torch.tensor([1]))
        keep[axis.name] = torch.tensor([i for i in range(axis.size) if i != 1])
    smaller = keep_components(module, keep)
    torch.testing.assert_close(smaller(x), module(x), rtol=1e-12, atol=1e-12)
    assert smaller.num_params == active_params(module, {name: len(kept) for name, kept in keep.items()})
    assert type(smaller) is type(module)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_components_of_an_axis_sum_to_the_weight(case: str) -> None:
    module, _ = build(case)
    for axis in module.rank_axes():  # each one alone (the other axes whole) is one term of the dense weight
        parts = sum(keep_components(module, {axis.name: torch.tensor([i])}).weight for i in range(axis.size))
        torch.testing.assert_close(parts, module.weight, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", sorted(CASES))
def test_component_squares_sum_each_components_entries(case: str) -> None:
    module, _ = build(case)
    groups = getattr(module, "groups", 1)
    for axis in module.rank_axes():
        expected = torch.zeros(axis.size, dtype=F64)
        for i in range(axis.size):
            for name, dim, grouped in axis.slices:
                parameter = module.get_parameter(name).detach()
                rows = [g * axis.size + i for g in range(groups)] if grouped else [i]
                expected[i] += sum(float(parameter.select(dim, r).square().sum()) for r in rows)
        torch.testing.assert_close(component_squares(module, axis).detach(), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rank_dropout_only_in_training_and_ordered_keeps_a_leading_block(case: str) -> None:
    module, x = build(case)
    expected = module(x)
    module.set_rank_dropout(1.0 - 1e-9, ordered=True)  # always truncate to a uniform leading block
    module.eval()
    assert torch.equal(module(x), expected)
    module.train()
    torch.manual_seed(3)
    out = module(x)
    axes = module.rank_axes()
    candidates = [keep_components(module, {axis.name: torch.arange(b) for axis in axes})(x)
                  for b in range(1, min(axis.size for axis in axes) + 1)]
    assert any(torch.allclose(out, candidate, rtol=1e-10, atol=1e-10) for candidate in candidates)


def test_unordered_rank_dropout_rescales_the_kept_components() -> None:
    module, x = build("linear")
    module.set_rank_dropout(0.5)
    module.train()
    torch.manual_seed(11)
    out = module(x)
    torch.manual_seed(11)
    mask = (torch.rand(module.rank) >= 0.5).to(F64) / 0.5
    reference = x @ (module.second.detach() * mask @ module.first.detach()).T + module.bias.detach()
    torch.testing.assert_close(out, reference)


def test_modules_without_components_refuse_rank_dropout() -> None:
    layer = TTLinear.from_dense(nn.Linear(16, 16), 2)
    assert layer.rank_axes() == []
    with pytest.raises(ValueError, match="TTLinear has no rank components to drop"):
        layer.set_rank_dropout(0.1)


def test_keep_components_refuses_an_empty_axis_and_unknown_names() -> None:
    module, _ = build("tucker2-grouped")
    with pytest.raises(ValueError, match="keep at least one component of axis 'r_in'"):
        keep_components(module, {"r_in": torch.tensor([], dtype=torch.long)})
    with pytest.raises(ValueError, match=r"Tucker2Conv has rank axes \['r_in', 'r_out'\]; got \['rank'\]"):
        keep_components(module, {"rank": torch.tensor([0])})


def test_keep_components_keeps_flags_dropout_and_mode() -> None:
    module, _ = build("linear")
    module.first.requires_grad_(False)
    module.set_rank_dropout(0.3, ordered=True)
    module.eval()
    smaller = keep_components(module, {"rank": torch.tensor([0, 2])})
    assert not smaller.first.requires_grad and smaller.second.requires_grad
    assert smaller.rank_dropout.p == 0.3 and smaller.rank_dropout.ordered and not smaller.training
