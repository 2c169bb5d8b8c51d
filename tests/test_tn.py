"""Tensor networks: contraction, ALS core updates and the greedy structure search."""

import string

import pytest
import torch
from conftest import generator, planted_tt, randn, rel_err

import lowrank
from lowrank.decompose import TensorNetwork, tn
from lowrank.decompose.tn import als, als_update, environment, grow, rest_of_pair

F64 = torch.float64


def random_network(shape, ranks, seed):
    """Cores of a fully connected network; ``ranks[(i, j)]`` are the bonds (1 when absent)."""
    gen = generator(seed)
    n = len(shape)
    cores = []
    for k in range(n):
        core_shape = [shape[k] if j == k else ranks.get((min(j, k), max(j, k)), 1) for j in range(n)]
        cores.append(randn(*core_shape, gen=gen))
    return cores


def naive_contraction(cores):
    """The network contracted by one plain torch.einsum call, letters assigned independently."""
    n = len(cores)
    letters = iter(string.ascii_letters)
    physical = [next(letters) for _ in range(n)]
    bond = {}
    for i in range(n):
        for j in range(i + 1, n):
            bond[i, j] = bond[j, i] = next(letters)
    specs = ["".join(physical[k] if j == k else bond[k, j] for j in range(n)) for k in range(n)]
    return torch.einsum(",".join(specs) + "->" + "".join(physical), *cores)


TRIANGLE_CHAIN = {(0, 1): 2, (1, 2): 3, (0, 2): 2, (2, 3): 3, (3, 4): 2}


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [((4, 5, 6), {(0, 1): 2, (1, 2): 3, (0, 2): 2}), ((3, 4, 5, 3, 4), TRIANGLE_CHAIN), ((5, 6), {(0, 1): 3})],
)
def test_contraction_matches_a_naive_einsum(shape, ranks):
    cores = random_network(shape, ranks, seed=0)
    net = TensorNetwork(tuple(cores))
    torch.testing.assert_close(net.to_tensor(), naive_contraction(cores), rtol=1e-12, atol=1e-12)
    assert net.shape == shape
    assert net.num_params == sum(c.numel() for c in cores)
    assert set(net.edges) == {edge for edge, r in ranks.items() if r > 1}
    matrix = net.ranks
    assert all(matrix[i][j] == matrix[j][i] for i in range(len(shape)) for j in range(len(shape)))


def test_mismatched_bonds_are_refused():
    cores = random_network((4, 5, 6), {(0, 1): 2}, seed=0)
    cores[1] = torch.zeros(3, 5, 1, dtype=F64)
    with pytest.raises(ValueError, match="bond between cores 0 and 1 has size 2 in core 0 but 3 in core 1"):
        TensorNetwork(tuple(cores))


def test_als_update_matches_a_float64_least_squares_reference():
    shape, ranks = (4, 5, 6, 3), {(0, 1): 2, (1, 2): 3, (0, 3): 2, (2, 3): 2}
    cores = random_network(shape, ranks, seed=1)
    x = randn(*shape, gen=generator(2))
    k = 2
    new, offset = als_update(torch.movedim(x, k, 0).reshape(shape[k], -1), cores, k, ridge=0.0)
    # reference: vectorise core k and solve min ||x - A vec(core_k)|| with torch.linalg.lstsq
    columns = []
    for index in range(cores[k].numel()):
        unit = torch.zeros(cores[k].numel(), dtype=F64)
        unit[index] = 1.0
        trial = list(cores)
        trial[k] = unit.reshape(cores[k].shape)
        columns.append(naive_contraction(trial).reshape(-1))
    design = torch.stack(columns, dim=1)
    reference = torch.linalg.lstsq(design, x.reshape(-1, 1)).solution.reshape(cores[k].shape)
    torch.testing.assert_close(new, reference, rtol=1e-8, atol=1e-10)
    trial = list(cores)
    trial[k] = new
    sq_error = float(torch.sum((x - naive_contraction(trial)) ** 2))
    assert abs(float(torch.sum(x**2)) + offset - sq_error) < 1e-8 * float(torch.sum(x**2))


def test_environment_rows_are_core_bonds_and_the_shared_rest_gives_the_same():
    cores = random_network((4, 5, 6), {(0, 1): 2, (1, 2): 3}, seed=3)
    env = environment(cores, 1)
    assert env.shape == (2 * 3, 4 * 6)
    cores = random_network((3, 4, 5, 3, 4), TRIANGLE_CHAIN, seed=4)
    for i, j in [(0, 1), (2, 3), (1, 4), (4, 0)]:
        rest = rest_of_pair(cores, i, j)
        torch.testing.assert_close(environment(cores, i, j, rest), environment(cores, i), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(environment(cores, j, i, rest), environment(cores, j), rtol=1e-12, atol=1e-12)


def test_growing_a_bond_leaves_the_network_unchanged_and_als_never_raises_the_error():
    x = planted_tt((5, 6, 7), (2, 3), seed=4)
    cores = random_network((5, 6, 7), {(0, 1): 1}, seed=5)
    before = naive_contraction(cores)
    grown = grow(cores, 0, 1, generator(0))
    assert grown[0].shape[1] == 2 and grown[1].shape[0] == 2
    torch.testing.assert_close(naive_contraction(grown), before)
    sq_norm = float(torch.sum(x**2))
    errors = [als(x, grown, sq_norm, 1, stop_rtol=0.0) for _ in range(5)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert abs(errors[-1] - rel_err(naive_contraction(grown), x)) < 1e-10


# ----------------------------------------------------------------------------- structure search


@pytest.mark.parametrize("seed", range(5))
def test_search_recovers_a_planted_train(seed):
    # a 6^4 train of ranks (2, 3, 2): the search finds the chain, no larger, at error < 1e-4 (all five seeds)
    x = planted_tt((6, 6, 6, 6), (2, 3, 2), seed=seed)
    net = tn(x, tol=1e-4, seed=seed)
    planted = 6 * (1 * 2 + 2 * 3 + 3 * 2 + 2 * 1)
    assert net.relative_error(x) < 1e-4
    assert net.num_params <= planted
    assert set(net.edges) == {(0, 1), (1, 2), (2, 3)}


def test_search_log_and_budget():
    x = planted_tt((5, 6, 7, 4), (3, 4, 2), seed=6)
    net = tn(x, max_params=120, seed=0)
    assert net.num_params <= 120
    steps = net.log
    assert steps[0].params == 5 + 6 + 7 + 4  # the rank-one start
    assert [s.params for s in steps] == sorted(s.params for s in steps)
    assert all(b.error <= a.error + 1e-9 for a, b in zip(steps, steps[1:]))
    assert steps[-1].params == net.num_params and abs(steps[-1].error - net.relative_error(x)) < 1e-6
    assert steps[-1].ranks == net.ranks


def test_search_is_deterministic_and_bounded():
    x = randn(4, 5, 6, gen=generator(7))
    a, b = tn(x, max_steps=3, seed=1), tn(x, max_steps=3, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.cores, b.cores))
    assert len(a.log) <= 4
    # a time limit already spent lets no step start: only the rank-one fit is logged
    assert len(tn(randn(6, 6, 6, 6, gen=generator(8)), time_limit=1e-9).log) == 1


def test_dispatch_and_dtype():
    x = planted_tt((5, 6, 7), (2, 3), seed=9).float()
    net = lowrank.decompose(x, "tn", tol=1e-3)
    assert isinstance(net, TensorNetwork) and net.dtype == torch.float32
    assert net.relative_error(x) < 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_params": 10}, "max_params=10 is below the 18 parameters of the rank-one network"),
        ({"tol": 1.5}, "tol must be a relative error in the open interval"),
        ({"time_limit": 0}, "time_limit must be a positive number of seconds, got 0"),
        ({"max_steps": -1}, "max_steps must be an integer >= 0, got -1"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tn(randn(5, 6, 7, gen=generator(0)), **kwargs)
