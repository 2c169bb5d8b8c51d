"""LowRankLinear and LowRankEmbedding against the dense layers they replace (float64 references)."""

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import generator, low_rank_matrix, singular_values, tail_errors
from torch import nn

from lowrank.nn import LowRankEmbedding, LowRankLinear

F64 = torch.float64


def dense_linear(in_features, out_features, bias, seed, weight=None):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=F64)
    if weight is not None:
        with torch.no_grad():
            layer.weight.copy_(weight)
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("in_features", "out_features", "rank"), [(17, 9, 3), (8, 30, 8), (64, 64, 1), (5, 5, 5)])
@pytest.mark.parametrize("batch", [(4,), (2, 3), (2, 1, 5)])
def test_forward_equals_dense_forward_of_to_dense(in_features, out_features, rank, bias, batch):
    layer = LowRankLinear.from_dense(dense_linear(in_features, out_features, bias, seed=rank), rank)
    x = torch.randn(*batch, in_features, dtype=F64, generator=generator(1))
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear) and (dense.bias is None) == (not bias)
    torch.testing.assert_close(layer(x), F.linear(x, dense.weight, dense.bias), rtol=1e-12, atol=1e-12)
    assert layer(x).shape == (*batch, out_features)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_truncation_error_is_the_optimal_tail(rank):
    dense = dense_linear(20, 12, True, seed=0)
    layer = LowRankLinear.from_dense(dense, rank)
    error = torch.linalg.vector_norm(layer.weight - dense.weight) / torch.linalg.vector_norm(dense.weight)
    assert math.isclose(float(error), float(tail_errors(singular_values(dense.weight))[rank]), rel_tol=1e-9)
    torch.testing.assert_close(layer.bias, dense.bias, rtol=0, atol=0)


def test_exact_on_a_low_rank_weight():
    dense = dense_linear(30, 20, True, seed=0, weight=low_rank_matrix(20, 30, 4, seed=3))
    layer = LowRankLinear.from_dense(dense, 4)
    x = torch.randn(6, 30, dtype=F64, generator=generator(2))
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)


def test_hf_conv1d_is_transposed_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    dense = Conv1D(12, 20).double()  # nf=out 12, nx=in 20; weight (20, 12)
    layer = LowRankLinear.from_dense(dense, 12)  # full rank: exact
    x = torch.randn(3, 5, 20, dtype=F64, generator=generator(3))
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)
    back = layer.to_dense()
    assert type(back).__name__ == "Conv1D" and back.weight.shape == (20, 12)
    torch.testing.assert_close(back(x), dense(x), rtol=1e-10, atol=1e-10)


def test_config_rebuilds_the_structure_and_state_loads_bit_identically():
    layer = LowRankLinear.from_dense(dense_linear(16, 10, True, seed=0).float(), 4)
    empty = LowRankLinear(**layer.config())
    empty.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(7, 16)
    assert torch.equal(empty(x), layer(x))


def test_counts():
    layer = LowRankLinear(in_features=50, out_features=30, rank=6)
    assert layer.num_params == 6 * 50 + 30 * 6 + 30
    assert layer.flops((4, 8, 50)) == 32 * 6 * (50 + 30)
    assert LowRankLinear(50, 30, 6, bias=False).num_params == 6 * 80


def test_keeps_dtype_and_half_precision_runs():
    dense = nn.Linear(32, 16).to(torch.bfloat16)
    layer = LowRankLinear.from_dense(dense, 8)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert layer(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bad_input():
    with pytest.raises(ValueError, match="rank for a matrix of shape \\(10, 20\\) must be at most 10, got 11"):
        LowRankLinear.from_dense(nn.Linear(20, 10), 11)
    with pytest.raises(ValueError, match="at least 1, got 0"):
        LowRankLinear.from_dense(nn.Linear(20, 10), 0)
    with pytest.raises(TypeError, match="Conv2d"):
        LowRankLinear.from_dense(nn.Conv2d(3, 3, 3), 2)


# ----------------------------------------------------------------------------- embedding


@pytest.mark.parametrize("padding_idx", [None, 0, 7])
def test_embedding_forward_equals_dense_lookup(padding_idx):
    torch.manual_seed(0)
    dense = nn.Embedding(40, 12, padding_idx=padding_idx, dtype=F64)
    layer = LowRankEmbedding.from_dense(dense, 5)
    idx = torch.randint(0, 40, (3, 9), generator=generator(4))
    back = layer.to_dense()
    torch.testing.assert_close(layer(idx), back(idx), rtol=1e-12, atol=1e-12)
    if padding_idx is not None:
        assert torch.equal(layer(torch.tensor([padding_idx])), torch.zeros(1, 12, dtype=F64))
        layer(torch.tensor([padding_idx, 1])).sum().backward()
        assert torch.equal(layer.table.grad[padding_idx], torch.zeros(5, dtype=F64))


def test_embedding_full_rank_is_exact_and_error_is_optimal():
    torch.manual_seed(1)
    dense = nn.Embedding(30, 8, dtype=F64)
    idx = torch.arange(30)
    torch.testing.assert_close(LowRankEmbedding.from_dense(dense, 8)(idx), dense(idx), rtol=1e-10, atol=1e-10)
    layer = LowRankEmbedding.from_dense(dense, 3)
    error = torch.linalg.vector_norm(layer(idx) - dense.weight) / torch.linalg.vector_norm(dense.weight)
    assert math.isclose(float(error), float(tail_errors(singular_values(dense.weight))[3]), rel_tol=1e-9)
    assert layer.num_params == 30 * 3 + 8 * 3
    empty = LowRankEmbedding(**layer.config(), dtype=F64)
    empty.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(empty(idx), layer(idx))


def test_embedding_with_max_norm_is_refused():
    with pytest.raises(ValueError, match="max_norm=1.0"):
        LowRankEmbedding.from_dense(nn.Embedding(10, 4, max_norm=1.0), 2)
