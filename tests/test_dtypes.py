"""dtype / device / container-type round trips for every method."""

import numpy as np
import pytest
import torch
from conftest import low_rank_matrix, planted_cp, planted_tr, planted_tt, planted_tucker, rel_err

from lowrank.decompose import CP, SVD, TR, TT, TTMatrix, Tucker, cp, svd, tr, tt, tt_matrix, tt_round, tucker

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# Each case: (container type, planted float64 input, decomposition of an input of any dtype,
# tensor to compare the reconstruction with). Inputs are exactly low rank, so the only error is rounding.
CASES = {
    "svd-exact": (SVD, lambda: low_rank_matrix(24, 18, 3, seed=0), lambda x: svd(x, 3, method="exact")),
    "svd-gram": (SVD, lambda: low_rank_matrix(24, 18, 3, seed=0), lambda x: svd(x, 3, method="gram")),
    "svd-randomized": (SVD, lambda: low_rank_matrix(24, 18, 3, seed=0), lambda x: svd(x, 3, method="randomized")),
    "svd-auto": (SVD, lambda: low_rank_matrix(24, 18, 3, seed=0), lambda x: svd(x, 3)),
    "svd-tol": (SVD, lambda: low_rank_matrix(24, 18, 3, seed=0), lambda x: svd(x, tol=0.01)),
    "tucker-hooi": (Tucker, lambda: planted_tucker((6, 7, 8), (2, 3, 2), seed=1), lambda x: tucker(x, (2, 3, 2))),
    "tucker-hosvd": (
        Tucker,
        lambda: planted_tucker((6, 7, 8), (2, 3, 2), seed=1),
        lambda x: tucker(x, (2, 3, 2), method="hosvd"),
    ),
    "tucker-partial": (
        Tucker,
        lambda: planted_tucker((6, 7, 3, 3), (2, 3), seed=2, modes=(0, 1)),
        lambda x: tucker(x, (2, 3), modes=(0, 1)),
    ),
    "tucker-tol": (Tucker, lambda: planted_tucker((6, 7, 8), (2, 3, 2), seed=1), lambda x: tucker(x, tol=0.01)),
    "cp": (CP, lambda: planted_cp((6, 7, 8), 2, seed=3), lambda x: cp(x, 2, n_iter_max=200)),
    "cp-random": (CP, lambda: planted_cp((6, 7, 8), 2, seed=3), lambda x: cp(x, 2, init="random", n_iter_max=200)),
    "tt": (TT, lambda: planted_tt((4, 5, 6), (2, 3), seed=4), lambda x: tt(x, (2, 3))),
    "tt-tol": (TT, lambda: planted_tt((4, 5, 6), (2, 3), seed=4), lambda x: tt(x, tol=0.01)),
    "tt_round": (TT, lambda: planted_tt((4, 5, 6), (2, 3), seed=4), lambda x: tt_round(tt(x, (4, 5)), (2, 3))),
    "tt_matrix": (
        TTMatrix,
        lambda: low_rank_matrix(12, 20, 2, seed=5),
        lambda x: tt_matrix(x, (3, 4), (4, 5), 12, clip=True),
    ),
    "tr": (TR, lambda: planted_tt((4, 5, 6), (2, 3), seed=6), lambda x: tr(x, (1, 2, 3))),
    "tr-svd": (TR, lambda: planted_tt((4, 5, 6), (2, 3), seed=6), lambda x: tr(x, (1, 2, 3), method="svd")),
}

# relative reconstruction error allowed for an exactly low-rank input of each dtype
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-8}


def _reconstruction(f):
    return f.to_matrix() if isinstance(f, TTMatrix) else f.to_tensor()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_dtype_round_trip(case, dtype):
    kind, build, run = CASES[case]
    x64 = build()
    x = x64.to(dtype)
    f = run(x)
    assert isinstance(f, kind)
    assert f.dtype == dtype
    assert f.device == x.device
    for t in f.factor_tensors:
        assert isinstance(t, torch.Tensor)
        assert t.dtype == dtype, (case, t.dtype)
        assert t.device == x.device
        assert bool(torch.isfinite(t.float()).all())
    rebuilt = _reconstruction(f)
    assert rebuilt.dtype == dtype
    # compared with the input the decomposition saw (rounded to dtype)
    assert rel_err(rebuilt, x) < TOLERANCE[dtype], (case, dtype, rel_err(rebuilt, x))
    # the input itself is untouched
    assert x.dtype == dtype and torch.equal(x, x64.to(dtype))


@pytest.mark.parametrize("np_dtype", [np.float64, np.float32, np.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", list(CASES))
def test_numpy_input_gives_torch_output(case, np_dtype):
    kind, build, run = CASES[case]
    x64 = build()
    arr = x64.numpy().astype(np_dtype)
    f = run(arr)
    assert isinstance(f, kind)
    expected = torch.from_numpy(arr).dtype
    assert f.dtype == expected
    for t in f.factor_tensors:
        assert isinstance(t, torch.Tensor)
        assert t.dtype == expected
    torch_version = run(torch.from_numpy(arr.copy()))
    for a, b in zip(f.factor_tensors, torch_version.factor_tensors):
        torch.testing.assert_close(a, b)
    assert f.relative_error(arr if not isinstance(f, TTMatrix) else arr.reshape(f.shape)) < TOLERANCE[expected]


@pytest.mark.parametrize("case", list(CASES))
def test_non_contiguous_input(case):
    kind, build, run = CASES[case]
    x64 = build()
    # same values, but a non-contiguous (transposed-and-back) layout
    strided = x64.T.contiguous().T if x64.ndim == 2 else x64.permute(2, 1, 0, *range(3, x64.ndim)).contiguous()
    strided = strided if x64.ndim == 2 else strided.permute(2, 1, 0, *range(3, x64.ndim))
    assert not strided.is_contiguous() and torch.equal(strided, x64)
    f, g = run(strided), run(x64)
    for a, b in zip(f.factor_tensors, g.factor_tensors):
        torch.testing.assert_close(a, b)
    assert rel_err(_reconstruction(f), x64) < 1e-8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_round_trip(case, dtype):
    kind, build, run = CASES[case]
    x = build().to(device="cuda", dtype=dtype)
    f = run(x)
    assert f.device.type == "cuda"
    assert all(t.device.type == "cuda" and t.dtype == dtype for t in f.factor_tensors)
    assert rel_err(_reconstruction(f).cpu(), x.cpu()) < TOLERANCE[dtype] * 10


def test_relative_error_accepts_numpy_and_other_dtypes():
    x = planted_tucker((5, 6, 7), (2, 2, 2), seed=7)
    f = tucker(x.float(), (2, 2, 2))
    assert f.relative_error(x) < 1e-5
    assert f.relative_error(x.numpy()) < 1e-5
    assert f.relative_error(x.half()) < 1e-2
    assert isinstance(f.relative_error(x), float)


def test_planted_ring_round_trip_in_half():
    # a genuine ring (r_0 > 1) decomposed in float16 keeps its dtype
    x = planted_tr((5, 6, 7), (2, 2, 2), seed=8).half()
    f = tr(x, 2, n_iter_max=2)
    assert f.dtype == torch.float16
    assert all(c.dtype == torch.float16 for c in f.cores)
    assert f.to_tensor().dtype == torch.float16


SCALE_CASES = ["svd-exact", "svd-gram", "svd-tol", "tucker-hosvd", "tucker-tol", "cp", "tt", "tt-tol", "tt_round", "tr"]


@pytest.mark.parametrize("scale", [1e-24, 1e18], ids=["tiny", "huge"])
@pytest.mark.parametrize("case", SCALE_CASES)
def test_float32_scale_equivariance(case, scale):
    # Finite float32 inputs far from 1 in magnitude (but far inside float32's range, 1e-38..3e38):
    # the decomposition must be scale-equivariant, as torch.linalg.svd is. Squaring the data in
    # float32 (Gram matrices) underflows / overflows at these scales.
    kind, build, run = CASES[case]
    x = build().float()
    reference = rel_err(_reconstruction(run(x)), x)
    scaled = x * scale
    assert bool(torch.isfinite(scaled).all()) and bool((scaled != 0).any())
    f = run(scaled)
    assert all(bool(torch.isfinite(t).all()) for t in f.factor_tensors)
    err = rel_err(_reconstruction(f), scaled)
    assert err <= reference + 1e-3, (case, scale, err, reference)


@pytest.mark.parametrize("case", list(CASES))
def test_all_zero_input(case):
    # a zero tensor is valid input (finite, non-empty); its decomposition represents zero
    kind, build, run = CASES[case]
    x = torch.zeros_like(build())
    f = run(x)
    assert isinstance(f, kind)
    assert all(bool(torch.isfinite(t).all()) for t in f.factor_tensors)
    assert bool((_reconstruction(f) == 0).all())
