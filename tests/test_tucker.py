import math

import pytest
import torch
from conftest import (
    add_noise,
    assert_orthonormal_columns,
    generator,
    planted_tucker,
    randn,
    rel_err,
    singular_values,
    smallest_rank_for_tol,
    unfold,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.decompose import Tucker, tucker

# ----------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("method", ["hosvd", "hooi"])
@pytest.mark.parametrize(
    ("shape", "ranks"),
    [((8, 9, 10), (3, 4, 5)), ((10, 4, 7), (2, 4, 3)), ((5, 6, 7, 4), (2, 3, 2, 3)), ((20, 15), (4, 4))],
)
def test_exact_recovery_full(method, shape, ranks):
    x = planted_tucker(shape, ranks, seed=0)
    f = tucker(x, ranks, method=method)
    assert isinstance(f, Tucker)
    assert f.ranks == tuple(ranks)
    assert f.modes == tuple(range(len(shape)))
    assert tuple(f.core.shape) == tuple(ranks)
    assert f.shape == tuple(shape)
    assert rel_err(f.to_tensor(), x) < 1e-5
    assert f.relative_error(x) < 1e-5
    for factor, n, r in zip(f.factors, shape, ranks):
        assert factor.shape == (n, r)
        assert_orthonormal_columns(factor, atol=1e-8)


@pytest.mark.parametrize("method", ["hosvd", "hooi"])
@pytest.mark.parametrize(
    ("shape", "modes", "ranks"),
    [
        ((8, 9, 4, 3), (0, 1), (3, 4)),  # Tucker-2 of a conv kernel
        ((6, 7, 8), (1, 2), (2, 3)),
        ((6, 7, 8), (0, 2), (4, 3)),
        ((6, 7, 8), (1,), (3,)),
    ],
)
def test_exact_recovery_partial(method, shape, modes, ranks):
    x = planted_tucker(shape, ranks, seed=1, modes=modes)
    f = tucker(x, ranks, modes=modes, method=method)
    assert f.modes == tuple(modes)
    assert f.ranks == tuple(ranks)
    expected_core = list(shape)
    for m, r in zip(modes, ranks):
        expected_core[m] = r
    assert tuple(f.core.shape) == tuple(expected_core)
    assert len(f.factors) == len(modes)
    assert f.shape == tuple(shape)
    assert f.relative_error(x) < 1e-5
    for factor in f.factors:
        assert_orthonormal_columns(factor, atol=1e-8)


def test_partial_modes_as_int_and_negative():
    x = planted_tucker((6, 7, 8), (3,), seed=2, modes=(2,))
    f_int = tucker(x, 3, modes=2)
    f_neg = tucker(x, 3, modes=(-1,))
    assert f_int.modes == (2,) and f_neg.modes == (2,)
    assert f_int.relative_error(x) < 1e-5 and f_neg.relative_error(x) < 1e-5


@pytest.mark.parametrize("seed", range(3))
def test_hooi_random_init_recovers(seed):
    x = planted_tucker((8, 9, 10), (3, 4, 2), seed=seed)
    f = tucker(x, (3, 4, 2), method="hooi", init="random", seed=seed, stop_tol=1e-12, n_iter_max=200)
    assert f.relative_error(x) < 1e-5


def test_num_params_and_relative_error():
    x = add_noise(planted_tucker((8, 9, 10), (3, 4, 5), seed=3), 0.1, seed=4)
    f = tucker(x, (3, 4, 5))
    assert f.num_params == 3 * 4 * 5 + 8 * 3 + 9 * 4 + 10 * 5
    assert math.isclose(f.relative_error(x), rel_err(f.to_tensor(), x), rel_tol=1e-9)
    # the factors are orthonormal, so the error follows from the core's norm
    x_norm, core_norm = float(torch.linalg.norm(x)), float(torch.linalg.norm(f.core))
    assert math.isclose(f.relative_error(x), math.sqrt(1 - core_norm**2 / x_norm**2), rel_tol=1e-6)


def test_hooi_not_worse_than_hosvd():
    x = add_noise(planted_tucker((10, 11, 12), (3, 4, 5), seed=5), 0.3, seed=6)
    hosvd = tucker(x, (3, 4, 5), method="hosvd").relative_error(x)
    hooi = tucker(x, (3, 4, 5), method="hooi", stop_tol=1e-10).relative_error(x)
    assert hooi <= hosvd + 1e-12


def test_reconstruction_matches_independent_contraction():
    x = add_noise(planted_tucker((6, 7, 8), (2, 3, 4), seed=7), 0.2, seed=8)
    f = tucker(x, (2, 3, 4))
    rebuilt = torch.einsum("abc,ia,jb,kc->ijk", f.core, *f.factors)
    torch.testing.assert_close(f.to_tensor(), rebuilt)


# ----------------------------------------------------------------------------- tol


def _necessary_ranks(x, modes, tol):
    """Any Tucker model with error <= tol needs, along each mode, at least the rank SVD needs on its unfolding."""
    return [smallest_rank_for_tol(singular_values(unfold(x, m)), tol) for m in modes]


def _st_hosvd_bound(x, modes, tol):
    """ST-HOSVD with an equal share of tol**2 per mode never needs more than this rank."""
    share = tol / math.sqrt(len(modes))
    return [smallest_rank_for_tol(singular_values(unfold(x, m)), share) for m in modes]


@pytest.mark.parametrize("method", ["hosvd", "hooi"])
@pytest.mark.parametrize("modes", [None, (0, 1), (1, 2)])
@settings(max_examples=15, deadline=None)
@given(tol=st.floats(0.02, 0.9), seed=st.integers(0, 1000))
def test_tol_error_guarantee(method, modes, tol, seed):
    x = add_noise(planted_tucker((8, 9, 10), (3, 4, 5), seed=seed), 0.2, seed=seed + 1)
    f = tucker(x, tol=tol, modes=modes, method=method)
    assert f.relative_error(x) <= tol
    used_modes = range(x.ndim) if modes is None else modes
    lower = _necessary_ranks(x, used_modes, tol)
    upper = _st_hosvd_bound(x, used_modes, tol)
    for r, lo, hi in zip(f.ranks, lower, upper):
        assert lo <= r <= hi, (f.ranks, lower, upper)


@pytest.mark.parametrize("method", ["hosvd", "hooi"])
def test_tol_on_exactly_low_rank_tensor_finds_true_ranks(method):
    x = planted_tucker((8, 9, 10), (3, 4, 5), seed=9)
    f = tucker(x, tol=1e-6, method=method)
    assert f.ranks == (3, 4, 5)
    assert f.relative_error(x) < 1e-6


def test_tol_with_rank_cap():
    x = add_noise(planted_tucker((8, 9, 10), (3, 4, 5), seed=10), 0.05, seed=11)
    free = tucker(x, tol=0.01)
    assert free.ranks[0] > 2
    capped = tucker(x, (2, 9, 10), tol=0.01)
    assert capped.ranks[0] == 2
    assert all(c <= f for c, f in zip(capped.ranks, free.ranks))


# ----------------------------------------------------------------------------- tensorly agreement


def _tl_error(tl, core, factors, x, modes=None):
    from tensorly.tenalg import multi_mode_dot

    rebuilt = multi_mode_dot(core, factors, modes=modes) if modes is not None else tl.tucker_to_tensor((core, factors))
    return rel_err(rebuilt, x)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(("shape", "ranks"), [((8, 9, 10), (3, 4, 5)), ((6, 7, 8, 5), (2, 3, 3, 2))])
def test_tucker_agrees_with_tensorly(tl_torch, seed, shape, ranks):
    from tensorly.decomposition import tucker as tl_tucker

    x = add_noise(planted_tucker(shape, ranks, seed=seed), 0.3, seed=seed + 100)
    core, factors = tl_tucker(x, rank=list(ranks), init="svd", n_iter_max=100, tol=1e-8)
    theirs = _tl_error(tl_torch, core, factors, x)
    ours = tucker(x, ranks, stop_tol=1e-8).relative_error(x)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


@pytest.mark.parametrize("seed", range(2))
def test_partial_tucker_agrees_with_tensorly(tl_torch, seed):
    from tensorly.decomposition import partial_tucker

    x = add_noise(planted_tucker((8, 9, 4, 3), (3, 4), seed=seed, modes=(0, 1)), 0.3, seed=seed + 200)
    (core, factors), _ = partial_tucker(x, rank=[3, 4], modes=[0, 1], init="svd", n_iter_max=100, tol=1e-8)
    theirs = _tl_error(tl_torch, core, factors, x, modes=[0, 1])
    ours = tucker(x, (3, 4), modes=(0, 1), stop_tol=1e-8).relative_error(x)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


def test_random_gaussian_tensor_agrees_with_tensorly(tl_torch):
    from tensorly.decomposition import tucker as tl_tucker

    x = randn(7, 8, 9, gen=generator(12))
    core, factors = tl_tucker(x, rank=[3, 3, 3], init="svd", n_iter_max=200, tol=1e-10)
    theirs = _tl_error(tl_torch, core, factors, x)
    ours = tucker(x, 3, stop_tol=1e-10, n_iter_max=200).relative_error(x)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


def test_relative_stopping_rule_trades_little_error_for_many_sweeps():
    # far from low rank, HOOI keeps gaining a little per sweep; stop_rtol stops it once a sweep
    # gains under 0.1% of the error, which must leave the error within 1% of running on
    x = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    default = tucker(x, (16, 16), modes=(0, 1)).relative_error(x)
    longer = tucker(x, (16, 16), modes=(0, 1), stop_rtol=0.0, stop_tol=1e-7, n_iter_max=500).relative_error(x)
    hosvd = tucker(x, (16, 16), modes=(0, 1), method="hosvd").relative_error(x)
    assert longer <= default < hosvd
    assert default <= 1.01 * longer
