import math

import pytest
import torch
from conftest import add_noise, cp_to_tensor, planted_cp, rel_err

from lowrank.decompose import CP, cp

# ----------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("shape", "rank"), [((8, 9, 10), 3), ((6, 7, 8, 5), 4), ((10, 12), 3)])
def test_exact_recovery_svd_init(shape, rank, seed):
    x = planted_cp(shape, rank, seed=seed)
    f = cp(x, rank, init="svd", n_iter_max=500, stop_tol=1e-10)
    assert isinstance(f, CP)
    assert f.rank == rank and f.ranks == (rank,)
    assert f.shape == tuple(shape)
    assert f.weights.shape == (rank,)
    assert [tuple(a.shape) for a in f.factors] == [(n, rank) for n in shape]
    assert rel_err(f.to_tensor(), x) < 1e-5
    assert f.relative_error(x) < 1e-5


@pytest.mark.parametrize("seed", [1, 2])
def test_exact_recovery_random_init(seed):
    x = planted_cp((6, 7, 8, 5), 4, seed=seed)
    f = cp(x, 4, init="random", seed=seed, n_iter_max=1000, stop_tol=1e-14)
    assert f.relative_error(x) < 1e-5


def test_rank_above_dimension_is_allowed_for_cp():
    # CP rank may exceed every dimension of the tensor (here 5 > 4 and 5 > 3)
    x = planted_cp((4, 3, 5), 5, seed=3)
    f = cp(x, 5, n_iter_max=50)
    assert f.rank == 5
    assert math.isfinite(f.relative_error(x))


def test_reconstruction_matches_independent_contraction():
    x = add_noise(planted_cp((5, 6, 7), 3, seed=4), 0.1, seed=5)
    f = cp(x, 3, normalize=True, n_iter_max=10)
    torch.testing.assert_close(f.to_tensor(), cp_to_tensor(list(f.factors), f.weights))
    assert f.num_params == 3 + 3 * (5 + 6 + 7)
    assert math.isclose(f.relative_error(x), rel_err(f.to_tensor(), x), rel_tol=1e-9)


# ----------------------------------------------------------------------------- options


def test_normalize_gives_unit_columns_and_same_model():
    x = add_noise(planted_cp((8, 9, 10), 3, seed=6), 0.05, seed=7)
    plain = cp(x, 3)
    normed = cp(x, 3, normalize=True)
    for factor in normed.factors:
        torch.testing.assert_close(torch.linalg.vector_norm(factor, dim=0), torch.ones(3, dtype=torch.float64))
    # the scale went into the weights, and the represented tensor is unchanged
    assert not torch.allclose(normed.weights, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(normed.to_tensor(), plain.to_tensor())
    assert math.isclose(normed.relative_error(x), plain.relative_error(x), rel_tol=1e-9)


def test_tol_stops_at_first_sweep_meeting_it():
    x = planted_cp((6, 7, 8, 5), 4, seed=1)
    runs = {}
    for tol in (0.3, 0.05, 1e-3):
        # first sweep count whose (actual) error meets tol
        sweeps = next(
            n for n in range(1, 200) if cp(x, 4, init="random", n_iter_max=n, stop_tol=0).relative_error(x) <= tol
        )
        runs[tol] = sweeps
        early = cp(x, 4, init="random", n_iter_max=500, stop_tol=0, tol=tol)
        assert early.relative_error(x) <= tol
        reference = cp(x, 4, init="random", n_iter_max=sweeps, stop_tol=0)
        for a, b in zip(early.factor_tensors, reference.factor_tensors):
            torch.testing.assert_close(a, b)
    # the tolerances really stop the runs at different points, well before convergence
    assert runs[0.3] <= runs[0.05] <= runs[1e-3]
    assert runs[0.3] < runs[1e-3]
    assert cp(x, 4, init="random", n_iter_max=500, stop_tol=0, tol=0.3).relative_error(x) > 1e-3


def test_noisy_tol_reachable():
    x = add_noise(planted_cp((8, 9, 10), 3, seed=8), 0.01, seed=9)
    f = cp(x, 3, tol=0.05)
    assert f.relative_error(x) <= 0.05


# ----------------------------------------------------------------------------- determinism


def test_random_init_same_seed_is_deterministic():
    x = add_noise(planted_cp((6, 7, 8), 3, seed=10), 0.1, seed=11)
    f1 = cp(x, 3, init="random", seed=42, n_iter_max=5)
    f2 = cp(x, 3, init="random", seed=42, n_iter_max=5)
    assert all(torch.equal(a, b) for a, b in zip(f1.factor_tensors, f2.factor_tensors))
    f3 = cp(x, 3, init="random", seed=43, n_iter_max=5)
    assert not torch.equal(f1.factors[0], f3.factors[0])


def test_random_init_deterministic_in_float32():
    x = add_noise(planted_cp((6, 7, 8), 3, seed=12), 0.1, seed=13).float()
    f1 = cp(x, 3, init="random", seed=7, n_iter_max=20)
    f2 = cp(x, 3, init="random", seed=7, n_iter_max=20)
    assert all(torch.equal(a, b) for a, b in zip(f1.factor_tensors, f2.factor_tensors))


# ----------------------------------------------------------------------------- tensorly agreement


@pytest.mark.parametrize(("shape", "rank", "seed"), [((8, 9, 10), 3, 0), ((8, 9, 10), 3, 1), ((6, 7, 8, 5), 3, 0)])
def test_final_error_agrees_with_tensorly_parafac(tl_torch, shape, rank, seed):
    from tensorly.decomposition import parafac

    x = add_noise(planted_cp(shape, rank, seed=seed), 0.05, seed=seed + 50)
    theirs_cp = parafac(x, rank, init="svd", n_iter_max=100, tol=1e-8)
    theirs = rel_err(tl_torch.cp_to_tensor(theirs_cp), x)
    ours = cp(x, rank, init="svd", n_iter_max=100, stop_tol=1e-8).relative_error(x)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)
