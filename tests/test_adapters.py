"""lowrank.adapters: one common tester over every adapter kind x every layer kind, PEFT parity, bad input.

References are computed here, independently of the library: the update ``ΔW`` from the
adapter's factors by plain einsums and loops, and the dense reference layer is a copy of
the base layer holding ``W + ΔW`` (PyTorch's own convolution applies the options).
"""

from __future__ import annotations

import copy
import string
from collections.abc import Callable
from dataclasses import dataclass

import peft  # in the test extra: a missing one fails the suite rather than skipping the comparisons
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from transformers.pytorch_utils import Conv1D

import lowrank.adapters as adapters
from lowrank.adapters import FLoRA, LoRA
from lowrank.adapters.layers import adapter_class
from lowrank.nn import CPConv, DLRTLinear, LowRankEmbedding, LowRankLinear, SVDConv, TTLinear, Tucker2Conv
from lowrank.nn.base import UnsupportedLayerError


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class Net(nn.Module):
    """The layer under test and one more trainable parameter that adapters must leave alone."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * self.gain


@dataclass
class Case:
    name: str
    config: LoRA | FLoRA
    layer: Callable[[], nn.Module]
    shape: tuple[int, ...]  # the input's shape (for an embedding, indices below shape[-1])
    kind: str
    embedding: bool = False

    def build(self, dtype: torch.dtype = torch.float32) -> Net:
        torch.manual_seed(0)
        return Net(self.layer()).to(dtype)

    def input(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        if self.embedding:
            return torch.randint(0, self.shape[-1], self.shape[:-1], generator=gen)
        return torch.randn(*self.shape, generator=gen).to(dtype)


LORA, FLORA = LoRA(rank=2, alpha=4), FLoRA(rank=3, alpha=6)
CONVS = {
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3), (2, 4, 7, 7)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 6, 6)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4), (2, 4, 6, 6)),
    "conv2d-dilated-strided": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (2, 4, 9, 8)),
    "conv2d-same-reflect": (
        lambda: nn.Conv2d(4, 6, (3, 4), padding="same", dilation=(1, 2), padding_mode="reflect"), (2, 4, 8, 9)),
    "conv3d-11k": (lambda: nn.Conv3d(4, 6, (1, 1, 3), padding=(0, 0, 1)), (2, 4, 3, 3, 5)),
}


def _lowrank_linear() -> nn.Module:
    return LowRankLinear.from_dense(nn.Linear(12, 10), rank=3)


CASES = [
    Case("lora-linear", LORA, lambda: nn.Linear(12, 10), (3, 5, 12), "linear"),
    Case("lora-hf-conv1d", LORA, lambda: Conv1D(10, 12), (3, 5, 12), "linear"),
    Case("lora-embedding", LORA, lambda: nn.Embedding(30, 8, padding_idx=0), (3, 5, 30), "embedding", True),
    *[Case(f"lora-{name}", LORA, make, shape, "conv") for name, (make, shape) in CONVS.items()],
    Case("lora-lowrank-linear", LORA, _lowrank_linear, (3, 5, 12), "linear"),
    Case("flora-linear", FLORA, lambda: nn.Linear(12, 10), (3, 5, 12), "linear"),
    Case("flora-hf-conv1d", FLORA, lambda: Conv1D(10, 12), (3, 5, 12), "linear"),
    *[Case(f"flora-{name}", FLORA, *CONVS[name], "conv")
      for name in ("conv2d", "conv2d-grouped", "conv2d-depthwise", "conv2d-same-reflect")],
    Case("flora-conv3d", FLORA, lambda: nn.Conv3d(4, 6, (2, 1, 3), padding=(1, 0, 1)), (2, 4, 3, 3, 5), "conv"),
    Case("flora-lowrank-linear", FLORA, _lowrank_linear, (3, 5, 12), "linear"),
]


def adapted(case: Case, dtype: torch.dtype = torch.float32, perturb: bool = True) -> Net:
    """The case's model with its adapter, every adapter parameter moved off its (often zero) init."""
    model = case.build(dtype)
    assert adapters.add(model, case.config, include="layer", kinds=(case.kind,)) == ["layer"]
    if perturb:
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in adapters.trainable_parameters(model):
                p.add_(0.3 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def reference_delta(layer: adapters.AdapterLayer) -> torch.Tensor:
    """ΔW from the adapter's factors, in the base layer's own layout, computed without the library."""
    s = layer.scaling
    base = layer.base_layer
    if isinstance(layer, adapters.LoRAEmbedding):
        return s * (layer.lora_embedding_B @ layer.lora_embedding_A).T
    if isinstance(layer, adapters.LoRALinear):
        delta = s * layer.lora_B.weight @ layer.lora_A.weight
        return delta.T if isinstance(base, Conv1D) else delta
    if isinstance(layer, adapters.LoRAConv):
        a, b, g, r = layer.lora_A.weight, layer.lora_B.weight, base.groups, layer.rank
        out = base.out_channels
        rows = [torch.einsum("r,r...->...", b[o].flatten(), a[(o // (out // g)) * r:(o // (out // g) + 1) * r])
                for o in range(out)]
        return s * torch.stack(rows)
    core, factors = layer.flora_core, list(layer.flora_factors)
    small, big = string.ascii_lowercase[:core.ndim], string.ascii_uppercase[:core.ndim]
    equation = small + "," + ",".join(f"{B}{a}" for a, B in zip(small, big)) + "->" + big
    delta = s * torch.einsum(equation, core, *factors)
    return delta.T if isinstance(base, Conv1D) else delta


def reference_output(layer: adapters.AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """The base layer's dense equivalent holding ``W + ΔW``, applied to ``x``."""
    dense = layer.base_layer.to_dense() if isinstance(layer.base_layer, LowRankLinear) else layer.base_layer
    dense = copy.deepcopy(dense)
    with torch.no_grad():
        dense.weight.add_(reference_delta(layer).to(dense.weight.dtype))
    return dense(x)


def base_state(layer: adapters.AdapterLayer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.base_layer.state_dict().items()}


@pytest.fixture(params=CASES, ids=[case.name for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


# ----------------------------------------------------------------------------- the common tester


def test_forward_is_base_plus_dense_reference(case: Case) -> None:
    model, x = adapted(case), case.input()
    layer = model.layer
    assert isinstance(layer, adapters.AdapterLayer)
    assert layer.delta_weight().shape == reference_delta(layer).shape
    assert rel(layer.delta_weight(), reference_delta(layer)) < 1e-6
    with torch.no_grad():
        assert rel(layer(x), reference_output(layer, x)) < 1e-5


def test_starts_unchanged(case: Case) -> None:
    model, x = case.build(), case.input()
    expected = model(x)
    adapters.add(model, case.config, include="layer", kinds=(case.kind,))
    assert torch.allclose(model(x), expected, rtol=1e-6, atol=1e-6)


def test_merge_matches_unmerged_and_unmerge_is_exact(case: Case) -> None:
    model, x = adapted(case), case.input()
    layer = model.layer
    with torch.no_grad():
        unmerged = model(x)
        before = base_state(layer)
        original = layer.base_layer
        assert adapters.merge(model) == ["layer"] and layer.merged
        assert rel(model(x), unmerged) < 1e-5
        assert adapters.merge(model) == []  # merged already: nothing to do
        assert adapters.unmerge(model) == ["layer"] and not layer.merged
        assert layer.base_layer is original
        after = base_state(layer)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(model(x), unmerged)


def test_only_adapter_parameters_train(case: Case) -> None:
    model, x = adapted(case), case.input()
    trainable = {id(p) for p in adapters.trainable_parameters(model)}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if id(p) not in trainable}
    assert frozen and "gain" in frozen
    assert all(not p.requires_grad for name, p in model.named_parameters() if name in frozen)
    start = [p.detach().clone() for p in adapters.trainable_parameters(model)]
    optimizer = torch.optim.Adam(adapters.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    named = dict(model.named_parameters())
    assert all(torch.equal(named[name], value) for name, value in frozen.items())
    assert all(not torch.equal(p, q) for p, q in zip(adapters.trainable_parameters(model), start))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_forward(case: Case, dtype: torch.dtype) -> None:
    model, x = adapted(case), case.input()
    with torch.no_grad():
        expected = model(x)
        tolerance = 2e-2 if dtype == torch.bfloat16 else 3e-3
        # a half-precision base: the adapter keeps float32 factors (as PEFT does)
        half_base = copy.deepcopy(model)
        half_base.layer.base_layer.to(dtype)
        half_base.gain.data = half_base.gain.data.to(dtype)
        out = half_base(case.input(dtype))
        assert out.dtype == dtype and rel(out, expected) < tolerance
        # everything in half precision
        out = copy.deepcopy(model).to(dtype)(case.input(dtype))
        assert out.dtype == dtype and rel(out, expected) < tolerance
        # adapting a half-precision model
        fresh = adapted(case, dtype)
        assert {p.dtype for p in adapters.trainable_parameters(fresh)} == {torch.float32}
        out = fresh(case.input(dtype))
        assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_disabled_gives_base_outputs(case: Case) -> None:
    model, x = case.build(), case.input()
    with torch.no_grad():
        base = model(x)
        adapters.add(model, case.config, include="layer", kinds=(case.kind,))
        for p in adapters.trainable_parameters(model):
            p.add_(0.5)
        adapted_out = model(x)
        assert rel(adapted_out, base) > 1e-3
        with adapters.disabled(model):
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), adapted_out)
        adapters.merge(model)
        merged = model(x)
        with adapters.disabled(model):
            assert not model.layer.merged
            assert torch.equal(model(x), base)
        assert model.layer.merged and torch.equal(model(x), merged)


def test_safe_merge_refuses_non_finite(case: Case) -> None:
    model = adapted(case)
    layer = model.layer
    with torch.no_grad():
        adapters.trainable_parameters(model)[0].view(-1)[0] = float("nan")
        before, original = base_state(layer), layer.base_layer
        with pytest.raises(ValueError, match="non-finite"):
            adapters.merge(model, safe=True)
        assert not layer.merged and layer.base_layer is original
        after = base_state(layer)
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_merge_and_unload_leaves_plain_layers(case: Case) -> None:
    model, x = adapted(case), case.input()
    base_type = type(model.layer.base_layer)
    with torch.no_grad():
        expected = model(x)
        assert adapters.merge_and_unload(model) is model
        assert type(model.layer) is base_type
        assert not adapters.adapter_layers(model)
        assert rel(model(x), expected) < 1e-5


# ----------------------------------------------------------------------------- more than one layer


def test_safe_merge_rolls_back_every_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    adapters.add(model, LoRA(rank=2))
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.add_(0.1)
        model[2].lora_B.weight[0, 0] = float("inf")
        weights = [model[0].base_layer.weight.clone(), model[2].base_layer.weight.clone()]
        with pytest.raises(ValueError, match="'2'"):
            adapters.merge(model, safe=True)
    assert not model[0].merged and not model[2].merged
    assert torch.equal(model[0].base_layer.weight, weights[0]) and torch.equal(model[2].base_layer.weight, weights[1])


def test_add_returns_names_and_targets_like_compress() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.conv = nn.Conv1d(8, 8, 3)

    model = nn.ModuleDict({"a": Attention(), "b": Attention()})
    assert adapters.add(model, LoRA(rank=2, alpha=16), include=["*query", "*value"]) == [
        "a.query", "a.value", "b.query", "b.value"]
    assert list(adapters.adapter_layers(model)) == ["a.query", "a.value", "b.query", "b.value"]
    assert adapters.add(model, FLoRA(rank=2), kinds=("conv",)) == ["a.conv", "b.conv"]
    assert adapters.add(model, LoRA(rank=2), include="*key", filter_fn=lambda n, m: n.startswith("a")) == ["a.key"]
    assert all(p.requires_grad is False for n, p in model.named_parameters() if "base_layer" in n)


def test_output_heads_are_skipped() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.proj, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

    model = LM()
    assert adapters.add(model, LoRA(rank=2)) == ["proj"]
    with pytest.raises(ValueError, match="only output heads"):
        adapters.add(LM(), LoRA(rank=2), include="head")


def test_pissa_starts_unchanged_with_the_principal_part() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Conv2d(4, 6, 3, groups=2), nn.Embedding(15, 9), Conv1D(10, 12))
    inputs = [torch.randn(3, 12), torch.randn(2, 4, 5, 5), torch.tensor([[1, 4, 7]]), torch.randn(3, 12)]
    before = [layer(x) for layer, x in zip(model, inputs)]
    weights = [layer.weight.detach().clone() for layer in model]
    config = LoRA(rank=2, alpha=4, init="pissa")
    adapters.add(model, config, kinds=("linear", "conv", "embedding"))
    for layer, x, y, weight in zip(model, inputs, before, weights):
        assert rel(layer(x), y) < 1e-5
        delta = reference_delta(layer)
        assert rel(layer.base_layer.weight + delta, weight) < 1e-6
        # the adapter holds the top-2 singular part of each (group's) weight matrix
        if isinstance(layer, adapters.LoRAConv):
            matrices, deltas = weight.reshape(2, 3, -1), delta.reshape(2, 3, -1)
        else:
            matrices, deltas = weight[None], delta[None]
        for matrix, part in zip(matrices, deltas):
            u, s, vh = torch.linalg.svd(matrix.double())
            assert rel(part, (u[:, :2] * s[:2]) @ vh[:2]) < 1e-5


def test_init_and_scaling_options() -> None:
    torch.manual_seed(0)
    layer = adapters.LoRALinear(nn.Linear(400, 300), LoRA(rank=16, alpha=8, init="gaussian", rslora=True))
    assert layer.scaling == pytest.approx(2.0)
    assert abs(layer.lora_A.weight.std().item() - 1 / 16) < 5e-3 and not layer.lora_B.weight.any()
    bound = 1 / 400**0.5  # kaiming_uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    default = adapters.LoRALinear(nn.Linear(400, 300), LoRA(rank=16))
    assert default.lora_A.weight.abs().max() <= bound and default.lora_A.weight.abs().max() > 0.9 * bound
    flora = adapters.FLoRAConv(nn.Conv2d(8, 16, 3), FLoRA(rank=(4, 4, 2, 3), alpha=8))
    assert flora.ranks == (4, 4, 2, 3) and flora.scaling == 2.0 and not flora.flora_core.any()
    for factor in flora.flora_factors:  # orthonormal columns
        assert torch.allclose(factor.T @ factor, torch.eye(factor.shape[1]), atol=1e-5)
    assert adapters.FLoRAConv(nn.Conv2d(8, 16, 3, groups=8), FLoRA(rank=4)).ranks == (4, 1, 3, 3)
    dropout = adapters.LoRALinear(nn.Linear(8, 8), LoRA(rank=2, dropout=0.5))
    assert isinstance(dropout.lora_dropout, nn.Dropout) and dropout.lora_dropout.p == 0.5


def test_lowrank_linear_merges_into_a_wider_one() -> None:
    model = Net(_lowrank_linear())
    adapters.add(model, LoRA(rank=2))
    original = model.layer.base_layer
    with torch.no_grad():
        model.layer.lora_B.weight.normal_()
        adapters.merge(model)
    merged = model.layer.base_layer
    assert type(merged) is LowRankLinear and merged.rank == 5 and merged is not original
    assert torch.equal(merged.first[:3], original.first) and torch.equal(merged.second[:, :3], original.second)
    adapters.unmerge(model)
    assert model.layer.base_layer is original


FACTORIZED = {
    "tucker2": (lambda: Tucker2Conv.from_dense(nn.Conv2d(4, 6, 3, padding=1), 2), (2, 4, 5, 5), "conv"),
    "svdconv": (lambda: SVDConv.from_dense(nn.Conv2d(4, 6, 3, stride=2), 2), (2, 4, 7, 7), "conv"),
    "cpconv": (lambda: CPConv.from_dense(nn.Conv2d(4, 6, 3, padding="same", padding_mode="circular"), 3),
               (2, 4, 5, 5), "conv"),
    "tt": (lambda: TTLinear.from_dense(nn.Linear(16, 12), 2), (3, 16), "linear"),
    "dlrt": (lambda: DLRTLinear.from_dense(nn.Linear(16, 12), 3), (3, 16), "linear"),
    "embedding": (lambda: LowRankEmbedding.from_dense(nn.Embedding(20, 8), 3), (3, 20), "embedding"),
}


@pytest.mark.parametrize("config", [LORA, FLORA], ids=["lora", "flora"])
@pytest.mark.parametrize("module", list(FACTORIZED), ids=list(FACTORIZED))
def test_adapters_train_on_top_of_factorized_modules(module: str, config: LoRA | FLoRA) -> None:
    make, shape, kind = FACTORIZED[module]
    case = Case(module, config, make, shape, kind, embedding=kind == "embedding")
    if kind == "embedding" and isinstance(config, FLoRA):
        with pytest.raises(UnsupportedLayerError, match="FLoRA does not adapt layer 'layer'"):
            adapted(case)
        return
    model, x = adapted(case), case.input()
    layer = model.layer
    with torch.no_grad():
        dense = layer.base_layer.to_dense()
        dense.weight.add_(reference_delta(layer))
        assert rel(layer(x), dense(x)) < 1e-5
        with pytest.raises(TypeError, match=type(layer.base_layer).__name__):
            adapters.merge(model)
        assert not layer.merged
    test_only_adapter_parameters_train(case)


# ----------------------------------------------------------------------------- PEFT parity

class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.query, self.value = nn.Linear(16, 16), nn.Linear(16, 16)
        self.proj = Conv1D(16, 16)
        self.conv = nn.Conv1d(16, 12, 3, padding=1)
        self.out = nn.Linear(12, 5)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        h = self.emb(i)
        h = self.proj(torch.relu(self.query(h) + self.value(h)))
        return self.out(self.conv(h.transpose(1, 2)).transpose(1, 2))


TARGETS = ["emb", "query", "value", "proj", "conv"]
PEFT_KEYS = {"lora_A.weight": "lora_A.default.weight", "lora_B.weight": "lora_B.default.weight",
             "lora_embedding_A": "lora_embedding_A.default", "lora_embedding_B": "lora_embedding_B.default"}


@pytest.mark.parametrize(("init", "rslora"), [(True, False), ("gaussian", True)], ids=["default", "gaussian-rslora"])
def test_same_seed_gives_peft_factors_and_outputs(init: bool | str, rslora: bool) -> None:
    """Bit-equal factors from the same seed (we draw them as PEFT does), then equal outputs."""
    torch.manual_seed(0)
    base = Small()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # PEFT's note about Conv1D
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(
            r=4, lora_alpha=16, target_modules=TARGETS, init_lora_weights=init, use_rslora=rslora))
    torch.manual_seed(1)
    config = LoRA(rank=4, alpha=16, init="default" if init is True else init, rslora=rslora)
    assert adapters.add(ours, config, include=TARGETS, kinds=("linear", "conv", "embedding")) == [
        "emb", "query", "value", "proj", "conv"]
    state = theirs.state_dict()
    gen = torch.Generator().manual_seed(3)
    for name in TARGETS:
        layer = getattr(ours, name)
        assert layer.scaling == theirs.base_model.model.get_submodule(name).scaling["default"]
        for key, p in layer.named_parameters():
            if key.startswith("base_layer"):
                continue
            peft_key = f"base_model.model.{name}.{PEFT_KEYS[key]}"
            assert torch.equal(p, state[peft_key]), peft_key
            with torch.no_grad():  # the same non-zero update in both
                noise = torch.randn(p.shape, generator=gen)
                p.add_(noise)
                theirs.get_parameter(peft_key).add_(noise)
    x = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        adapters.merge(ours)
        theirs.merge_adapter()
        assert rel(ours(x), theirs(x)) < 1e-6
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n.replace("base_model.model.", "").replace(".default", "") for n, p in theirs.named_parameters()
        if p.requires_grad}


def test_pissa_matches_peft() -> None:
    """PiSSA: PEFT uses LAPACK's SVD and we the library's, so the updates agree to rounding, not bits."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 6))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights="pissa"))
    ours = copy.deepcopy(base)
    adapters.add(ours, LoRA(rank=3, alpha=6, init="pissa"))
    for name in ("0", "2"):
        layer, their = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        assert rel(layer.delta_weight(), their.get_delta_weight("default")) < 1e-5
        assert rel(layer.base_layer.weight, their.base_layer.weight) < 1e-5
    x = torch.randn(4, 20)
    assert rel(ours(x), theirs(x)) < 1e-5 and rel(ours(x), base(x)) < 1e-5


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs", [
    {"rank": 0}, {"rank": 2.5}, {"rank": True}, {"alpha": 0}, {"alpha": float("nan")}, {"dropout": 1.0},
    {"dropout": -0.1}, {"init": "xavier"}, {"rslora": 1},
])
def test_bad_lora_config(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="LoRA"):
        LoRA(**kwargs)


@pytest.mark.parametrize("rank", [0, (2,), (2, 0), "8", 1.0])
def test_bad_flora_config(rank: object) -> None:
    with pytest.raises(ValueError, match="FLoRA.rank"):
        FLoRA(rank=rank)


def test_configs_to_dict() -> None:
    assert LoRA(rank=4, alpha=16).to_dict() == {
        "type": "LoRA", "rank": 4, "alpha": 16.0, "dropout": 0.0, "init": "default", "rslora": False}
    assert FLoRA(rank=(4, 2, 3, 3)).to_dict() == {"type": "FLoRA", "rank": [4, 2, 3, 3], "alpha": 8.0, "dropout": 0.0}


def test_rank_above_the_layer_names_it_and_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"layer '1' \(a Linear with weight shape \(3, 6\)\) must be at most 3"):
        adapters.add(model, LoRA(rank=4, init="pissa"))
    assert not adapters.adapter_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"per group.*groups=4\) must be at most 2"):
        adapters.add(nn.Sequential(nn.Conv2d(4, 8, 3, groups=4)), LoRA(rank=3), kinds=("conv",))
    with pytest.raises(ValueError, match=r"FLoRA gives|FLoRA.rank gives 2 ranks \[2, 2\] but layer '0'"):
        adapters.add(nn.Sequential(nn.Conv2d(4, 8, 3)), FLoRA(rank=(2, 2)), kinds=("conv",))
    with pytest.raises(ValueError, match=r"mode 2 \(size 3\) of layer '0'.*at most 3, got 4"):
        adapters.add(nn.Sequential(nn.Conv2d(4, 8, 3)), FLoRA(rank=(2, 2, 4, 2)), kinds=("conv",))


def test_unknown_and_unsupported_targets() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="no layer of the Sequential matches"):
        adapters.add(model, LoRA(rank=2), include="nope")
    with pytest.raises(UnsupportedLayerError, match="FLoRA does not adapt layer '1'"):
        adapters.add(model, FLoRA(rank=2), kinds=("embedding",))
    with pytest.raises(UnsupportedLayerError, match="max_norm"):
        adapters.add(nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)), LoRA(rank=2), kinds=("embedding",))
    attention = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)})
    with pytest.raises(UnsupportedLayerError, match="out_proj"):
        adapters.add(attention, LoRA(rank=2))
    with pytest.raises(UnsupportedLayerError, match="pissa"):
        adapters.add(nn.Sequential(_lowrank_linear()), LoRA(rank=2, init="pissa"))
    with pytest.raises(TypeError, match="LoRA or FLoRA"):
        adapters.add(model, {"rank": 2})
    with pytest.raises(TypeError, match="no adapter adapts"):
        adapter_class(LORA, nn.LayerNorm(4), "norm")
    with pytest.raises(ValueError, match="wrap it in a container"):
        adapters.add(nn.Linear(4, 4), LoRA(rank=2))
    assert not adapters.adapter_layers(model)


def test_adapting_twice_is_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    adapters.add(model, LoRA(rank=2), include="0")
    for kwargs in ({"include": "0"}, {}):
        with pytest.raises(ValueError, match="'0' carry an adapter already"):
            adapters.add(model, FLoRA(rank=2), **kwargs)
    assert adapters.add(model, FLoRA(rank=2), include="1") == ["1"]


def test_model_functions_need_adapters() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    for function in (adapters.merge, adapters.unmerge, adapters.merge_and_unload):
        with pytest.raises(ValueError, match="no adapter layers"):
            function(model)
    with pytest.raises(ValueError, match="no adapter layers"), adapters.disabled(model):
        pass
    adapters.add(model, LoRA(rank=2))
    with pytest.raises(ValueError, match="safe must be True or False"):
        adapters.merge(model, safe="yes")
    with adapters.disabled(model), pytest.raises(RuntimeError, match="disabled"):
        adapters.merge(model)


@pytest.mark.parametrize("config", [LoRA(rank=2, dropout=0.5), FLoRA(rank=2, dropout=0.5)], ids=["lora", "flora"])
def test_dropout_acts_in_training_only(config: LoRA | FLoRA) -> None:
    case = Case("dropout", config, CONVS["conv2d-grouped"][0], CONVS["conv2d-grouped"][1], "conv")
    model, x = adapted(case), case.input()
    layer = model.layer
    with torch.no_grad():
        model.eval()
        assert rel(layer(x), reference_output(layer, x)) < 1e-5
        model.train()
        assert rel(layer(x), reference_output(layer, x)) > 1e-3


def test_embedding_lookup_matches_dense_reference_with_padding() -> None:
    layer = adapters.LoRAEmbedding(nn.Embedding(12, 6, padding_idx=0), LoRA(rank=3))
    with torch.no_grad():
        layer.lora_embedding_A.normal_()
    x = torch.tensor([[0, 3, 11], [5, 5, 0]])
    weight = layer.base_layer.weight + reference_delta(layer)
    assert rel(layer(x), F.embedding(x, weight)) < 1e-6
