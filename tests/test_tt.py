import math

import pytest
import torch
from conftest import (
    add_noise,
    assert_orthonormal_columns,
    generator,
    planted_tt,
    randn,
    random_tt_cores,
    rel_err,
    singular_values,
    smallest_rank_for_tol,
    tt_bond_bounds,
    tt_to_tensor,
    tt_unfolding,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.decompose import TT, TTMatrix, tt, tt_matrix, tt_round

# ----------------------------------------------------------------------------- tt: exact recovery


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [
        ((4, 5, 6, 7), (3, 4, 3)),
        ((8, 9, 10), (3, 5)),
        ((3, 4, 5, 3, 4), (2, 3, 3, 2)),
        ((12, 15), (4,)),
        ((50, 50, 50), (2, 3)),  # ranks small against the unfoldings: exercises the randomized range finder
    ],
)
def test_exact_recovery(shape, ranks):
    x = planted_tt(shape, ranks, seed=0)
    f = tt(x, ranks)
    assert isinstance(f, TT)
    assert f.ranks == (1, *ranks, 1)
    assert f.shape == tuple(shape)
    for k, core in enumerate(f.cores):
        assert core.shape == (f.ranks[k], shape[k], f.ranks[k + 1])
    assert rel_err(f.to_tensor(), x) < 1e-5
    assert f.relative_error(x) < 1e-5
    torch.testing.assert_close(f.to_tensor(), tt_to_tensor(f.cores))


def test_rank_forms_are_equivalent():
    shape, ranks = (4, 5, 6, 7), (3, 3, 3)
    x = planted_tt(shape, ranks, seed=1)
    results = [tt(x, 3), tt(x, [3, 3, 3]), tt(x, (1, 3, 3, 3, 1))]
    for f in results:
        assert f.ranks == (1, 3, 3, 3, 1)
        assert f.relative_error(x) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(results[0].cores, results[1].cores))
    assert all(torch.equal(a, b) for a, b in zip(results[0].cores, results[2].cores))


def test_rank_int_is_every_bond_and_bounds_are_respected():
    x = randn(2, 3, 4, 5, gen=generator(2))
    f = tt(x, tuple(tt_bond_bounds(x.shape)))  # the largest ranks: an exact train
    assert f.ranks == (1, 2, 6, 5, 1)
    assert f.relative_error(x) < 1e-10


def test_container_properties():
    x = planted_tt((4, 5, 6, 7), (3, 4, 3), seed=21)
    f = tt(x, (3, 4, 3))
    assert f.num_params == 1 * 4 * 3 + 3 * 5 * 4 + 4 * 6 * 3 + 3 * 7 * 1
    assert f.dtype == torch.float64 and f.device == x.device
    assert math.isclose(f.relative_error(x), rel_err(f.to_tensor(), x), rel_tol=1e-6, abs_tol=1e-14)
    w = randn(24, 30, gen=generator(22))
    g = tt_matrix(w, (2, 3, 4), (3, 5, 2), (5, 7))
    assert g.ranks == (1, 5, 7, 1)
    assert g.num_params == 1 * 2 * 3 * 5 + 5 * 3 * 5 * 7 + 7 * 4 * 2 * 1
    assert g.dtype == torch.float64


def test_left_cores_are_orthonormal():
    x = add_noise(planted_tt((4, 5, 6, 7), (3, 4, 3), seed=3), 0.1, seed=4)
    f = tt(x, (3, 4, 3))
    for core in f.cores[:-1]:
        assert_orthonormal_columns(core.reshape(-1, core.shape[-1]), atol=1e-8)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_fixed_rank_error_matches_tt_svd_reference(rank):
    # a plain TT-SVD built from torch.linalg.svd: the same algorithm, so the same error
    x = randn(5, 6, 7, 4, gen=generator(5))
    remainder, cores, r_left = x, [], 1
    for k in range(x.ndim - 1):
        mat = remainder.reshape(r_left * x.shape[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(rank, *mat.shape)
        cores.append(u[:, :r].reshape(r_left, x.shape[k], r))
        remainder, r_left = s[:r, None] * vh[:r], r
    cores.append(remainder.reshape(r_left, x.shape[-1], 1))
    reference = rel_err(tt_to_tensor(cores), x)
    ours = tt(x, rank, clip=True).relative_error(x)
    assert math.isclose(ours, reference, rel_tol=1e-6), (ours, reference)


# ----------------------------------------------------------------------------- tt: tol


def _bond_rank_bounds(x, tol):
    """Necessary rank of each bond for error <= tol, and the TT-SVD equal-share bound."""
    n_bonds = x.ndim - 1
    lower, upper = [], []
    for k in range(1, x.ndim):
        s = singular_values(tt_unfolding(x, k))
        lower.append(smallest_rank_for_tol(s, tol))
        upper.append(smallest_rank_for_tol(s, tol / math.sqrt(n_bonds)))
    return lower, upper


@settings(max_examples=20, deadline=None)
@given(tol=st.floats(0.01, 0.95), seed=st.integers(0, 1000), noise=st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_tol_error_guarantee(tol, seed, noise):
    x = planted_tt((4, 5, 6, 5), (3, 4, 3), seed=seed)
    if noise:
        x = add_noise(x, noise, seed=seed + 1)
    f = tt(x, tol=tol)
    assert f.relative_error(x) <= tol
    lower, upper = _bond_rank_bounds(x, tol)
    for r, lo, hi in zip(f.ranks[1:-1], lower, upper):
        assert lo <= r <= hi, (f.ranks, lower, upper)


def test_tol_on_exactly_low_rank_tensor_finds_true_ranks():
    x = planted_tt((4, 5, 6, 7), (3, 4, 3), seed=6)
    f = tt(x, tol=1e-6)
    assert f.ranks == (1, 3, 4, 3, 1)
    assert f.relative_error(x) < 1e-6


def test_tol_with_rank_cap():
    x = add_noise(planted_tt((4, 5, 6, 7), (3, 4, 3), seed=7), 0.01, seed=8)
    free = tt(x, tol=0.005)
    assert free.ranks[2] > 2
    capped = tt(x, 2, tol=0.005)
    assert max(capped.ranks) <= 2
    assert capped.relative_error(x) >= free.relative_error(x)


# ----------------------------------------------------------------------------- tt_round


def tt_sum_cores(a, b):
    """Cores of the train representing ``a + b`` (ranks add), built by block concatenation."""
    n = len(a)
    out = []
    for k, (ca, cb) in enumerate(zip(a, b)):
        if k == 0:
            out.append(torch.cat([ca, cb], dim=2))
        elif k == n - 1:
            out.append(torch.cat([ca, cb], dim=0))
        else:
            ra0, dim, ra1 = ca.shape
            rb0, _, rb1 = cb.shape
            core = torch.zeros(ra0 + rb0, dim, ra1 + rb1, dtype=ca.dtype)
            core[:ra0, :, :ra1] = ca
            core[ra0:, :, ra1:] = cb
            out.append(core)
    return out


def _gauge(cores, seed):
    """The same tensor with every bond transformed by a random invertible matrix."""
    gen = generator(seed)
    cores = [c.clone() for c in cores]
    for k in range(len(cores) - 1):
        r = cores[k].shape[-1]
        g = randn(r, r, gen=gen) + 3 * torch.eye(r, dtype=torch.float64)
        cores[k] = torch.tensordot(cores[k], g, dims=1)
        cores[k + 1] = torch.tensordot(torch.linalg.inv(g), cores[k + 1], dims=1)
    return cores


@pytest.mark.parametrize(
    ("shape", "ranks"), [((4, 5, 6, 7), (2, 3, 2)), ((6, 7, 8), (3, 4)), ((3, 4, 5, 4, 3), (2, 3, 3, 2))]
)
def test_round_redundant_sum_back_to_true_ranks(shape, ranks):
    cores = random_tt_cores(shape, ranks, seed=9)
    other = _gauge(cores, seed=10)  # different cores, same tensor: the sum has redundant ranks
    redundant = TT(tuple(tt_sum_cores(cores, other)))
    assert redundant.ranks == (1, *(2 * r for r in ranks), 1)
    target = 2 * tt_to_tensor(cores)
    assert rel_err(redundant.to_tensor(), target) < 1e-10

    by_rank = tt_round(redundant, ranks)
    assert isinstance(by_rank, TT)
    assert by_rank.ranks == (1, *ranks, 1)
    assert by_rank.relative_error(target) < 1e-5

    by_tol = tt_round(redundant, tol=1e-8)
    assert by_tol.ranks == (1, *ranks, 1)
    assert by_tol.relative_error(target) < 1e-5


def test_round_sum_of_independent_trains_keeps_their_sum():
    shape = (4, 5, 6, 5)
    a, b = random_tt_cores(shape, (2, 2, 2), seed=11), random_tt_cores(shape, (1, 2, 1), seed=12)
    total = TT(tuple(tt_sum_cores(a, b)))
    rounded = tt_round(total, tol=1e-8)
    assert rounded.ranks == (1, 3, 4, 3, 1)
    assert rounded.relative_error(tt_to_tensor(a) + tt_to_tensor(b)) < 1e-5


@settings(max_examples=15, deadline=None)
@given(tol=st.floats(0.01, 0.9), seed=st.integers(0, 1000))
def test_round_tol_error_guarantee(tol, seed):
    x = add_noise(planted_tt((4, 5, 6, 5), (2, 3, 2), seed=seed), 0.3, seed=seed + 1)
    full = tt(x, tuple(tt_bond_bounds(x.shape)))
    rounded = tt_round(full, tol=tol)
    assert rounded.relative_error(full.to_tensor()) <= tol
    assert all(r <= q for r, q in zip(rounded.ranks, full.ranks))
    lower, upper = _bond_rank_bounds(full.to_tensor(), tol)
    for r, lo, hi in zip(rounded.ranks[1:-1], lower, upper):
        assert lo <= r <= hi, (rounded.ranks, lower, upper)


def test_round_to_lower_rank_matches_tt_svd():
    x = add_noise(planted_tt((4, 5, 6, 5), (3, 4, 3), seed=13), 0.2, seed=14)
    full = tt(x, tuple(tt_bond_bounds(x.shape)))
    rounded = tt_round(full, 2)
    assert rounded.ranks == (1, 2, 2, 2, 1)
    direct = tt(x, 2)
    assert math.isclose(rounded.relative_error(x), direct.relative_error(x), rel_tol=1e-6)


def test_round_never_raises_rank_above_input():
    x = planted_tt((4, 5, 6), (2, 3), seed=15)
    train = tt(x, (2, 3))
    rounded = tt_round(train, 4)
    assert all(r <= q for r, q in zip(rounded.ranks, train.ranks))
    assert rounded.relative_error(x) < 1e-5


# ----------------------------------------------------------------------------- tt_matrix


def kron_sum(terms):
    """Sum of Kronecker products: a matrix with small TT-matrix ranks, built independently of lowrank."""
    total = None
    for factors in terms:
        k = factors[0]
        for f in factors[1:]:
            k = torch.kron(k, f)
        total = k if total is None else total + k
    return total


@pytest.mark.parametrize(
    ("row_shape", "col_shape", "n_terms"),
    [((2, 3, 4), (3, 2, 5), 2), ((4, 4), (5, 3), 3), ((3, 2, 2, 3), (2, 3, 2, 2), 2)],
)
def test_tt_matrix_exact_recovery(row_shape, col_shape, n_terms):
    gen = generator(16)
    terms = [[randn(m, n, gen=gen) for m, n in zip(row_shape, col_shape)] for _ in range(n_terms)]
    w = kron_sum(terms)
    assert w.shape == (math.prod(row_shape), math.prod(col_shape))
    f = tt_matrix(w, row_shape, col_shape, n_terms)
    assert isinstance(f, TTMatrix)
    assert f.row_shape == tuple(row_shape) and f.col_shape == tuple(col_shape)
    assert f.ranks == (1, *([n_terms] * (len(row_shape) - 1)), 1)
    for k, core in enumerate(f.cores):
        assert core.shape == (f.ranks[k], row_shape[k], col_shape[k], f.ranks[k + 1])
    assert f.to_matrix().shape == w.shape
    assert rel_err(f.to_matrix(), w) < 1e-5
    # to_tensor is the matrix reshaped to (m_1..m_d, n_1..n_d)
    assert f.shape == (*row_shape, *col_shape)
    torch.testing.assert_close(f.to_tensor(), f.to_matrix().reshape(*row_shape, *col_shape))
    assert rel_err(f.to_tensor(), w.reshape(*row_shape, *col_shape)) < 1e-5


def test_tt_matrix_rank_one_is_kronecker_product():
    gen = generator(17)
    a, b = randn(3, 4, gen=gen), randn(5, 2, gen=gen)
    f = tt_matrix(torch.kron(a, b), (3, 5), (4, 2), 1)
    assert f.ranks == (1, 1, 1)
    assert rel_err(f.to_matrix(), torch.kron(a, b)) < 1e-10
    # the first core is a multiple of a, the second of b
    core_a, core_b = f.cores[0][0, :, :, 0], f.cores[1][0, :, :, 0]
    assert rel_err(core_a * (a.norm() / core_a.norm()) * torch.sign(core_a[0, 0] * a[0, 0]), a) < 1e-8
    assert rel_err(core_b * (b.norm() / core_b.norm()) * torch.sign(core_b[0, 0] * b[0, 0]), b) < 1e-8


@settings(max_examples=10, deadline=None)
@given(tol=st.floats(0.01, 0.9), seed=st.integers(0, 1000))
def test_tt_matrix_tol_error_guarantee(tol, seed):
    w = randn(24, 30, gen=generator(seed))
    f = tt_matrix(w, (2, 3, 4), (3, 5, 2), tol=tol)
    assert rel_err(f.to_matrix(), w) <= tol
    assert f.relative_error(w.reshape(2, 3, 4, 3, 5, 2)) <= tol


# ----------------------------------------------------------------------------- tensorly agreement


@pytest.mark.parametrize(
    ("shape", "ranks", "noise"),
    [((5, 6, 7, 8), (3, 4, 3), 0.1), ((5, 6, 7, 8), (3, 4, 3), None), ((9, 10, 11), (4, 5), 0.3)],
)
def test_tt_agrees_with_tensorly(tl_torch, shape, ranks, noise):
    from tensorly.decomposition import tensor_train

    x = randn(*shape, gen=generator(18)) if noise is None else add_noise(planted_tt(shape, ranks, seed=19), noise, 20)
    theirs = rel_err(tl_torch.tt_to_tensor(tensor_train(x, [1, *ranks, 1])), x)
    ours = tt(x, ranks).relative_error(x)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)
