"""TTLinear: forward against the dense weight, exact round trips, counts, Conv1D, bad input."""

from __future__ import annotations

import itertools
import json
import math
import string

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import F64, generator, randn, tt_bond_bounds

from lowrank.decompose import TTMatrix
from lowrank.nn.tensorize import balanced_factorization
from lowrank.nn.tt import TTLinear


def dense_from_cores(cores: list[torch.Tensor]) -> torch.Tensor:
    """The ``(prod m, prod n)`` matrix of TT-matrix cores ``(r, m, n, r')``, by one einsum (no library code)."""
    d = len(cores)
    letters = iter(string.ascii_letters)
    ms, ns, bonds = (
        [next(letters) for _ in range(d)],
        [next(letters) for _ in range(d)],
        [next(letters) for _ in range(d + 1)],
    )
    terms = [bonds[k] + ms[k] + ns[k] + bonds[k + 1] for k in range(d)]
    full = torch.einsum(",".join(terms) + "->" + "".join(ms) + "".join(ns), *cores)
    return full.reshape(math.prod(c.shape[1] for c in cores), math.prod(c.shape[2] for c in cores))


def random_layer(seed: int) -> tuple[TTLinear, torch.Generator]:
    """A float64 TTLinear with random d in 2..4, mode sizes 1..5, ranks 1..6, with or without bias."""
    gen = generator(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    d = draw(2, 4)
    in_shape, out_shape = [draw(1, 5) for _ in range(d)], [draw(1, 5) for _ in range(d)]
    layer = TTLinear(in_shape, out_shape, [draw(1, 6) for _ in range(d - 1)], bias=seed % 2 == 0, dtype=F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(*p.shape, gen=gen))
    return layer, gen


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("batch_shape", [(), (7,), (3, 5), (2, 3, 4), (2, 0)])
def test_forward_equals_linear_with_dense_weight(seed, batch_shape):
    layer, gen = random_layer(seed)
    dense = layer.to_dense()
    assert isinstance(dense, torch.nn.Linear)
    assert torch.allclose(dense.weight, dense_from_cores(list(layer.cores)), rtol=1e-12, atol=1e-12)
    x = randn(*batch_shape, layer.in_features, gen=gen)
    out = layer(x)
    assert out.shape == (*batch_shape, layer.out_features) and out.dtype == F64
    expected = F.linear(x, dense.weight, dense.bias).detach()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert torch.allclose(out, expected, rtol=1e-11, atol=1e-11 * scale)


def test_every_batch_size_and_contraction_order_is_correct():
    # Small batches sweep the input through single cores; large ones merge cores first.
    layer = TTLinear((2, 3, 4, 2), (3, 2, 2, 4), (3, 5, 4), dtype=F64)
    gen = generator(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(*p.shape, gen=gen))
    weight = dense_from_cores(list(layer.cores))
    orders = set()
    for batch in (1, 2, 3, 17, 64, 300, 2048):
        groups, reverse = layer.contraction_order(batch)
        assert len(groups) >= 2 and sorted(itertools.chain(*groups)) == [0, 1, 2, 3]  # never the dense weight
        orders.add((groups, reverse))
        x = randn(batch, 48, gen=gen)
        assert torch.allclose(layer(x), F.linear(x, weight, layer.bias), rtol=1e-11, atol=1e-10)
    assert len(orders) >= 2


def test_backward_matches_dense_weight_gradients():
    layer, gen = random_layer(4)
    x = randn(6, layer.in_features, gen=gen)
    upstream = randn(6, layer.out_features, gen=gen)
    (layer(x) * upstream).sum().backward()
    cores = [core.detach().clone().requires_grad_(True) for core in layer.cores]
    (F.linear(x, dense_from_cores(cores), layer.bias.detach()) * upstream).sum().backward()
    for ours, reference in zip(layer.cores, cores):
        assert torch.allclose(ours.grad, reference.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("out_shape", "in_shape", "bias"),
    [((4, 5), (6, 3), True), ((2, 3, 4), (3, 2, 2), False), ((2, 2, 3, 2), (2, 3, 2, 2), True)],
)
def test_full_rank_from_dense_reproduces_the_layer(out_shape, in_shape, bias):
    gen = generator(2)
    linear = torch.nn.Linear(math.prod(in_shape), math.prod(out_shape), bias=bias, dtype=F64)
    with torch.no_grad():
        for p in linear.parameters():
            p.copy_(randn(*p.shape, gen=gen))
    full = tt_bond_bounds([m * n for m, n in zip(out_shape, in_shape)])
    layer = TTLinear.from_dense(linear, full, out_shape=out_shape, in_shape=in_shape)
    assert layer.ranks == (1, *full, 1) and layer.out_shape == out_shape and layer.in_shape == in_shape
    x = randn(3, 4, linear.in_features, gen=gen)
    assert torch.allclose(layer(x), linear(x), rtol=1e-10, atol=1e-10)
    assert torch.allclose(layer.to_dense().weight, linear.weight, rtol=1e-10, atol=1e-10)
    assert (layer.bias is None) == (linear.bias is None)


def test_from_dense_balances_the_shapes_when_not_given():
    linear = torch.nn.Linear(24, 36, dtype=F64)
    layer = TTLinear.from_dense(linear, rank=50, clip=True)
    assert layer.out_shape == (3, 3, 4) and layer.in_shape == (2, 3, 4)
    assert TTLinear.from_dense(linear, in_shape=(4, 6), rank=2).out_shape == (6, 6)
    assert TTLinear.from_dense(linear, rank=2, d=2).in_shape == (4, 6)
    x = randn(5, 24, gen=generator(3))
    assert torch.allclose(layer(x), linear(x), rtol=1e-10, atol=1e-10)


def test_from_factorization_keeps_cores_bias_dtype():
    gen = generator(5)
    cores = tuple(randn(*shape, gen=gen, dtype=torch.float32) for shape in [(1, 3, 2, 4), (4, 5, 6, 1)])
    bias = randn(15, gen=gen, dtype=torch.float32)
    layer = TTLinear.from_factorization(TTMatrix(cores), bias)
    assert layer.out_shape == (3, 5) and layer.in_shape == (2, 6) and layer.weight_dtype == torch.float32
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(layer.cores, cores))
    x = randn(2, 12, gen=gen, dtype=torch.float32)
    out = layer(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, F.linear(x, dense_from_cores(list(cores)), bias), rtol=1e-5, atol=1e-5)
    assert TTLinear.from_factorization(TTMatrix(cores)).bias is None


@pytest.mark.parametrize("seed", [0, 1, 6])
def test_config_round_trip_is_bit_identical(seed):
    layer, gen = random_layer(seed)
    config = json.loads(json.dumps(layer.config()))
    rebuilt = TTLinear(**config, dtype=F64)
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = randn(4, 3, layer.in_features, gen=gen)
    assert torch.equal(rebuilt(x), layer(x))
    assert rebuilt.config() == layer.config() and rebuilt.num_params == layer.num_params


def test_num_params_and_flops_by_hand():
    layer = TTLinear((2, 3, 4), (4, 3, 2), (3, 5))
    # cores (1,4,2,3) + (3,3,3,5) + (5,2,4,1), bias 24
    assert layer.num_params == 24 + 135 + 40 + 24 == 223
    assert TTLinear((2, 3, 4), (4, 3, 2), (3, 5), bias=False).num_params == 199
    # batch 1, one core at a time from the right, the state growing outputs as it loses inputs:
    # core 3: (n1 n2) (r m n r') = 6 * 40; core 2: n1 m3 * 135 = 4 * 135; core 1: m2 m3 * 24 = 6 * 24
    assert layer.contraction_order(1) == (((0,), (1,), (2,)), True)
    assert layer.flops((24,)) == layer.flops((1, 24)) == 240 + 540 + 144
    # batch 10: cores 2 and 3 merged first (r1 m2 n2 r2 m3 n3 = 3*3*3*5*2*4), then per row
    # group (2,3): n1 * (3 * 6 * 12) and core 1: (m2 m3) * 24
    assert layer.contraction_order(10) == (((0,), (1, 2)), True)
    assert layer.flops((2, 5, 24)) == 1080 + 10 * (2 * 216 + 6 * 24)


def test_flops_two_cores_by_hand():
    # in (2, 8), out (8, 2), rank 3: from the right, core 2 costs n1 * (r m2 n2) and core 1 m2 * (m1 n1 r)
    # per row (64 + 16 elements written), against 256 * 3 MACs and 208 elements from the left.
    layer = TTLinear((2, 8), (8, 2), 3)
    assert layer.contraction_order(35) == (((0,), (1,)), True)
    assert layer.flops((5, 7, 16)) == 35 * (2 * 3 * 2 * 8 + 2 * 8 * 2 * 3) == 6720


def test_balanced_factorization_known_values():
    assert balanced_factorization(1024, 5) == (4, 4, 4, 4, 4)
    assert balanced_factorization(1024, 3) == (8, 8, 16)
    assert balanced_factorization(768, 3) == (8, 8, 12)
    assert balanced_factorization(3072, 3) == (12, 16, 16)
    assert balanced_factorization(97, 3) == (1, 1, 97)
    assert balanced_factorization(1, 3) == (1, 1, 1)
    assert balanced_factorization(12, 1) == (12,)


def test_balanced_factorization_is_the_most_even_split():
    for n, d in itertools.product(range(1, 130), range(1, 5)):
        factors = balanced_factorization(n, d)
        assert len(factors) == d and math.prod(factors) == n and list(factors) == sorted(factors)
        divisors = [k for k in range(1, n + 1) if n % k == 0]
        splits = [s for s in itertools.product(divisors, repeat=d) if math.prod(s) == n]
        assert sorted(factors, reverse=True) == min(sorted(s, reverse=True) for s in splits), (n, d)


def test_rank_for_budget_is_the_largest_rank_that_fits():
    linear = torch.nn.Linear(768, 3072)
    # shapes (12,16,16) x (8,8,12): paired sizes 96, 128, 192, so r cores hold 288 r + 128 r^2 parameters
    budget = 3072 + 288 * 29 + 128 * 29**2 + 100  # the bias, rank 29's cores, and less than rank 30 needs more
    rank = TTLinear.rank_for_budget(linear, budget)
    assert rank == 29 and budget < 3072 + 288 * 30 + 128 * 30**2
    assert TTLinear.from_dense(linear, rank).num_params == 3072 + 288 * 29 + 128 * 29**2 <= budget
    assert TTLinear.rank_for_budget(linear, 10**9) == 96  # the first bond's bound, min(96, 128 * 192)
    assert TTLinear.rank_for_budget(linear, 3072 + 288 + 127) is None  # rank 1 needs 288 + 128
    assert TTLinear.rank_for_budget(linear, 3072 + 288 + 128) == 1
    # two cores: shapes (48, 64) x (24, 32), paired sizes 1152 and 2048, so r cores hold 3200 r parameters
    assert TTLinear.rank_for_budget(linear, 3072 + 2 * 3200 + 100, d=2) == 2


def test_hf_conv1d():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    conv = pytorch_utils.Conv1D(12, 8).to(F64)  # nf=12 outputs, nx=8 inputs, weight stored (8, 12)
    gen = generator(7)
    with torch.no_grad():
        conv.weight.copy_(randn(8, 12, gen=gen))
        conv.bias.copy_(randn(12, gen=gen))
    layer = TTLinear.from_dense(conv, 6, out_shape=(3, 4), in_shape=(2, 4))  # full: paired sizes (6, 16)
    assert layer.out_features == 12 and layer.in_features == 8 and layer.config()["dense_type"] == "Conv1D"
    x = randn(2, 5, 8, gen=gen)
    assert torch.allclose(layer(x), conv(x), rtol=1e-10, atol=1e-10)
    dense = layer.to_dense()
    assert type(dense) is pytorch_utils.Conv1D
    assert torch.allclose(dense.weight, conv.weight, atol=1e-10) and torch.equal(dense.bias, conv.bias)


def test_bad_input_names_the_value():
    linear = torch.nn.Linear(24, 36)
    with pytest.raises(ValueError, match=r"out_shape \(4, 8\) multiplies to 32.*out_features=36"):
        TTLinear.from_dense(linear, 2, out_shape=(4, 8), in_shape=(4, 6))
    with pytest.raises(ValueError, match=r"in_shape \(5, 5\) multiplies to 25.*in_features=24"):
        TTLinear.from_dense(linear, 2, out_shape=(6, 6), in_shape=(5, 5))
    with pytest.raises(ValueError, match="d=2"):
        TTLinear.from_dense(linear, 2, out_shape=(6, 6), in_shape=(2, 3, 4))
    with pytest.raises(ValueError, match="got 0"):
        TTLinear.from_dense(linear, 0, out_shape=(6, 6), in_shape=(4, 6))
    with pytest.raises(ValueError, match="rank for bond 2 must be at least 1, got 0"):
        TTLinear((2, 3, 4), (4, 3, 2), (3, 0))
    with pytest.raises(ValueError, match="got 0"):
        TTLinear((2, 3), (3, 2), 0)
    with pytest.raises(ValueError, match=r"rank must be an int or a sequence of 1 ints, got 2 values: \[2, 2\]"):
        TTLinear((2, 3), (3, 2), [2, 2])
    with pytest.raises(ValueError, match=r"in_shape must be .* got \(0, 3\)"):
        TTLinear((0, 3), (3, 2), 2)
    with pytest.raises(ValueError, match="same length"):
        TTLinear((2, 3), (3, 2, 1), 2)
    with pytest.raises(ValueError, match="dense_type"):
        TTLinear((2, 3), (3, 2), 2, dense_type="Conv2d")
    with pytest.raises(ValueError, match=r"in_features=6, got \(4, 5\)"):
        TTLinear((2, 3), (3, 2), 2).flops((4, 5))
    for n, d, message in [
        (0, 2, "n must be an int >= 1, got 0"),
        (12, 0, "d must be an int >= 1, got 0"),
        (12.0, 2, "n must be an int >= 1, got 12.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            balanced_factorization(n, d)
