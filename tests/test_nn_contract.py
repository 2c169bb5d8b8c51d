"""The contract every registered factorized module keeps, whatever its method.

Parametrized over every ``(kind, method)`` of :data:`lowrank.nn.METHODS`, so a
module added to the registry later is checked without a new test. Each module
is built the way compression builds it (``method.from_dense(layer,
method.rank_for_budget(layer, budget))``) from a small float64 dense layer with
seeded random weights, and checked against references that do not come from
the module itself: a module rebuilt from its JSON config, the dense layer it
returns, torch's own FLOP counter, a record of every op its forward runs, a
hand count of its parameters, and a save/load through ``lowrank.save``.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import F64, generator, randn
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import lowrank
from lowrank.nn import METHODS, MODULES, DLRTLinear, FusedLowRankLinear

CASES = [(kind, name) for kind, methods in METHODS.items() for name in methods]
IDS = [f"{kind}-{name}" for kind, name in CASES]

# One small dense layer per layer kind (a kind added to METHODS needs an entry here; the tests say so).
DENSE_LAYERS = {
    "linear": lambda: nn.Linear(24, 36, dtype=F64),
    "conv": lambda: nn.Conv2d(8, 12, 3, padding=1, dtype=F64),
    "pointwise": lambda: nn.Conv2d(8, 12, 1, dtype=F64),
    "embedding": lambda: nn.Embedding(30, 12, dtype=F64),
}

# Per kind, input shapes: a small one, on which every activation of a forward holds fewer elements than the
# dense weight (864 for the linear and the 3x3 conv, 96 for the 1x1 conv, 360 for the embedding), and a
# larger one with more leading dimensions or positions.
INPUT_SHAPES = {
    "linear": [(2, 24), (3, 5, 24)],
    "conv": [(1, 8, 3, 3), (2, 8, 7, 5)],
    "pointwise": [(1, 8, 2, 3), (2, 8, 7, 5)],
    "embedding": [(2, 3), (4, 7)],
}


def dense_layer(kind: str, seed: int) -> nn.Module:
    """The dense layer of ``kind`` with every parameter drawn from a generator seeded with ``seed``."""
    assert kind in DENSE_LAYERS, f"no dense layer for the layer kind {kind!r} of METHODS: add one to DENSE_LAYERS"
    layer = DENSE_LAYERS[kind]()
    gen = generator(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(randn(*p.shape, gen=gen))
    return layer


def dense_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def budget_of(layer: nn.Module) -> int:
    """Half of the dense layer's parameters (weight and bias): a budget every method fits something into."""
    return dense_params(layer) // 2


def make_input(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = generator(seed)
    if kind == "embedding":
        return torch.randint(0, 30, shape, generator=gen)
    return randn(*shape, gen=gen)


@functools.cache
def factorized(kind: str, name: str) -> tuple[nn.Module, nn.Module]:
    """``(dense layer, its factorized module)`` as compression builds it, at half the dense parameters.

    Cached: the tests below only read the module (the search of ``"tn"`` and CP-ALS run once per case).
    """
    method = METHODS[kind][name]
    layer = dense_layer(kind, seed=0)
    rank = method.rank_for_budget(layer, budget_of(layer))
    assert rank is not None, f"{kind}/{name}: nothing fits half of the layer's {dense_params(layer)} parameters"
    return layer, method.from_dense(layer, rank)


class OutputSizes(TorchDispatchMode):
    """Records the number of elements of every tensor each ATen op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [(str(func), t.numel()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_every_module_class_is_reached_by_a_method():
    reached = {method.module for methods in METHODS.values() for method in methods.values()}
    # DLRTLinear is made by training (lowrank.train.DLRT), FusedLowRankLinear by fuse_shared_inputs from
    # LowRankLinear layers; neither by a compression method
    assert reached == set(MODULES.values()) - {DLRTLinear, FusedLowRankLinear}
    assert all(MODULES[cls.__name__] is cls for cls in reached)


@pytest.mark.parametrize(("kind", "name"), CASES, ids=IDS)
def test_config_round_trip_rebuilds_the_same_module(kind, name):
    _, module = factorized(kind, name)
    config = json.loads(json.dumps(module.config()))  # JSON-able, and rebuilt from what a saved plan holds
    rebuilt = type(module)(**config, dtype=F64)
    assert rebuilt.config() == module.config()
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    direct = type(module)(**module.config(), dtype=F64)
    direct.load_state_dict(module.state_dict(), strict=True)
    for shape in INPUT_SHAPES[kind]:
        x = make_input(kind, shape, seed=1)
        expected = module(x)
        assert torch.equal(rebuilt(x), expected) and torch.equal(direct(x), expected)


@pytest.mark.parametrize(("kind", "name"), CASES, ids=IDS)
def test_to_dense_is_the_forward_as_a_dense_layer(kind, name):
    layer, module = factorized(kind, name)
    dense = module.to_dense()
    assert type(dense) is type(layer) and dense.weight.shape == layer.weight.shape and dense.weight.dtype == F64
    with torch.no_grad():
        for shape in INPUT_SHAPES[kind]:
            x = make_input(kind, shape, seed=2)
            torch.testing.assert_close(dense(x), module(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(module.dense_weight(), dense.weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kind", "name"), CASES, ids=IDS)
def test_the_forward_never_builds_the_dense_weight(kind, name):
    layer, module = factorized(kind, name)
    size = layer.weight.numel()
    x = make_input(kind, INPUT_SHAPES[kind][0], seed=3)
    expected = module(x)
    assert x.numel() < size and expected.numel() < size  # the input and output are smaller than the weight
    recorder = OutputSizes()
    with recorder:
        module(x)
    assert recorder.sizes, "no op was recorded"
    largest = max(recorder.sizes, key=lambda item: item[1])
    assert largest[1] < size, f"{largest[0]} made a tensor of {largest[1]} elements (the dense weight has {size})"
    # the recorder does see a rebuilt weight
    with OutputSizes() as rebuild:
        module.dense_weight()
    assert max(n for _, n in rebuild.sizes) >= size


@pytest.mark.parametrize(("kind", "name"), CASES, ids=IDS)
def test_flops_are_the_multiply_accumulates_torch_counts(kind, name):
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate of the matmul (mm, addmm, bmm, baddbmm) and
    # convolution ops, and nothing for the rest: every registered module spends all its multiplications in
    # such ops (the conv modules in convolutions and the batched GEMMs of their 1x1 stages, the linear,
    # tensor-train and tensor-network ones in GEMMs), an embedding lookup is a gather (no MAC on either
    # side), and a bias is an addition (left out by both), so the counts are equal, not bounded
    _, module = factorized(kind, name)
    for shape in INPUT_SHAPES[kind]:
        x = make_input(kind, shape, seed=4)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        assert counter.get_total_flops() > 0
        assert 2 * module.flops(tuple(x.shape)) == counter.get_total_flops(), counter.get_flop_counts()


@pytest.mark.parametrize(("kind", "name"), CASES, ids=IDS)
def test_rank_for_budget_fits_the_budget(kind, name):
    layer, module = factorized(kind, name)
    budget = budget_of(layer)
    counted = sum(p.numel() for p in module.parameters())
    assert module.num_params == counted <= budget
    # the largest such rank: where the rank is one int the config holds, one more no longer fits (or is
    # beyond what the module or its decomposition accepts)
    method = METHODS[kind][name]
    rank = method.rank_for_budget(layer, budget)
    config = module.config()
    if isinstance(rank, int) and "rank" in config:
        try:
            bigger = type(module)(**{**config, "rank": rank + 1}, dtype=F64)
        except ValueError:
            return
        if bigger.num_params <= budget:
            try:
                method.from_dense(layer, rank + 1)
            except ValueError:
                return
            pytest.fail(f"rank {rank + 1} also fits the budget of {budget}: {bigger.num_params} parameters")


@pytest.mark.parametrize(("kind", "name"), CASES, ids=IDS)
def test_save_and_load_restore_the_module(kind, name, tmp_path):
    _, module = factorized(kind, name)
    model = nn.Sequential(module)
    lowrank.save(model, tmp_path / "out")
    fresh = nn.Sequential(dense_layer(kind, seed=99))  # a dense model of the same structure, other weights
    loaded = lowrank.load(tmp_path / "out", model=fresh)
    assert type(loaded[0]) is type(module) and loaded[0].config() == module.config()
    assert all(p.dtype == F64 for p in loaded.parameters())
    with torch.no_grad():
        for shape in INPUT_SHAPES[kind]:
            x = make_input(kind, shape, seed=5)
            assert torch.equal(loaded(x), model(x))


def rank_in_config(config: dict) -> int | tuple[int, ...]:
    """The rank a config holds: its ``rank`` (an int, or a list of bond ranks), its ``ranks``, or its bonds' ranks."""
    keys = [key for key in ("rank", "ranks", "bonds") if key in config]
    assert len(keys) == 1, f"expected one of rank, ranks, bonds in the config, got {sorted(config)}"
    value = config[keys[0]]
    if keys[0] == "bonds":
        return tuple(rank for _, _, rank in value)
    return value if isinstance(value, int) else tuple(value)


@pytest.mark.parametrize(("kind", "name"), CASES, ids=IDS)
def test_reported_rank_is_the_configs(kind, name):
    _, module = factorized(kind, name)
    rank = module.reported_rank

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    assert is_int(rank) or (isinstance(rank, tuple) and all(is_int(r) for r in rank)), repr(rank)
    assert rank == rank_in_config(module.config())
    assert min(rank if isinstance(rank, tuple) else (rank,)) >= 1


@pytest.mark.parametrize(("kind", "name"), CASES, ids=IDS)
def test_rank_policies_choose_ranks_the_module_takes(kind, name):
    layer = dense_layer(kind, seed=11)
    method = METHODS[kind][name]
    fraction = lowrank.rank.ParamFraction(0.5)
    # a ParamFraction is the budget of that fraction of the layer's parameters, bias included
    assert method.choose_rank(layer, fraction) == method.rank_for_budget(layer, dense_params(layer) // 2)
    matrices = method.module.rank_matrices(layer, **method.options)
    if method.budget_only:  # a searched structure: only budgets choose it
        with pytest.raises(ValueError, match="searches a structure within a parameter budget"):
            method.choose_rank(layer, lowrank.rank.FixedRank(2))
        return
    if not matrices:  # no matrix to read: fixed ranks apply, singular-value rules are refused by name
        with pytest.raises(ValueError, match=f"which method {name!r} has none of"):
            method.choose_rank(layer, lowrank.rank.Energy(0.9))
        policies = [lowrank.rank.FixedRank(2)]
    else:
        policies = [lowrank.rank.FixedRank(2), lowrank.rank.Energy(0.9), lowrank.rank.VBMF()]
    for policy in policies:
        rank = method.choose_rank(layer, policy)
        module = method.from_dense(layer, rank)  # the module takes every rank a policy chooses
        reported = module.reported_rank  # one int for every bond of a train
        assert reported == (rank if isinstance(rank, tuple) or isinstance(reported, int) else (rank,) * len(reported))
    for matrix in matrices:
        # the matrices' singular values are those of the weight's rearrangements: their energy is the weight's
        assert matrix.shape[0] * matrix.shape[1] == layer.weight.numel()
        torch.testing.assert_close(torch.linalg.matrix_norm(matrix.double()),
                                   torch.linalg.vector_norm(layer.weight.detach().double()))
    # Energy(1.0) keeps every (non-zero) singular value: the largest rank the matrices allow, which is the largest
    # the module takes (what an unlimited budget gives)
    if matrices:
        expected = tuple(min(m.shape) for m in matrices)
        expected = expected[0] if len(expected) == 1 else expected
        assert method.choose_rank(layer, lowrank.rank.Energy(1.0)) == expected == method.rank_for_budget(layer, 10**12)
