import pytest
import torch
from conftest import low_rank_matrix, planted_cp, planted_tt, planted_tucker

from lowrank.decompose import CP, SVD, TR, TT, TTMatrix, Tucker, cp, decompose, svd, tr, tt, tt_matrix, tucker

# method name -> (direct function, container type, input builder, positional args, options)
DISPATCH = {
    "svd": (svd, SVD, lambda: low_rank_matrix(20, 15, 3, seed=0), (), {"rank": 3}),
    "tucker": (tucker, Tucker, lambda: planted_tucker((5, 6, 7), (2, 3, 2), seed=1), (), {"rank": (2, 3, 2)}),
    "cp": (cp, CP, lambda: planted_cp((5, 6, 7), 2, seed=2), (), {"rank": 2, "init": "random", "seed": 3}),
    "tt": (tt, TT, lambda: planted_tt((4, 5, 6), (2, 3), seed=4), (), {"rank": (2, 3)}),
    "tr": (tr, TR, lambda: planted_tt((4, 5, 6), (2, 3), seed=5), (), {"rank": (1, 2, 3), "n_iter_max": 3}),
    "tt_matrix": (tt_matrix, TTMatrix, lambda: low_rank_matrix(12, 20, 2, seed=6), ((3, 4), (4, 5)), {"rank": 2}),
}


@pytest.mark.parametrize("method", list(DISPATCH))
def test_dispatch_calls_the_named_method(method):
    func, kind, build, args, options = DISPATCH[method]
    x = build()
    via_dispatch = decompose(x, method, *args, **options)
    direct = func(x, *args, **options)
    assert type(via_dispatch) is kind
    assert via_dispatch.ranks == direct.ranks
    assert len(via_dispatch.factor_tensors) == len(direct.factor_tensors)
    for a, b in zip(via_dispatch.factor_tensors, direct.factor_tensors):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("method", "option", "args"),
    [
        ("svd", "exact", (3,)),
        ("svd", "randomized", (3,)),
        ("tucker", "hosvd", ((2, 3, 2),)),
        ("tr", "svd", ((1, 2, 3),)),
    ],
)
def test_dispatch_forwards_the_methods_own_method_option(method, option, args):
    # svd, tucker and tr have a ``method=`` option of their own; decompose(x, method, **options) must pass it on
    func, _, build, _, _ = DISPATCH[method]
    x = build()
    via_dispatch = decompose(x, method, *args, method=option)
    direct = func(x, *args, method=option)
    for a, b in zip(via_dispatch.factor_tensors, direct.factor_tensors):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["svd", "tucker", "tt"])
def test_dispatch_forwards_tol(method):
    func, _, build, args, _ = DISPATCH[method]
    x = build()
    f = decompose(x, method, tol=0.1)
    assert f.ranks == func(x, tol=0.1).ranks
    assert f.relative_error(x) <= 0.1


def test_dispatch_forwards_positional_rank():
    x = low_rank_matrix(20, 15, 3, seed=7)
    assert decompose(x, "svd", 2).rank == 2
    assert decompose(x, "cp", 2, n_iter_max=2).rank == 2


def test_dispatch_forwards_bad_options_errors():
    x = low_rank_matrix(20, 15, 3, seed=8)
    with pytest.raises(ValueError, match=r"rank.*16"):
        decompose(x, "svd", rank=16)
    with pytest.raises(TypeError):
        decompose(x, "svd", rank=2, no_such_option=1)


@pytest.mark.parametrize("method", ["SVD", "Tucker", "hosvd", "parafac", "tensor_train", "", "svd ", "bogus"])
def test_unknown_method_is_rejected(method):
    x = low_rank_matrix(10, 8, 2, seed=9)
    with pytest.raises(ValueError) as info:
        decompose(x, method, rank=2)
    message = str(info.value)
    assert repr(method) in message or method in message
    for allowed in ("svd", "tucker", "cp", "tt", "tr"):
        assert repr(allowed) in message or f'"{allowed}"' in message or allowed in message.split(), (allowed, message)


@pytest.mark.parametrize("method", [None, 3])
def test_non_string_method_is_rejected(method):
    with pytest.raises((ValueError, TypeError), match="method"):
        decompose(low_rank_matrix(10, 8, 2, seed=10), method, rank=2)
