"""Low-rank from the first step: compress of a freshly initialised model is its spectral initialisation."""

from __future__ import annotations

import torch
from torch import nn

import lowrank
from lowrank.nn import LowRankLinear

F64 = torch.float64


def test_compressing_a_fresh_model_gives_balanced_factors_of_the_truncated_initial_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48)).to(F64)
    initial = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    lowrank.compress(model, ratio=0.5, progress=False)
    for layer, weight in zip((model[0], model[2]), initial):
        assert isinstance(layer, LowRankLinear)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        r = layer.rank
        torch.testing.assert_close(layer.weight, (u[:, :r] * s[:r]) @ vh[:r])  # Khodak et al.'s spectral init
        # balanced: first first^T = second^T second = diag(s), each factor carries sqrt(s)
        torch.testing.assert_close(layer.first @ layer.first.T, torch.diag(s[:r]))
        torch.testing.assert_close(layer.second.T @ layer.second, torch.diag(s[:r]))
    # both factors train: the loss reaches each of them
    (model(torch.randn(8, 48, dtype=F64)) ** 2).mean().backward()
    assert all(bool(p.grad.abs().sum() > 0) for layer in (model[0], model[2]) for p in (layer.first, layer.second))
