"""TNLinear: forward against the dense weight, tensorisation, searched layers, compress/save/load with method "tn"."""

from __future__ import annotations

import functools
import itertools
import math
import string

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import F64, generator, randn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lowrank
from lowrank.nn import TNLinear
from lowrank.nn.tensorize import tensorize_weight


def dense_from_network(layer: TNLinear) -> torch.Tensor:
    """The ``(out, in)`` weight of a TNLinear by one einsum with independently chosen letters."""
    d, n = len(layer.in_shape), len(layer.cores)  # cores d.. are internal: their own index (size 1) is summed
    letters = iter(string.ascii_letters)
    outs, ins, own = [next(letters) for _ in range(d)], [next(letters) for _ in range(d)], next(letters)
    bond = {}
    for i in range(n):
        for j in range(i + 1, n):
            bond[i, j] = bond[j, i] = next(letters)
    specs, operands = [], []
    for k, core in enumerate(layer.cores):
        if k >= d:
            specs.append("".join(own if j == k else bond[k, j] for j in range(n)))
            operands.append(core)
            continue
        specs.append("".join(outs[k] + ins[k] if j == k else bond[k, j] for j in range(n)))
        operands.append(core.reshape(*core.shape[:k], layer.out_shape[k], layer.in_shape[k], *core.shape[k + 1:]))
    full = torch.einsum(",".join(specs) + "->" + "".join(outs) + "".join(ins), *operands)
    return full.reshape(layer.out_features, layer.in_features)


def random_layer(bonds, seed, bias=True) -> TNLinear:
    layer = TNLinear((3, 4, 2), (2, 3, 4), bonds, bias=bias, dtype=F64)
    gen = generator(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(*p.shape, gen=gen))
    return layer


@pytest.mark.parametrize("bonds", [[(0, 1, 2), (1, 2, 3)], [(0, 1, 2), (1, 2, 3), (0, 2, 2)], [], [(0, 2, 4)]])
@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 3)])
def test_forward_equals_the_dense_layer(bonds, batch_shape):
    layer = random_layer(bonds, seed=len(bonds), bias=bool(batch_shape))
    weight = dense_from_network(layer)
    torch.testing.assert_close(layer.weight, weight, rtol=1e-12, atol=1e-12)
    x = randn(*batch_shape, layer.in_features, gen=generator(1))
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-10, atol=1e-10)
    dense = layer.to_dense()
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-10, atol=1e-10)
    rebuilt = TNLinear(**layer.config(), dtype=F64)
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(rebuilt(x), layer(x))
    torch.testing.assert_close(rebuilt(x), F.linear(x, weight, layer.bias), rtol=1e-10, atol=1e-10)


TUCKER_BONDS = [(0, 3, 2), (1, 3, 3), (2, 3, 2)]  # every mode joined to one internal core


def test_a_layer_with_an_internal_core_equals_its_dense_weight():
    layer = TNLinear((3, 4, 2), (2, 3, 4), TUCKER_BONDS, dtype=F64, n_internal=1)
    gen = generator(5)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(*p.shape, gen=gen))
    weight = dense_from_network(layer)
    torch.testing.assert_close(layer.weight, weight, rtol=1e-12, atol=1e-12)
    x = randn(5, layer.in_features, gen=generator(6))
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-10, atol=1e-10)
    assert layer.network.n_internal == 1 and layer.num_params == 6 * 2 + 12 * 3 + 8 * 2 + 2 * 3 * 2 + 24
    rebuilt = TNLinear(**layer.config(), dtype=F64)
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    assert rebuilt.n_internal == 1 and torch.equal(rebuilt(x), layer(x))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x)
    assert 2 * layer.flops((5, 24)) == counter.get_total_flops()  # 2 FLOPs per multiply-accumulate of a GEMM
    with pytest.raises(ValueError, match="n_internal must be an int >= 0"):
        TNLinear((3, 4, 2), (2, 3, 4), TUCKER_BONDS, n_internal=-1)


def test_a_planted_tucker_weight_is_found_with_its_internal_core():
    # four paired modes (6, 4, 4, 6) of Tucker ranks 2: 56 core parameters, where a train needs 88
    shapes = {"in_shape": (2, 2, 2, 3), "out_shape": (3, 2, 2, 2)}
    planted = TNLinear(**shapes, bonds=[(k, 4, 2) for k in range(4)], dtype=F64, n_internal=1)
    gen = generator(7)
    with torch.no_grad():
        for p in planted.parameters():
            p.copy_(randn(*p.shape, gen=gen))
    dense = nn.Linear(24, 24, dtype=F64)
    with torch.no_grad():
        dense.weight.copy_(planted.weight)
    layer = TNLinear.from_dense(dense, tol=1e-6, **shapes)
    with torch.no_grad():
        assert float(torch.linalg.norm(layer.weight - dense.weight) / torch.linalg.norm(dense.weight)) < 1e-6
        x = randn(3, 24, gen=generator(8))
        torch.testing.assert_close(layer(x), dense(x))
    assert layer.n_internal == 1 and layer.num_params <= planted.num_params


def test_tensorisation_pairs_output_and_input_factors():
    weight = torch.arange(24.0 * 24).reshape(24, 24)  # out (2, 3, 4), in (3, 4, 2)
    tensor = tensorize_weight(weight, (2, 3, 4), (3, 4, 2))
    assert tensor.shape == (6, 12, 8)
    o, i = (1, 2, 3), (2, 1, 0)
    row, col = (o[0] * 3 + o[1]) * 4 + o[2], (i[0] * 4 + i[1]) * 2 + i[2]
    assert tensor[o[0] * 3 + i[0], o[1] * 4 + i[1], o[2] * 2 + i[2]] == weight[row, col]


def cheapest_contraction_macs(operands: list[dict[str, int]], output: set[str]) -> int:
    """The fewest multiply-accumulates of any order of pairwise contractions of ``operands`` (index -> size).

    Brute force over every pair at every step: contracting two operands costs the product of the sizes of all
    their indices, and keeps the indices that another operand or the output still holds.
    """

    @functools.cache
    def best(state: frozenset) -> int:
        if len(state) == 1:
            return 0
        items = list(state)
        costs = []
        for a, b in itertools.combinations(range(len(items)), 2):
            merged = dict(items[a]) | dict(items[b])
            rest = [items[k] for k in range(len(items)) if k not in (a, b)]
            kept = {i for item in rest for i, _ in item} | output
            result = frozenset((i, n) for i, n in merged.items() if i in kept)
            costs.append(math.prod(merged.values()) + best(frozenset([*rest, result])))
        return min(costs)

    return best(frozenset(frozenset(op.items()) for op in operands))


def test_flops_follow_the_contraction_path():
    chain = random_layer([(0, 1, 2), (1, 2, 3)], seed=0)
    # the chain's indices, named here: input x (b, i0, i1, i2) of sizes (batch, 3, 4, 2); core k pairs output
    # o_k of (2, 3, 4) with input i_k; bonds c0-c1 of rank 2 (p) and c1-c2 of rank 3 (q)
    cores = [{"o0": 2, "i0": 3, "p": 2}, {"p": 2, "o1": 3, "i1": 4, "q": 3}, {"q": 3, "o2": 4, "i2": 2}]
    for batch_shape in [(1,), (4,), (2, 3), (64,)]:
        rows = math.prod(batch_shape)
        x_indices = {"b": rows, "i0": 3, "i1": 4, "i2": 2}
        reference = cheapest_contraction_macs([x_indices, *cores], {"b", "o0", "o1", "o2"})
        x = randn(*batch_shape, 24, gen=generator(2))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            chain(x)
        # FlopCounterMode counts 2 per multiply-accumulate of the GEMMs the forward runs (the bias add: none)
        assert chain.flops((*batch_shape, 24)) == reference == counter.get_total_flops() // 2
    # one row: x with c0 (96 MACs), then c1 (288), then c2 (144), below the dense layer's 24 * 24
    assert chain.flops((1, 24)) == 96 + 288 + 144
    assert chain.flops((4, 24)) <= 4 * chain.flops((1, 24))
    with pytest.raises(ValueError, match="input_shape must end in in_features=24"):
        chain.flops((1, 25))


def test_a_planted_chain_weight_is_found_and_stays_cheap():
    planted = random_layer([(0, 1, 2), (1, 2, 2)], seed=3)
    dense = nn.Linear(24, 24, dtype=F64)
    with torch.no_grad():
        dense.weight.copy_(planted.weight)
    layer = TNLinear.from_dense(dense, out_shape=(2, 3, 4), in_shape=(3, 4, 2), tol=1e-6)
    with torch.no_grad():
        assert float(torch.linalg.norm(layer.weight - dense.weight) / torch.linalg.norm(dense.weight)) < 1e-6
    assert layer.num_params <= planted.num_params
    torch.testing.assert_close(layer.bias, dense.bias)


def test_bad_input():
    with pytest.raises(ValueError, match=r"bond \(0, 3, 2\) must join two different cores among 3"):
        TNLinear((3, 4, 2), (2, 3, 4), [(0, 3, 2)])
    with pytest.raises(ValueError, match="must join two different cores among 3 once"):
        TNLinear((3, 4, 2), (2, 3, 4), [(0, 1, 2), (1, 0, 3)])
    with pytest.raises(ValueError, match="give rank= .* or tol="):
        TNLinear.from_dense(nn.Linear(24, 24))
    network = lowrank.decompose.TensorNetwork(tuple(random_layer([], 0).cores))
    with pytest.raises(ValueError, match=r"the network's shape \(6, 12, 8\) must be the paired sizes"):
        TNLinear.from_network(network, (3, 4, 2), (3, 4, 2))


def test_compress_save_and_load_with_method_tn(tmp_path):
    # a 64x64 weight that is a chain over (4, 4, 4) x (4, 4, 4): a budget of 10% holds it, and the chain
    # contracts with the input in fewer MACs than the dense layer, so it passes the break-even rule
    chain = TNLinear((4, 4, 4), (4, 4, 4), [(0, 1, 2), (1, 2, 2)], dtype=F64)
    with torch.no_grad():
        for core, seed in zip(chain.cores, range(3)):
            core.copy_(randn(*core.shape, gen=generator(seed)))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight.copy_(chain.weight.float())
    report = lowrank.compress(model, ratio=0.1, method="tn", progress=False)
    assert isinstance(model[0], TNLinear)
    row = report.layers[0]
    assert row.method == "tn" and row.params_after <= 0.1 * row.params_before and row.relative_error < 1e-4
    assert row.rank == tuple(rank for _, _, rank in model[0].bonds)
    lowrank.save(model.eval(), tmp_path / "out", report=report)
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    reloaded = lowrank.load(tmp_path / "out", model=fresh)
    x = torch.randn(3, 64)
    assert torch.equal(reloaded(x), model(x))
    with pytest.raises(ValueError, match="method 'tn' searches a structure within a parameter budget"):
        lowrank.compress(nn.Sequential(nn.Linear(24, 24)), rank=4, method="tn", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_run_on_cuda():
    layer = TNLinear((3, 4, 2), (2, 3, 4), TUCKER_BONDS, n_internal=1, device="cuda")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(7, 24, device="cuda")
    out = layer(x)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-4, atol=1e-4)
    dense = nn.Linear(24, 24).cuda()
    searched = TNLinear.from_dense(dense, 300, out_shape=(2, 3, 4), in_shape=(3, 4, 2))
    assert searched.cores[0].device.type == "cuda" and searched(x).device.type == "cuda"
