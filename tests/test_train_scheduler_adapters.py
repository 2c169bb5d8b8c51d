"""The rank scheduler on adapters (AdaLoRA): one budget over LoRA components, masks, removal, saved ranks."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_train_scheduler import batches, train  # the same data and loop as the factorized-model tests
from torch import nn

from lowrank import adapters
from lowrank.adapters import FLoRA, LoRA
from lowrank.nn import LowRankLinear
from lowrank.nn.components import active_params
from lowrank.train import RankScheduler


class Net(nn.Module):
    """An embedding, a convolution (grouped or not) and two linear layers."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
        self.hidden = nn.Linear(256, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        image = self.embed(tokens).reshape(-1, 16, 4, 4)
        return self.head(torch.tanh(self.hidden(torch.relu(self.conv(image)).flatten(1))))


def adapted(groups: int = 2, embedding: bool = True, config: LoRA | FLoRA | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = Net(groups)
    kinds = ("linear", "conv", "embedding") if embedding else ("linear", "conv")
    adapters.add(model, config or LoRA(rank=6, alpha=12), kinds=kinds, include=["embed", "conv", "hidden"])
    return model


def adapter_size(model: nn.Module) -> int:
    return sum(p.numel() for layer in adapters.adapter_layers(model).values() for p in layer.adapter_parameters())


@pytest.mark.parametrize("groups", [1, 2])
def test_the_budget_holds_every_step_masked_components_stay_zero_and_finalize_keeps_the_outputs(groups: int) -> None:
    model = adapted(groups)
    start = adapter_size(model)
    optimizer = torch.optim.Adam(adapters.trainable_parameters(model), lr=1e-2)
    scheduler = RankScheduler(model, optimizer, ratio=0.4, total_steps=30, warmup_steps=5, final_steps=5,
                              kinds=("linear", "conv", "embedding"))
    assert set(scheduler.modules) == {"embed", "conv", "hidden"}
    assert scheduler.start_budget == start  # the adapters' own parameters, not their bases'
    assert scheduler.final_budget == int(0.4 * start)

    def check() -> None:
        assert scheduler.params() <= scheduler.budget_at(scheduler.step)
        for name, module in scheduler.modules.items():
            (axis,) = module.rank_axes()
            dropped = torch.nonzero(~scheduler.kept[name]["rank"]).flatten()
            for param, dim, grouped in axis.slices:
                index = axis.indices(dropped, getattr(module, "groups", 1), grouped)
                assert module.get_parameter(param).index_select(dim, index).abs().sum().item() == 0

    train(model, optimizer, batches(30), check)
    assert scheduler.params() <= scheduler.final_budget
    assert any(ranks["rank"] < 6 for ranks in scheduler.ranks.values())
    tokens = torch.randint(0, 40, (4, 16))
    model.eval()
    before = model(tokens)
    report = scheduler.finalize()
    after = model(tokens)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert adapter_size(model) == scheduler.params() <= scheduler.final_budget
    layers = adapters.adapter_layers(model)
    for row in report.layers:
        assert row.rank == layers[row.name].rank == scheduler.ranks[row.name]["rank"]
        assert row.params_before > row.params_after or row.rank == 6
    assert layers["conv"].lora_A.weight.shape[0] == groups * layers["conv"].rank
    assert layers["conv"].lora_B.weight.shape[1] == layers["conv"].rank
    assert not scheduler.attached
    # the bases are untouched and frozen; the smaller adapters still train
    assert all(not p.requires_grad for layer in layers.values() for p in layer.base_layer.parameters())
    nn.functional.cross_entropy(model(tokens), torch.zeros(4, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in adapters.trainable_parameters(model))


def finalized(groups: int, embedding: bool = True, config: LoRA | FLoRA | None = None) -> nn.Module:
    model = adapted(groups, embedding, config)
    optimizer = torch.optim.Adam(adapters.trainable_parameters(model), lr=1e-2)
    scheduler = RankScheduler(model, optimizer, ratio=0.5, total_steps=20, warmup_steps=2, final_steps=4,
                              kinds=("linear", "conv", "embedding"))
    train(model, optimizer, batches(20))
    scheduler.finalize()
    return model.eval()


def assert_reloads_the_same(model: nn.Module, directory: Path, base: Callable[[], nn.Module],
                            ranks: dict[str, int]) -> None:
    """The adapter saved in ``directory``, loaded into a fresh ``base()``, has ``ranks`` and ``model``'s outputs."""
    torch.manual_seed(0)
    fresh = base()
    adapters.load(fresh, directory)
    fresh.eval()
    assert {name: layer.rank for name, layer in adapters.adapter_layers(fresh).items()} == ranks
    tokens = torch.randint(0, 40, (4, 16))
    torch.testing.assert_close(fresh(tokens), model(tokens))


def test_chosen_ranks_save_and_load_in_lowrank_format(tmp_path: Path) -> None:
    model = finalized(2)
    ranks = {name: layer.rank for name, layer in adapters.adapter_layers(model).items()}
    assert len(set(ranks.values())) > 1 or min(ranks.values()) < 6
    out = adapters.save(model, tmp_path / "adapter")
    plan = json.loads((out / "lowrank_adapters.json").read_text())
    assert {name: entry["ranks"] for name, entry in plan["adapters"].items()} == {n: [r] for n, r in ranks.items()}
    assert_reloads_the_same(model, out, lambda: Net(2), ranks)


def test_chosen_ranks_save_and_load_in_peft_format_with_a_rank_pattern(tmp_path: Path) -> None:
    model = finalized(1, embedding=False)
    ranks = {name: layer.rank for name, layer in adapters.adapter_layers(model).items()}
    out = adapters.save(model, tmp_path / "peft", format="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # the ranks differ
    for name, rank in ranks.items():
        assert config["rank_pattern"].get(name, config["r"]) == rank
    assert_reloads_the_same(model, out, lambda: Net(1), ranks)


def test_flora_adapters_shrink_per_mode_and_reload(tmp_path: Path) -> None:
    model = finalized(2, embedding=False, config=FLoRA(rank=4))
    layers = adapters.adapter_layers(model)
    assert any(layer.ranks != (4, 4) and layer.ranks != (4, 4, 3, 3) for layer in layers.values())
    out = adapters.save(model, tmp_path / "flora")
    torch.manual_seed(0)
    fresh = Net(2)
    adapters.load(fresh, out)
    fresh.eval()
    tokens = torch.randint(0, 40, (4, 16))
    torch.testing.assert_close(fresh(tokens), model(tokens))


def test_adapters_on_factorized_bases_and_plain_factorized_modules_share_one_budget() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear.from_dense(nn.Linear(32, 32), 8), nn.Tanh(),
                          LowRankLinear.from_dense(nn.Linear(32, 10), 8))
    adapters.add(model, LoRA(rank=4), include=["0"])
    model[2].requires_grad_(True)  # add froze it
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = RankScheduler(model, optimizer, ratio=0.5, total_steps=10, warmup_steps=1, final_steps=2)
    assert set(scheduler.modules) == {"0", "2"}  # the adapter, not its frozen base; the plain module
    dense = 32 * 10 + 10
    assert scheduler.final_budget == int(0.5 * (dense + active_params(scheduler.modules["0"], {})))
    data = [torch.randn(8, 32) for _ in range(10)]
    for x in data:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert scheduler.params() <= scheduler.budget_at(scheduler.step)
    x = torch.randn(4, 32)
    before = model(x)
    scheduler.finalize()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_keep_components_leaves_the_layer_and_refuses_bad_requests() -> None:
    model = adapted(2)
    layer = adapters.adapter_layers(model)["conv"]
    original = copy.deepcopy(layer.state_dict())
    smaller = layer.keep_components({"rank": torch.tensor([0, 3])})
    assert smaller.rank == 2 and layer.rank == 6 and smaller.base_layer is layer.base_layer
    assert all(torch.equal(value, layer.state_dict()[key]) for key, value in original.items())
    with pytest.raises(ValueError, match="keep at least one component"):
        layer.keep_components({"rank": torch.tensor([], dtype=torch.long)})
    with pytest.raises(ValueError, match="has rank axes"):
        layer.keep_components({"r_in": torch.tensor([0])})


def test_the_targets_choose_adapters_by_name_and_base_kind() -> None:
    model = adapted(2)
    optimizer = torch.optim.SGD(adapters.trainable_parameters(model), lr=0.1)
    assert set(RankScheduler(model, optimizer, kinds=("conv",)).modules) == {"conv"}
    assert set(RankScheduler(model, optimizer, kinds=("linear", "conv", "embedding")).modules) == {
        "embed", "conv", "hidden"}
    assert set(RankScheduler(model, optimizer, exclude=["conv"]).modules) == {"hidden"}
    chosen = RankScheduler(model, optimizer, filter_fn=lambda name, module: isinstance(module, adapters.LoRALinear))
    assert set(chosen.modules) == {"hidden"}
