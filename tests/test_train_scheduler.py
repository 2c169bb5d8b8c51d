"""The rank scheduler: its budget at every step, AdaLoRA's scores, masks, resuming and finalizing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.nn import CPConv, LowRankEmbedding, LowRankLinear, SVDConv, TTLinear, Tucker2Conv
from lowrank.train import RankScheduler


class Mixed(nn.Module):
    """Every factorized module with a rank, in one small network."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = LowRankEmbedding.from_dense(nn.Embedding(40, 16), 8)
        self.tucker = Tucker2Conv.from_dense(nn.Conv2d(16, 12, 3, padding=1), (6, 4))
        self.cp = CPConv.from_dense(nn.Conv2d(12, 12, 3, padding=1), 8)
        self.svd = SVDConv.from_dense(nn.Conv2d(12, 8, 3, padding=1, groups=2), 4)
        self.head = LowRankLinear.from_dense(nn.Linear(8 * 16, 10), 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        image = self.embed(tokens).reshape(-1, 16, 4, 4)  # 16 tokens of 16 numbers as a 16-channel 4x4 image
        return self.head(self.svd(torch.relu(self.cp(torch.relu(self.tucker(image))))).flatten(1))


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 40, (8, 16), generator=generator), torch.randint(0, 10, (8,), generator=generator))
            for _ in range(steps)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data, each=None) -> None:
    for tokens, labels in data:
        nn.functional.cross_entropy(model(tokens), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
        if each is not None:
            each()


def cubic(t: int, start: float, end: float, total: int, warmup: int, final: int) -> float:
    """AdaLoRA's budget, written out again."""
    if t < warmup:
        return start
    if t >= total - final:
        return end
    return end + (start - end) * (1 - (t - warmup) / (total - final - warmup)) ** 3


def test_the_budget_holds_at_every_step_and_follows_the_cubic_schedule_exactly() -> None:
    model = Mixed()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = RankScheduler(model, optimizer, ratio=0.3, total_steps=30, warmup_steps=5, final_steps=5,
                              kinds=("linear", "conv", "embedding"))
    seen = []

    def check() -> None:
        step = scheduler.step
        assert scheduler.budget_at(step) == pytest.approx(
            cubic(step, scheduler.start_budget, scheduler.final_budget, 30, 5, 5), rel=1e-12)
        assert scheduler.params() <= scheduler.budget_at(step)
        seen.append((step, scheduler.params()))

    train(model, optimizer, batches(30), check)
    assert seen[4] == (5, scheduler.start_budget)  # nothing masked in the warm-up
    assert seen[-1][1] <= scheduler.final_budget
    assert [p for _, p in seen] == sorted((p for _, p in seen), reverse=True)


def test_masked_components_are_zero_and_stay_masked_and_finalize_keeps_the_outputs() -> None:
    model = Mixed()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    scheduler = RankScheduler(model, optimizer, ratio=0.4, total_steps=20, kinds=("linear", "conv", "embedding"))
    masks = []
    train(model, optimizer, batches(20), lambda: masks.append(
        {(n, a): k.clone() for n, by_axis in scheduler.kept.items() for a, k in by_axis.items()}))
    for earlier, later in zip(masks, masks[1:]):
        assert all(bool((later[key] <= earlier[key]).all()) for key in earlier)  # never unmasked
    for name, module in scheduler.modules.items():
        for axis in module.rank_axes():
            dropped = torch.nonzero(~scheduler.kept[name][axis.name]).flatten()
            for p, dim, grouped in axis.slices:
                groups = getattr(module, "groups", 1) if grouped else 1
                rows = (torch.arange(groups)[:, None] * axis.size + dropped).flatten()
                assert not module.get_parameter(p).index_select(dim, rows).any(), (name, p)
    tokens = batches(1)[0][0]
    expected = model(tokens)
    params = scheduler.params()
    report = scheduler.finalize()
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for m in (model.embed, model.tucker, model.cp, model.svd, model.head)
               for p in m.parameters()) == params == report.params_after
    assert model.tucker.ranks == (scheduler.ranks["tucker"]["r_out"], scheduler.ranks["tucker"]["r_in"])


def test_component_scores_are_adaloras_smoothed_sensitivity_times_uncertainty() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(LowRankLinear.from_dense(nn.Linear(6, 5), 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # θ stays: the scores depend on the gradients only
    scheduler = RankScheduler(model, optimizer, ratio=0.9, total_steps=100, beta1=0.8, beta2=0.7)
    layer = model[0]
    mean, spread = {}, {}
    for step in range(3):
        x = torch.randn(4, 6)
        layer(x).sum().backward()
        for name in ("first", "second"):
            p = getattr(layer, name)
            s = (p * p.grad).abs().detach()
            if step == 0:  # PEFT's AdaLoRA starts both at zero
                mean[name], spread[name] = torch.zeros_like(s), torch.zeros_like(s)
            mean[name] = 0.8 * mean[name] + 0.2 * s
            spread[name] = 0.7 * spread[name] + 0.3 * (s - mean[name]).abs()
        optimizer.step()
        optimizer.zero_grad()
    score = mean["first"].mul(spread["first"]).mean(dim=1) + mean["second"].mul(spread["second"]).mean(dim=0)
    torch.testing.assert_close(scheduler.scores()["0"]["rank"], score)


def _run(steps: int, resume_at: int | None, tmp_path) -> dict[str, torch.Tensor]:
    def build():
        model = Mixed()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, optimizer, RankScheduler(model, optimizer, ratio=0.3, total_steps=steps,
                                               kinds=("linear", "conv", "embedding"))

    model, optimizer, scheduler = build()
    data = batches(steps)
    for step, batch in enumerate(data):
        if step == resume_at:
            path = tmp_path / "checkpoint.pt"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, path)
            model, optimizer, scheduler = build()
            state = torch.load(path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        train(model, optimizer, [batch])
    return model.state_dict()


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path) -> None:
    whole, resumed = _run(16, None, tmp_path), _run(16, 7, tmp_path)
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, r"ratio must be a fraction in \(0, 1\], got 0.0"),
        ({"total_steps": 0}, "total_steps must be an int >= 1, got 0"),
        ({"total_steps": 10, "warmup_steps": 6, "final_steps": 5}, r"warmup_steps \+ final_steps \(6 \+ 5\)"),
        ({"total_steps": 10, "warmup_steps": 5, "final_steps": 5}, r"must be less than total_steps \(10\)"),
        ({"beta1": 1.0}, r"beta1 must be a fraction in \[0, 1\)"),
        ({"ratio": 0.001}, r"fewer than the targeted modules hold at rank 1"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs: dict, message: str) -> None:
    model = nn.Sequential(LowRankLinear.from_dense(nn.Linear(16, 16), 8))
    with pytest.raises(ValueError, match=message):
        RankScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_models_without_ranked_modules_and_foreign_optimizers_are_refused() -> None:
    dense = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no factorized module of the Sequential matches"):
        RankScheduler(dense, torch.optim.SGD(dense.parameters(), lr=0.1))
    tt = nn.Sequential(TTLinear.from_dense(nn.Linear(16, 16), 2))
    with pytest.raises(ValueError, match="RankScheduler found no factorized module with rank components"):
        RankScheduler(tt, torch.optim.SGD(tt.parameters(), lr=0.1))
    model = nn.Sequential(LowRankLinear.from_dense(nn.Linear(16, 16), 8))
    with pytest.raises(ValueError, match="optimizer does not hold parameter '0.first'"):
        RankScheduler(model, torch.optim.SGD([model[0].bias], lr=0.1))


def test_finalizing_before_the_fall_ends_warns_and_finalizing_twice_is_refused() -> None:
    model = nn.Sequential(LowRankLinear.from_dense(nn.Linear(16, 16), 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = RankScheduler(model, optimizer, ratio=0.5, total_steps=10)
    with pytest.warns(UserWarning, match=r"finalized at step 0, before its budget reached the final 136 parameters"):
        scheduler.finalize()
    with pytest.raises(RuntimeError, match="this RankScheduler was finalized already"):
        scheduler.finalize()
