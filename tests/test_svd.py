import math

import pytest
import torch
from conftest import (
    F64,
    assert_orthonormal_columns,
    decaying_matrix,
    generator,
    low_rank_matrix,
    matrix_with_spectrum,
    randn,
    rel_err,
    singular_values,
    smallest_rank_for_tol,
    tail_errors,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lowrank.decompose import SVD, svd

ALL_METHODS = ["exact", "gram", "randomized", "auto"]


# ----------------------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("shape", [(40, 25), (25, 40), (30, 30), (120, 90)])
def test_exact_recovery_of_low_rank_matrix(method, shape):
    rank = 5
    a = low_rank_matrix(*shape, rank, seed=1)
    f = svd(a, rank, method=method)
    assert isinstance(f, SVD)
    assert f.rank == rank and f.ranks == (rank,)
    assert f.u.shape == (shape[0], rank) and f.s.shape == (rank,) and f.vh.shape == (rank, shape[1])
    assert f.shape == shape
    assert rel_err(f.to_tensor(), a) < 1e-5
    assert f.relative_error(a) < 1e-5
    # factors are a genuine SVD: orthonormal vectors, the reference singular values in decreasing order
    assert_orthonormal_columns(f.u, atol=1e-8)
    assert_orthonormal_columns(f.vh.T, atol=1e-8)
    torch.testing.assert_close(f.s, singular_values(a)[:rank], rtol=1e-8, atol=0)
    assert bool(torch.all(f.s[:-1] >= f.s[1:]))


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_rank_above_true_rank_still_exact(method):
    a = low_rank_matrix(30, 20, 3, seed=2)
    f = svd(a, 8, method=method)
    assert f.rank == 8
    assert f.relative_error(a) < 1e-5
    assert float(f.s[3:].abs().max()) < 1e-8 * float(f.s[0])


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_full_rank_reconstructs_exactly(method):
    a = randn(12, 17, gen=generator(3))
    f = svd(a, 12, method=method)
    assert f.relative_error(a) < 1e-10


def test_container_properties():
    a = low_rank_matrix(30, 20, 4, seed=4)
    f = svd(a, 4)
    assert f.num_params == 30 * 4 + 4 + 4 * 20
    assert f.dtype == torch.float64
    assert f.device == a.device
    expected = float(torch.linalg.norm(a - f.u @ torch.diag(f.s) @ f.vh) / torch.linalg.norm(a))
    assert math.isclose(f.relative_error(a), expected, rel_tol=1e-9, abs_tol=1e-15)


# ----------------------------------------------------------------------------- Eckart–Young


@st.composite
def matrices_and_ranks(draw):
    """A float64 matrix ``U diag(s) V^T`` with a drawn spectrum (zeros and ties allowed) and a rank."""
    m = draw(st.integers(2, 40))
    n = draw(st.integers(2, 40))
    k = min(m, n)
    s = draw(
        st.lists(st.one_of(st.just(0.0), st.just(1.0), st.floats(1e-3, 10.0, allow_nan=False)), min_size=k, max_size=k)
    )
    assume(max(s) > 0)
    seed = draw(st.integers(0, 2**31 - 1))
    rank = draw(st.integers(1, k))
    return matrix_with_spectrum(m, n, sorted(s, reverse=True), seed), rank


@pytest.mark.parametrize("method", ["exact", "gram"])
@settings(max_examples=30, deadline=None)
@given(case=matrices_and_ranks())
def test_eckart_young_optimal_error(method, case):
    a, rank = case
    s_ref = singular_values(a)
    optimal = float(torch.sqrt(torch.sum(s_ref[rank:] ** 2)) / torch.linalg.norm(a))
    f = svd(a, rank, method=method)
    assert f.rank == rank
    err = rel_err(f.to_tensor(), a)
    assert math.isclose(err, optimal, rel_tol=1e-6, abs_tol=1e-9), (err, optimal)
    torch.testing.assert_close(f.s, s_ref[:rank], rtol=0, atol=1e-9 * float(s_ref[0]))


@pytest.mark.parametrize("method", ["exact", "gram"])
@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 40), n=st.integers(2, 40), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_eckart_young_gaussian(method, m, n, seed, data):
    rank = data.draw(st.integers(1, min(m, n)), label="rank")
    a = randn(m, n, gen=generator(seed))
    optimal = float(tail_errors(singular_values(a))[rank])
    err = svd(a, rank, method=method).relative_error(a)
    assert math.isclose(err, optimal, rel_tol=1e-6, abs_tol=1e-9), (err, optimal)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("shape", "rank", "decay"), [((200, 150), 10, 0.8), ((150, 200), 20, 0.9), ((300, 80), 5, 0.7)]
)
def test_randomized_near_optimal_on_decaying_spectrum(shape, rank, decay, seed):
    a = decaying_matrix(*shape, decay, seed=seed)
    optimal = float(tail_errors(singular_values(a))[rank])
    for n_iter in (2, 4):  # the default number of power iterations, and the current one
        f = svd(a, rank, method="randomized", seed=seed, n_iter=n_iter)
        assert f.rank == rank
        assert f.relative_error(a) <= 1.01 * optimal, n_iter
    # the default options too
    assert svd(a, rank, method="randomized", seed=seed).relative_error(a) <= 1.01 * optimal


def test_randomized_with_zero_power_iterations_still_recovers_low_rank():
    a = low_rank_matrix(100, 80, 6, seed=5)
    assert svd(a, 6, method="randomized", n_iter=0, n_oversamples=5).relative_error(a) < 1e-8


# ----------------------------------------------------------------------------- tol


def _spectrum_case(seed: int) -> torch.Tensor:
    # slowly decaying spectrum so that many tolerances select distinct ranks
    return matrix_with_spectrum(40, 30, 0.85 ** torch.arange(30, dtype=F64), seed)


@pytest.mark.parametrize("method", ["exact", "gram", "auto"])
@settings(max_examples=30, deadline=None)
@given(tol=st.floats(0.001, 0.999), seed=st.integers(0, 1000), transpose=st.booleans())
def test_tol_gives_smallest_rank_meeting_it(method, tol, seed, transpose):
    a = _spectrum_case(seed)
    if transpose:
        a = a.T
    s_ref = singular_values(a)
    errors = tail_errors(s_ref)
    # stay away from ties between tol and an attainable error, where rounding decides
    assume(all(abs(float(e) - tol) > 1e-9 for e in errors))
    expected = smallest_rank_for_tol(s_ref, tol)
    f = svd(a, tol=tol, method=method)
    assert f.rank == expected
    err = f.relative_error(a)
    assert err <= tol
    assert math.isclose(err, float(errors[expected]), rel_tol=1e-6, abs_tol=1e-12)


@pytest.mark.parametrize("method", ["exact", "gram"])
def test_tol_with_rank_cap(method):
    a = _spectrum_case(0)
    expected = smallest_rank_for_tol(singular_values(a), 0.05)
    assert expected > 5
    assert svd(a, tol=0.05, method=method).rank == expected
    capped = svd(a, 5, tol=0.05, method=method)
    assert capped.rank == 5
    assert svd(a, expected + 3, tol=0.05, method=method).rank == expected


@pytest.mark.parametrize("method", ["exact", "gram"])
def test_tol_on_exactly_low_rank_matrix(method):
    a = low_rank_matrix(50, 40, 7, seed=6)
    f = svd(a, tol=1e-6, method=method)
    assert f.rank == 7
    assert f.relative_error(a) < 1e-6


def test_tol_with_randomized_is_rejected():
    a = _spectrum_case(1)
    with pytest.raises(ValueError, match="randomized"):
        svd(a, tol=0.1, method="randomized")
    with pytest.raises(ValueError, match="randomized"):
        svd(a, 5, tol=0.1, method="randomized")


# ----------------------------------------------------------------------------- determinism


def test_randomized_same_seed_is_deterministic():
    a = decaying_matrix(120, 100, 0.9, seed=7)
    f1 = svd(a, 8, method="randomized", seed=123)
    f2 = svd(a, 8, method="randomized", seed=123)
    for t1, t2 in zip(f1.factor_tensors, f2.factor_tensors):
        assert torch.equal(t1, t2)
    # the seed is really used: another seed gives (slightly) different factors
    f3 = svd(a, 8, method="randomized", seed=124, n_iter=0)
    f4 = svd(a, 8, method="randomized", seed=123, n_iter=0)
    assert not torch.equal(f3.u, f4.u)


def test_randomized_deterministic_in_float32():
    a = decaying_matrix(120, 100, 0.9, seed=8).float()
    f1 = svd(a, 8, method="randomized", seed=5)
    f2 = svd(a, 8, method="randomized", seed=5)
    assert all(torch.equal(t1, t2) for t1, t2 in zip(f1.factor_tensors, f2.factor_tensors))


def test_deterministic_methods_do_not_depend_on_seed():
    a = randn(30, 20, gen=generator(9))
    for method in ("exact", "gram"):
        f1, f2 = svd(a, 4, method=method, seed=1), svd(a, 4, method=method, seed=2)
        assert all(torch.equal(t1, t2) for t1, t2 in zip(f1.factor_tensors, f2.factor_tensors))
