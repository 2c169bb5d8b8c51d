"""TRP against float64 references: the energy truncation, the nuclear-norm subgradient, resuming, finalizing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank
from lowrank.nn import LowRankLinear, SVDConv
from lowrank.train import TRP, Ramp
from lowrank.train.trp import energy_truncation

F64 = torch.float64


def reference_truncation(matrix: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """The float64 truncated SVD of ``matrix`` at the smallest rank keeping ``energy`` of sum(s^2)."""
    u, s, vh = torch.linalg.svd(matrix.to(F64), full_matrices=False)
    kept = torch.cumsum(s**2, 0) / torch.sum(s**2)
    rank = int((kept < energy).sum()) + 1
    return (u[:, :rank] * s[:rank]) @ vh[:rank], rank


def frozen_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One training step (the weights move only by what the hooks do when lr is 0)."""
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def spatial_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Jaderberg's ``(in*kh, out*kw)`` view, written out index by index."""
    out_c, in_c, kh, kw = weight.shape
    matrix = torch.empty(in_c * kh, out_c * kw, dtype=weight.dtype)
    for o in range(out_c):
        for i in range(in_c):
            for a in range(kh):
                for b in range(kw):
                    matrix[i * kh + a, o * kw + b] = weight[o, i, a, b]
    return matrix


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("layer_kind", ["linear", "conv-channel", "conv-spatial", "embedding"])
def test_truncation_equals_a_float64_svd_truncation_at_the_energy(energy: float, layer_kind: str) -> None:
    torch.manual_seed(0)
    if layer_kind == "linear":
        layer, x, kinds, view = nn.Linear(40, 24), torch.randn(4, 40), ("linear",), lambda w: w
    elif layer_kind == "embedding":
        layer, x, kinds, view = nn.Embedding(50, 16), torch.arange(10), ("embedding",), lambda w: w
    else:
        layer, x, kinds = nn.Conv2d(6, 10, (3, 2)), torch.randn(2, 6, 7, 7), ("conv",)
        view = (lambda w: w.reshape(w.shape[0], -1)) if layer_kind == "conv-channel" else spatial_matrix
    model = nn.Sequential(layer)
    original = view(layer.weight.detach().clone())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trp = TRP(model, optimizer, energy=energy, period=1, nuclear_weight=0.0, kinds=kinds,
              conv_scheme="spatial" if layer_kind == "conv-spatial" else "channel")
    frozen_step(model, optimizer, x)
    expected, rank = reference_truncation(original, energy)
    assert trp.ranks == {"0": rank}
    got = view(layer.weight.detach()).to(F64)
    assert torch.linalg.matrix_norm(got - expected) <= 1e-5 * torch.linalg.matrix_norm(expected)


def test_energy_truncation_randomized_path_keeps_the_energy_of_the_full_spectrum() -> None:
    torch.manual_seed(1)
    # a 1024-wide matrix with a decaying spectrum: the randomized path applies with a small rank hint
    u = torch.linalg.qr(torch.randn(1200, 1024, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(1024, 1024, dtype=F64)).Q
    s = 0.9 ** torch.arange(1024, dtype=F64)
    matrix = ((u * s) @ v.T).float()
    expected, rank = reference_truncation(matrix, 0.99)
    got_u, got_s, got_vh = energy_truncation(matrix, 0.99, rank_hint=rank - 3)
    assert got_s.numel() == rank
    assert torch.linalg.matrix_norm((got_u * got_s) @ got_vh - expected) <= 1e-4 * torch.linalg.matrix_norm(expected)


def test_nuclear_subgradient_matches_autograd_of_the_nuclear_norm() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(7, 5, bias=False).to(F64)
    with torch.no_grad():  # distinct singular values 5, 4, 3, 2, 1
        u = torch.linalg.qr(torch.randn(5, 5, dtype=F64)).Q
        v = torch.linalg.qr(torch.randn(7, 5, dtype=F64)).Q
        layer.weight.copy_((u * torch.arange(5, 0, -1, dtype=F64)) @ v.T)
    model = nn.Sequential(layer)
    weight = layer.weight.detach().clone().requires_grad_(True)
    torch.linalg.matrix_norm(weight, "nuc").backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    TRP(model, optimizer, energy=1.0, period=1, nuclear_weight=0.25)
    for _ in range(2):  # the first step truncates (nothing to cut at energy 1), the second adds λ U Vᵀ
        layer.weight.grad = torch.zeros_like(layer.weight)
        before = layer.weight.detach().clone()
        optimizer.step()
    torch.testing.assert_close(before - layer.weight.detach(), 0.25 * weight.grad, rtol=1e-10, atol=1e-10)


def test_an_energy_ramp_lowers_the_ranks_step_by_step() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trp = TRP(model, optimizer, energy=Ramp(0.999, 0.6, steps=8), period=2)
    for _ in range(10):
        frozen_step(model, optimizer, torch.randn(3, 64))
    ranks = [ranks["0"] for _, ranks in trp.history]
    assert [step for step, _ in trp.history] == [2, 4, 6, 8, 10]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]


def _run(steps: int, resume_at: int | None, tmp_path) -> dict[str, torch.Tensor]:
    """Train a conv+linear model with TRP on fixed data, optionally through a checkpoint at ``resume_at``."""
    def build() -> tuple[nn.Module, torch.optim.Optimizer, TRP]:
        torch.manual_seed(4)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, optimizer, TRP(model, optimizer, energy=Ramp(0.99, 0.8, 6), period=3, nuclear_weight=1e-2)

    model, optimizer, trp = build()
    data = torch.randn(steps, 4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for step in range(steps):
        if step == resume_at:
            path = tmp_path / "checkpoint.pt"
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "trp": trp.state_dict()},
                       path)
            model, optimizer, trp = build()
            state = torch.load(path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            trp.load_state_dict(state["trp"])
        model(data[step]).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return {**model.state_dict(), "ranks": trp.ranks}


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path) -> None:
    whole = _run(10, None, tmp_path)
    resumed = _run(10, 6, tmp_path)  # step 6 truncated: its nuclear-norm direction is pending in the checkpoint
    assert whole.pop("ranks") == resumed.pop("ranks")
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name


def test_finalize_swaps_in_modules_at_the_trained_ranks_with_the_same_outputs() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3, groups=2), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trp = TRP(model, optimizer, energy=0.8, period=1)
    x = torch.randn(5, 3, 8, 8)
    frozen_step(model, optimizer, x)  # lr 0: the weights are their truncations now
    expected = model(x).detach()
    ranks = dict(trp.ranks)
    report = trp.finalize()
    assert isinstance(model[0], SVDConv) and isinstance(model[4], LowRankLinear)
    assert isinstance(model[2], nn.Conv2d)  # grouped: left dense, with its reason
    assert model[0].rank == ranks["0"] and model[4].rank == ranks["4"]
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    rows = {row.name: row for row in report.layers}
    assert rows["2"].skip_reason == "grouped convolution (groups=2)"
    assert rows["0"].params_after == model[0].num_params and rows["0"].relative_error < 1e-5
    assert not trp.attached and report.settings["train"]["method"] == "TRP"


def test_finalize_leaves_the_model_unchanged_when_a_layer_fails(monkeypatch) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    before = copy.deepcopy(model.state_dict())
    trp = TRP(model, torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []

    def failing(layer, rank):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("decomposition failed")
        return LowRankLinear.from_dense(layer, rank)

    monkeypatch.setattr(lowrank.nn.registry.Method, "from_dense", lambda self, layer, rank: failing(layer, rank))
    with pytest.raises(RuntimeError, match="decomposition failed"):
        trp.finalize()
    assert all(isinstance(m, nn.Linear) for m in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"energy": 0.0}, r"energy must be a fraction in \(0, 1\], got 0.0"),
        ({"energy": 1.5}, r"energy must be a fraction in \(0, 1\], got 1.5"),
        ({"energy": lambda step: 2.0}, r"energy must be a fraction in \(0, 1\], got 2.0 \(at step 0\)"),
        ({"energy": Ramp(0.9, 0.0, 10)}, r"energy must be a fraction in \(0, 1\], got 0.0 \(at step 10\)"),
        ({"period": 0}, "period must be an int >= 1, got 0"),
        ({"nuclear_weight": -1.0}, "nuclear_weight must be a finite number >= 0"),
        ({"conv_scheme": "diagonal"}, "conv_scheme must be one of 'channel', 'spatial'"),
        ({"include": "missing*"}, "no layer of the Sequential matches the targets"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs: dict, message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=message):
        TRP(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_an_optimizer_without_the_model_parameters_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer does not hold parameter '0.weight' \(shape \(4, 4\)\)"):
        TRP(model, optimizer)


def test_a_model_with_only_unsupported_targets_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match=r"no layer to train low-rank .*0: grouped convolution \(groups=4\)"):
        TRP(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_finalize_keeps_layers_above_break_even_dense_and_refuses_a_second_call() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trp = TRP(model, optimizer, energy=0.99, period=1)
    frozen_step(model, optimizer, torch.randn(4, 64))
    assert min(trp.ranks.values()) > 32  # a random weight needs most of its rank for 99% of its energy
    report = trp.finalize()
    assert all(isinstance(layer, nn.Linear) for layer in model)
    assert all("above break-even" in row.skip_reason and row.params_after == row.params_before
               for row in report.layers)
    with pytest.raises(RuntimeError, match="this TRP was finalized already"):
        trp.finalize()


def test_non_finite_weights_are_named_at_the_truncation() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    TRP(model, optimizer, period=1)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="TRP: layer '1' has non-finite weights at optimizer step 1"):
        optimizer.step()  # no gradients: only the hooks act


def test_compiled_and_wrapped_models_are_unwrapped_to_their_layer_names() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    compiled = torch.compile(nn.DataParallel(model), backend="eager")
    trp = TRP(compiled, torch.optim.SGD(model.parameters(), lr=0.1))
    assert trp.model is model and [layer.name for layer in trp.layers] == ["0"]
