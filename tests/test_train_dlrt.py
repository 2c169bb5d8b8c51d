"""DLRT (rank-adaptive low-rank training) and its layer, checked against references that do not come from them.

The layer's forward against ``nn.functional.linear`` with the product of its
factors; its backward against autograd's gradient of the dense weight,
projected by hand; one SGD step of the integrator against the tangent-space
gradient step it equals (and that step's best truncation, from a float64
SVD); the rank it learns against a planted teacher of known rank; resuming,
finalizing and saving against the run, the model and the file they continue.
"""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import F64, generator, randn, random_orthonormal, smallest_rank_for_tol
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lowrank
from lowrank.nn import MODULES, LowRankLinear
from lowrank.nn.dlrt import DLRTLinear
from lowrank.train.dlrt import DLRT


def random_layer(in_features: int, out_features: int, rank: int, max_rank: int, seed: int,
                 dtype: torch.dtype = F64) -> DLRTLinear:
    """A DLRTLinear whose active factors are random (orthonormal ``U``, ``V``; a full, non-diagonal ``S``)."""
    gen = generator(seed)
    layer = DLRTLinear(in_features, out_features, max_rank, dtype=dtype)
    with torch.no_grad():
        layer.assign(random_orthonormal(out_features, rank, gen), torch.ones(rank, dtype=F64),
                     random_orthonormal(in_features, rank, gen))
        layer.S[:rank, :rank] = randn(rank, rank, gen=gen)
        layer.bias.copy_(randn(out_features, gen=gen))
    return layer


def active_factors(layer: DLRTLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = layer.rank
    return layer.U[:, :r].detach(), layer.S[:r, :r].detach(), layer.V[:, :r].detach()


def product(layer: DLRTLinear) -> torch.Tensor:
    u, s, v = active_factors(layer)
    return u @ s @ v.T


def orthonormality_error(q: torch.Tensor) -> float:
    q = q.detach().double()
    return float(torch.linalg.matrix_norm(q.T @ q - torch.eye(q.shape[1], dtype=F64)))


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = (model(x) - y).square().sum(-1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), (24,)])
def test_forward_is_the_dense_linear_of_the_active_factors(shape):
    layer = random_layer(24, 36, rank=5, max_rank=10, seed=0)
    x = randn(*shape, gen=generator(1))
    expected = F.linear(x, product(layer), layer.bias.detach())
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer(x).shape == (*shape[:-1], 36)


def test_backward_puts_the_projected_gradients_on_the_factors():
    layer = random_layer(24, 36, rank=5, max_rank=10, seed=2)
    gen = generator(3)
    x, target = randn(3, 4, 24, gen=gen), randn(3, 4, 36, gen=gen)

    def loss_of(y: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(y) * target).sum() + y.square().sum()

    # the reference: autograd through the explicit dense product, then G projected by hand
    u, s, v = active_factors(layer)
    weight = (u @ s @ v.T).requires_grad_()
    x_ref = x.clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    loss_of(F.linear(x_ref, weight, bias)).backward()
    grad = weight.grad

    x_in = x.clone().requires_grad_()
    loss_of(layer(x_in)).backward()
    r = layer.rank
    for name, parameter, expected in [("U", layer.U, grad @ v), ("V", layer.V, grad.T @ u)]:
        torch.testing.assert_close(parameter.grad[:, :r], expected, rtol=1e-10, atol=1e-10, msg=name)
        assert not parameter.grad[:, r:].any(), name
    torch.testing.assert_close(layer.S.grad[:r, :r], u.T @ grad @ v, rtol=1e-10, atol=1e-10)
    assert not layer.S.grad[r:].any() and not layer.S.grad[:, r:].any()
    torch.testing.assert_close(x_in.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-10, atol=1e-10)


def test_from_dense_is_the_truncated_svd_with_orthonormal_factors():
    dense = nn.Linear(24, 36, dtype=F64)
    layer = DLRTLinear.from_dense(dense, rank=6)
    assert (layer.rank, layer.max_rank, int(layer.active)) == (6, 12, 6)
    u, s, vh = torch.linalg.svd(dense.weight.detach())
    torch.testing.assert_close(product(layer), (u[:, :6] * s[:6]) @ vh[:6], rtol=1e-10, atol=1e-10)
    assert orthonormality_error(layer.U[:, :6]) < 1e-12 and orthonormality_error(layer.V[:, :6]) < 1e-12
    assert not layer.U[:, 6:].any() and not layer.V[:, 6:].any() and not layer.S[6:].any()
    assert torch.equal(layer.bias, dense.bias) and layer.bias is not dense.bias


def test_the_layer_keeps_the_contract_of_factorized_modules(tmp_path):
    dense = nn.Linear(24, 36, dtype=F64)
    layer = random_layer(24, 36, rank=5, max_rank=10, seed=4)
    assert MODULES["DLRTLinear"] is DLRTLinear and layer.reported_rank == 5
    # rebuilt from its JSON config and state dict (the active rank is state, not structure)
    rebuilt = DLRTLinear(**json.loads(json.dumps(layer.config())), dtype=F64)
    rebuilt.load_state_dict(layer.state_dict())
    x = randn(3, 5, 24, gen=generator(5))
    assert rebuilt.rank == 5 and torch.equal(rebuilt(x), layer(x))
    # to_dense is the forward as a dense layer; flops are the multiply-accumulates torch counts
    with torch.no_grad():
        torch.testing.assert_close(layer.to_dense()(x), layer(x), rtol=1e-12, atol=1e-12)
        with FlopCounterMode(display=False) as counter:
            layer(x)
    assert 2 * layer.flops(tuple(x.shape)) == counter.get_total_flops()
    # the module counts every stored column; a budget gives the largest initial rank whose default width fits
    assert layer.num_params == 10 * (24 + 36 + 10) + 36
    rank = DLRTLinear.rank_for_budget(dense, 1000)
    assert DLRTLinear.from_dense(dense, rank).num_params <= 1000 < DLRTLinear.from_dense(dense, rank + 1).num_params
    assert DLRTLinear.rank_for_budget(dense, 10) is None


def test_hugging_face_conv1d_layers_are_read_and_rebuilt_transposed():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    dense = pytorch_utils.Conv1D(36, 24).double()  # weight stored (in, out)
    with torch.no_grad():
        dense.weight.copy_(randn(24, 36, gen=generator(6)))
    layer = DLRTLinear.from_dense(dense, rank=24)  # the full rank: the same layer
    x = randn(4, 24, gen=generator(7))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-10)
        assert type(layer.to_dense()) is type(dense) and layer.dense_weight().shape == (24, 36)


# ----------------------------------------------------------------------------- the integrator


def test_one_sgd_step_is_the_tangent_space_gradient_step():
    # with nothing truncated (tol tiny, room for twice the rank), one SGD step of the parallel BUG integrator is
    # Y1 = Y0 - lr * (P_U G + G P_V - P_U G P_V): the gradient projected on the tangent space at Y0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16, dtype=F64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    dlrt = DLRT(model, optimizer, rank=4, tol=1e-12, min_rank=1)
    layer = model[0]
    u, _, v = active_factors(layer)
    y0 = product(layer)
    x, y = randn(32, 20, gen=generator(8)), randn(32, 16, gen=generator(9))
    weight = y0.clone().requires_grad_()
    (F.linear(x, weight, layer.bias.detach()) - y).square().sum(-1).mean().backward()
    g = weight.grad
    pu, pv = u @ u.T, v @ v.T
    expected = y0 - 0.05 * (pu @ g + g @ pv - pu @ g @ pv)

    sgd_step(model, optimizer, x, y)
    assert dlrt.ranks == {"0": 8} and dlrt.history == [(1, {"0": 8})]
    torch.testing.assert_close(product(layer), expected, rtol=1e-10, atol=1e-10)
    u1, s1, v1 = active_factors(layer)
    assert orthonormality_error(u1) < 1e-12 and orthonormality_error(v1) < 1e-12
    assert torch.equal(s1, torch.diag(torch.diagonal(s1)))


def test_a_step_without_gradients_leaves_the_layers_as_they_were():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(20, 16, dtype=F64), nn.Linear(16, 8, dtype=F64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dlrt = DLRT(model, optimizer, rank=4, tol=1e-9, min_rank=1)
    before = [product(layer) for layer in dlrt.layers.values()]
    optimizer.step()  # no gradients: the optimizer changes nothing, K = U0 S0 and L = V0 S0^T add no direction
    assert dlrt.ranks == {"0": 4, "1": 4} and dlrt.step == 1
    for layer, weight in zip(dlrt.layers.values(), before):
        torch.testing.assert_close(product(layer), weight, rtol=1e-12, atol=1e-12)
    dlrt.remove()
    optimizer.step()
    assert dlrt.step == 1 and len(dlrt.history) == 1


@pytest.mark.parametrize("tol", [0.05, 0.3, 0.6])
def test_the_step_is_truncated_to_the_smallest_rank_within_tol(tol):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 16, dtype=F64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    DLRT(model, optimizer, rank=4, tol=tol, min_rank=1)
    layer = model[0]
    u, _, v = active_factors(layer)
    y0 = product(layer)
    x, y = randn(32, 20, gen=generator(10)), randn(32, 16, gen=generator(11))
    weight = y0.clone().requires_grad_()
    (F.linear(x, weight, layer.bias.detach()) - y).square().sum(-1).mean().backward()
    g = weight.grad
    pu, pv = u @ u.T, v @ v.T
    full_step = y0 - 0.5 * (pu @ g + g @ pv - pu @ g @ pv)
    a, s, bh = torch.linalg.svd(full_step)
    rank = min(smallest_rank_for_tol(s, tol), 8)

    sgd_step(model, optimizer, x, y)
    assert layer.rank == rank
    torch.testing.assert_close(product(layer), (a[:, :rank] * s[:rank]) @ bh[:rank], rtol=1e-9, atol=1e-9)


def test_factors_stay_orthonormal_in_float32_with_adam():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    bias = model[0].bias
    dlrt = DLRT(model, optimizer, rank=8)
    assert set(dlrt.layers) == {"0", "2"}
    # the optimizer holds U, S, V where the dense weight was, and the same bias parameter
    held = [p for group in optimizer.param_groups for p in group["params"]]
    first, second = model[0], model[2]
    expected = [first.U, first.S, first.V, first.bias, second.U, second.S, second.V, second.bias]
    assert len(held) == len(expected) and all(p is q for p, q in zip(held, expected)) and first.bias is bias
    x, y = torch.randn(64, 48), torch.randn(64, 32)
    for _ in range(15):
        sgd_step(model, optimizer, x, y)
    for layer in dlrt.layers.values():
        u, _, v = active_factors(layer)
        assert orthonormality_error(u) < 1e-5 and orthonormality_error(v) < 1e-5
        assert not layer.U[:, layer.rank:].any() and not layer.V[:, layer.rank:].any()
        assert layer.U.dtype == torch.float32


def planted_run(teacher_spectrum, rank, steps, *, min_rank=2, max_rank=None, tol=0.1, lr=0.2, seed=0):
    """A one-layer DLRT student regressing a teacher ``y = W* x`` of the given spectrum: losses and the model."""
    gen = generator(seed)
    teacher = (random_orthonormal(24, len(teacher_spectrum), gen) * torch.tensor(teacher_spectrum, dtype=F64)
               ) @ random_orthonormal(32, len(teacher_spectrum), gen).T
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 24, bias=False, dtype=F64))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    dlrt = DLRT(model, optimizer, rank, tol=tol, min_rank=min_rank, max_rank=max_rank)
    losses = []
    for _ in range(steps):
        x = randn(64, 32, gen=gen)
        losses.append(sgd_step(model, optimizer, x, x @ teacher.T))
    return losses, dlrt


def test_the_rank_falls_to_a_planted_teachers():
    # tol=0.1 keeps the teacher's smallest singular value (1.5 / ||(3, 2, 1.5)|| = 0.38 of the norm): once the
    # student has learnt the teacher, its rank is the teacher's
    losses, dlrt = planted_run([3.0, 2.0, 1.5], rank=12, steps=25)
    ranks = [ranks["0"] for _, ranks in dlrt.history]
    assert ranks[0] > 4 and ranks[-1] == 3, ranks
    assert losses[-1] < 1e-6 * losses[0], losses[::5]


def test_the_rank_grows_to_a_planted_teachers():
    spectrum = [4.0, 3.5, 3.0, 2.5, 2.0, 2.0, 1.5, 1.5]
    losses, dlrt = planted_run(spectrum, rank=2, steps=25, min_rank=1, max_rank=12, tol=0.05)
    assert dlrt.ranks["0"] == 8, dlrt.history[::5]
    assert losses[-1] < 1e-6 * losses[0], losses[::5]


# ----------------------------------------------------------------------------- resuming, finalizing, saving


def make_run(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-1)
    dlrt = DLRT(model, optimizer, rank=4, tol=0.3)
    return model, optimizer, dlrt


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(12)
    return [(torch.randn(32, 16, generator=gen), torch.randn(32, 8, generator=gen)) for _ in range(n)]


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one():
    data = batches(12)
    model, optimizer, dlrt = make_run(seed=0)
    for x, y in data:
        sgd_step(model, optimizer, x, y)

    model_a, optimizer_a, dlrt_a = make_run(seed=0)
    for x, y in data[:6]:
        sgd_step(model_a, optimizer_a, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": optimizer_a.state_dict(), "dlrt": dlrt_a.state_dict()},
               buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    model_b, optimizer_b, dlrt_b = make_run(seed=99)  # fresh objects, other initial weights
    model_b.load_state_dict(checkpoint["model"])
    optimizer_b.load_state_dict(checkpoint["optimizer"])
    dlrt_b.load_state_dict(checkpoint["dlrt"])
    assert dlrt_b.ranks == dlrt_a.ranks and dlrt_b.step == 6
    for x, y in data[6:]:
        sgd_step(model_b, optimizer_b, x, y)
    assert dlrt_b.history == dlrt.history
    assert dlrt.history[-1][0] > 6 and dlrt.history[0][1] != dlrt.history[-1][1]  # a rank changed after the resume
    state, resumed = model.state_dict(), model_b.state_dict()
    assert state.keys() == resumed.keys() and all(torch.equal(state[k], resumed[k]) for k in state)


def test_finalize_swaps_in_low_rank_layers_with_the_same_output():
    model, optimizer, dlrt = make_run(seed=1)
    for x, y in batches(5):
        sgd_step(model, optimizer, x, y)
    ranks = dlrt.ranks
    x = torch.randn(10, 16)
    with torch.no_grad():
        before = model(x)
    report = dlrt.finalize()
    assert not dlrt.attached
    for name, rank in ranks.items():
        module = model.get_submodule(name)
        assert type(module) is LowRankLinear and module.rank == rank
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert [(row.name, row.method, row.rank) for row in report.layers] == [(n, "dlrt", r) for n, r in ranks.items()]
    dense_params = {"0": 16 * 24 + 24, "2": 24 * 8 + 8}
    assert {row.name: row.params_before for row in report.layers} == dense_params
    assert all(row.relative_error < 1e-5 for row in report.layers)
    assert report.settings["train"] == {"method": "DLRT", "step": 5, "rank": 4, "tol": 0.3, "min_rank": 2,
                                        "max_rank": None, "targets": dlrt.targets.to_dict()}


class TiedModel(nn.Module):
    """An embedding, a hidden linear layer and an output head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(idx))))


def test_output_heads_stay_dense_and_are_reported():
    torch.manual_seed(3)
    model = TiedModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dlrt = DLRT(model, optimizer, rank=4)
    assert set(dlrt.layers) == {"hidden"} and dlrt.skipped == {"head": "output head"}
    assert type(model.head) is nn.Linear and model.head.weight is model.embed.weight
    report = dlrt.finalize()
    assert [(row.name, row.skip_reason) for row in report.layers] == [("hidden", None), ("head", "output head")]


def test_save_and_load_round_trip_a_model_in_training(tmp_path):
    model, optimizer, dlrt = make_run(seed=4)
    for x, y in batches(4):
        sgd_step(model, optimizer, x, y)
    assert any(layer.rank != layer.max_rank for layer in dlrt.layers.values())
    lowrank.save(model, tmp_path / "out")
    fresh = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    loaded = lowrank.load(tmp_path / "out", model=fresh)
    for name, layer in dlrt.layers.items():
        module = loaded.get_submodule(name)
        assert type(module) is DLRTLinear and module.config() == layer.config() and module.rank == layer.rank
    x = torch.randn(6, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ----------------------------------------------------------------------------- bad input


def small_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 0}, r"rank must be an int >= 1, got 0"),
    ({"rank": 4, "tol": 0.0}, r"tol must be a fraction in \(0, 1\), got 0.0"),
    ({"rank": 4, "tol": 1.5}, r"tol must be a fraction in \(0, 1\), got 1.5"),
    ({"rank": 4, "min_rank": 5}, r"min_rank must be at most rank \(4\), got 5"),
    ({"rank": 1}, r"min_rank must be at most rank \(1\), got 2"),
    ({"rank": 4, "max_rank": 3}, r"max_rank must be at least rank \(4\), got 3"),
    ({"rank": 12}, r"rank 12 exceeds the largest rank 8 of layer '2' \(weight \(8, 24\)\): lower rank or exclude"),
    ({"rank": 4, "kinds": ("conv",)}, r"no layer of the Sequential matches the targets"),
])
def test_bad_arguments_are_refused_and_leave_the_model_alone(kwargs, message):
    model, optimizer = small_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        DLRT(model, optimizer, **kwargs)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_an_optimizer_without_the_weights_is_refused():
    model, _ = small_model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"the optimizer does not hold parameter '2.weight' \(shape \(8, 24\)\)"):
        DLRT(model, optimizer, rank=4)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_a_model_without_a_linear_target_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"DLRT has no linear layer to train .* \(0: DLRT trains linear layers "
                                         r"only, not conv layers; 2: DLRT trains"):
        DLRT(model, torch.optim.SGD(model.parameters(), lr=0.1), rank=2)
    with pytest.raises(ValueError, match="no linear layer to train .*head: output head"):
        model = TiedModel()
        DLRT(model, torch.optim.SGD(model.parameters(), lr=0.1), rank=2, exclude="hidden")


def test_bad_layer_arguments_are_refused():
    dense = nn.Linear(16, 24)
    with pytest.raises(ValueError, match=r"max_rank must be at least the initial rank 4, got 3"):
        DLRTLinear.from_dense(dense, 4, max_rank=3)
    with pytest.raises(ValueError, match=r"rank for a weight of shape \(24, 16\) must be at most 16, got 17"):
        DLRTLinear.from_dense(dense, 17)
    with pytest.raises(ValueError, match=r"max_rank for a DLRTLinear\(16, 24\) must be at most 16, got 20"):
        DLRTLinear(16, 24, 20)
    layer = DLRTLinear.from_dense(dense, 4)
    with pytest.raises(ValueError, match=r"assign needs u \(24, r\), s \(r,\) and v \(16, r\) with 1 <= r <= 8"):
        layer.assign(torch.zeros(24, 9), torch.zeros(9), torch.zeros(16, 9))
    state = layer.state_dict()
    state["active"] = torch.tensor(9)
    with pytest.raises(ValueError, match=r"active rank of a DLRTLinear must be in \[1, 8\], got 9"):
        layer.load_state_dict(state)


def test_a_distributed_data_parallel_wrapper_is_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        model, optimizer = small_model()
        wrapped = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="attach DLRT to the model first, then wrap it"):
            DLRT(wrapped, optimizer, rank=4)
        assert type(model[0]) is nn.Linear
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_bases_grow_in_low_precision_too(dtype):
    # new directions are judged at the integrator's float64 precision, not the factors' own rounding, which in
    # bfloat16 (0.8% of the norm) would hide every ordinary step's new direction and freeze the bases
    gen = generator(0)
    teacher = (random_orthonormal(24, 8, gen) * torch.linspace(3, 1.5, 8, dtype=F64)) @ random_orthonormal(32, 8, gen).T
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24, bias=False)).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    dlrt = DLRT(model, optimizer, 2, tol=0.1, max_rank=12)
    losses = []
    for _ in range(30):
        x = randn(64, 32, gen=gen)
        losses.append(sgd_step(model, optimizer, x.to(dtype), (x @ teacher.T).to(dtype)))
    assert dlrt.ranks["0"] >= 6 and losses[-1] < 0.1 * losses[0], (dlrt.history, losses[::6])
