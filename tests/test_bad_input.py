"""Bad input: every rule of the contract, for every method.

Errors must be ``ValueError`` or ``TypeError`` and their message must name the argument
and the bad value; ``clip=True`` lowers too-large ranks instead of raising.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import generator, randn

from lowrank.decompose import TT, cp, svd, tr, tt, tt_matrix, tt_round, tucker

ERRORS = (ValueError, TypeError)


@dataclass(frozen=True)
class Case:
    """How to call one method on a valid input, and what its rank rules are."""

    call: Callable  # call(x, rank=..., **options)
    shape: tuple[int, ...]  # a valid input shape
    arg: str  # the name of the tensor argument, as the message should spell it
    too_big: object  # a rank above its bound
    too_big_value: int  # the offending number, which the message must contain
    clipped: tuple[int, ...] | None  # ranks after clip=True (None: the method has no clip)
    has_tol: bool


def _svd(x, rank=2, **kw):
    return svd(x, rank, **kw)


def _tucker(x, rank=2, **kw):
    return tucker(x, rank, **kw)


def _cp(x, rank=2, **kw):
    kw.setdefault("n_iter_max", 2)
    return cp(x, rank, **kw)


def _tt(x, rank=2, **kw):
    return tt(x, rank, **kw)


def _tt_matrix(x, rank=2, **kw):
    return tt_matrix(x, (3, 4), (4, 5), rank, **kw)


def _tt_round(x, rank=2, **kw):
    return tt_round(tt(x, (3, 5)), rank, **kw)


def _tr(x, rank=2, **kw):
    kw.setdefault("n_iter_max", 2)
    return tr(x, rank, **kw)


CASES = {
    "svd": Case(_svd, (5, 7), "x", 6, 6, (5,), True),
    "tucker": Case(_tucker, (4, 5, 6), "x", (2, 6, 2), 6, (2, 5, 2), True),
    # the CP rank of a 3 x 4 x 5 tensor is at most 3 * 4 = 12
    "cp": Case(_cp, (3, 4, 5), "x", 13, 13, None, True),
    # bond 1 of a 3 x 4 x 5 train is at most 3, bond 2 at most 5
    "tt": Case(_tt, (3, 4, 5), "x", (4, 2), 4, (1, 3, 2, 1), True),
    "tt_matrix": Case(_tt_matrix, (12, 20), "matrix", 13, 13, (1, 12, 1), True),
    "tt_round": Case(_tt_round, (3, 4, 5), "train", (4, 2), 4, (1, 3, 2, 1), True),
    # r_0 of a 3 x 4 x 5 ring is at most 3
    "tr": Case(_tr, (3, 4, 5), "x", (4, 2, 2), 4, (3, 2, 2, 3), False),
}
# methods that take the tensor itself (tt_round takes a TT)
TENSOR_METHODS = [name for name in CASES if name != "tt_round"]


def valid_input(name: str, dtype=torch.float64) -> torch.Tensor:
    return randn(*CASES[name].shape, gen=generator(0)).to(dtype)


def _value_pattern(value) -> str:
    return re.escape(repr(value) if isinstance(value, float) else str(value))


# ----------------------------------------------------------------------------- sanity: the valid inputs work


@pytest.mark.parametrize("name", list(CASES))
def test_valid_input_is_accepted(name):
    # guards the cases below: each error must come from the bad argument, not from the rest of the call
    f = CASES[name].call(valid_input(name))
    assert all(bool(torch.isfinite(t).all()) for t in f.factor_tensors)


# ----------------------------------------------------------------------------- ranks


@pytest.mark.parametrize("name", list(CASES))
def test_rank_above_bound(name):
    case = CASES[name]
    with pytest.raises(ERRORS, match=rf"(?s)rank\b.*\b{case.too_big_value}\b"):
        case.call(valid_input(name), case.too_big)


@pytest.mark.parametrize("rank", [0, -1, -3])
@pytest.mark.parametrize("name", list(CASES))
def test_rank_not_positive(name, rank):
    with pytest.raises(ERRORS, match=rf"(?s)rank\b.*{rank}\b"):
        CASES[name].call(valid_input(name), rank)


@pytest.mark.parametrize(
    ("name", "rank", "bad"),
    [("tucker", (2, 0, 2), 0), ("tucker", (2, -1, 2), -1), ("tt", (2, 0), 0), ("tr", (2, 0, 2), 0), ("tt", (0, 2), 0)],
)
def test_rank_sequence_with_non_positive_entry(name, rank, bad):
    with pytest.raises(ERRORS, match=rf"(?s)rank\b.*{bad}\b"):
        CASES[name].call(valid_input(name), rank)


# rank=None is allowed with tol= for svd, tucker and tt (see test_needs_rank_or_tol)
@pytest.mark.parametrize(
    ("name", "rank"),
    [(name, rank) for name in ("svd", "tucker", "cp", "tt", "tr") for rank in (2.5, True, "3")]
    + [("cp", None), ("tr", None)],
)
def test_rank_of_wrong_type(name, rank):
    with pytest.raises(ERRORS, match="rank"):
        CASES[name].call(valid_input(name), rank)


@pytest.mark.parametrize(
    ("name", "rank"),
    [("svd", (2, 2)), ("tucker", (2, 2)), ("tucker", (2, 2, 2, 2)), ("tt", (2, 2, 2)), ("tt", (2,)), ("tr", (2, 2))],
)
def test_rank_sequence_of_wrong_length(name, rank):
    with pytest.raises(ERRORS, match="rank"):
        CASES[name].call(valid_input(name), rank)


def test_tt_rank_with_boundary_entries_must_have_unit_boundaries():
    x = valid_input("tt")
    assert tt(x, (1, 2, 2, 1)).ranks == (1, 2, 2, 1)
    with pytest.raises(ERRORS, match=r"rank"):
        tt(x, (2, 2, 2, 1))
    with pytest.raises(ERRORS, match=r"rank"):
        tt(x, (1, 2, 2, 3))


def test_partial_tucker_rank_per_decomposed_mode():
    x = valid_input("tucker")
    assert tucker(x, (2, 3), modes=(0, 1)).ranks == (2, 3)
    with pytest.raises(ERRORS, match="rank"):
        tucker(x, (2, 3, 2), modes=(0, 1))
    # the rank bound applies to the mode the rank belongs to: mode 2 has size 6
    assert tucker(x, (6,), modes=(2,)).ranks == (6,)
    with pytest.raises(ERRORS, match=r"(?s)rank\b.*\b7\b"):
        tucker(x, (7,), modes=(2,))


# ----------------------------------------------------------------------------- clip


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.clipped is not None])
def test_clip_lowers_too_large_rank(name):
    case = CASES[name]
    x = valid_input(name)
    f = case.call(x, case.too_big, clip=True)
    assert f.ranks == case.clipped


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.clipped is not None])
def test_clip_does_not_accept_non_positive_rank(name):
    with pytest.raises(ERRORS, match=r"(?s)rank\b.*0"):
        CASES[name].call(valid_input(name), 0, clip=True)


def test_clip_to_full_rank_is_exact():
    x = valid_input("svd")
    assert svd(x, 100, clip=True, method="exact").relative_error(x) < 1e-10
    y = valid_input("tucker")
    f = tucker(y, 100, clip=True)
    assert f.ranks == (4, 5, 6) and f.relative_error(y) < 1e-10
    z = valid_input("tt")
    g = tt(z, 100, clip=True)
    assert g.ranks == (1, 3, 5, 1) and g.relative_error(z) < 1e-10


# ----------------------------------------------------------------------------- tol


@pytest.mark.parametrize("tol", [0, 1, -0.1, 1.5, 0.0, 1.0, float("nan"), float("inf")], ids=repr)
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.has_tol])
def test_tol_outside_open_unit_interval(name, tol):
    with pytest.raises(ERRORS, match=rf"(?s)tol\b.*{_value_pattern(tol)}"):
        CASES[name].call(valid_input(name), tol=tol)


@pytest.mark.parametrize("name", ["svd", "tucker", "tt", "tt_matrix", "tt_round"])
def test_needs_rank_or_tol(name):
    with pytest.raises(ERRORS, match=r"(?s)rank.*tol|tol.*rank"):
        CASES[name].call(valid_input(name), None)


# ----------------------------------------------------------------------------- entries


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", TENSOR_METHODS)
def test_non_finite_entries(name, dtype, bad):
    x = valid_input(name, dtype)
    x.view(-1)[x.numel() // 2] = bad
    with pytest.raises(ERRORS, match=rf"(?si){CASES[name].arg}\b.*(nan|inf|finite)"):
        CASES[name].call(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=repr)
def test_non_finite_train_in_tt_round(bad):
    cores = [c.clone() for c in tt(valid_input("tt"), (3, 5)).cores]
    cores[1][0, 0, 0] = bad
    with pytest.raises(ERRORS, match=r"(?si)(train|core).*(nan|inf|finite)"):
        tt_round(TT(tuple(cores)), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_finite_entries_are_not_mistaken_for_inf(dtype):
    # every entry is finite but the sum of squares overflows the dtype: the input must be accepted
    x = (randn(6, 5, gen=generator(4)) * 1e20).to(dtype)
    assert bool(torch.isfinite(x).all()) and not torch.isfinite(torch.sum(x.float() ** 2))
    f = svd(x, 5, method="exact")
    assert f.relative_error(x) < 1e-2


@pytest.mark.parametrize("name", TENSOR_METHODS)
def test_empty_input(name):
    shape = list(CASES[name].shape)
    for axis in range(len(shape)):
        empty = torch.empty(*shape[:axis], 0, *shape[axis + 1 :], dtype=torch.float64)
        with pytest.raises(ERRORS, match=rf"(?s){CASES[name].arg}\b.*empty"):
            CASES[name].call(empty)


# ----------------------------------------------------------------------------- number of modes


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("svd", (5,)),
        ("svd", (2, 3, 4)),
        ("svd", ()),
        ("tt_matrix", (240,)),
        ("tt_matrix", (12, 4, 5)),
        ("tucker", (5,)),
        ("tucker", ()),
        ("cp", (5,)),
        ("tt", (5,)),
        ("tr", (5,)),
        ("tr", ()),
    ],
)
def test_wrong_number_of_modes(name, shape):
    x = randn(*shape, gen=generator(1)) if shape else torch.tensor(1.5, dtype=torch.float64)
    with pytest.raises(ERRORS, match=rf"(?si){CASES[name].arg}\b.*(mode|dim|2-d)") as info:
        CASES[name].call(x, 1)
    message = str(info.value)
    assert str(tuple(shape)) in message or f"got {len(shape)}" in message, message


# ----------------------------------------------------------------------------- dtypes and types


BAD_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
@pytest.mark.parametrize("name", TENSOR_METHODS)
def test_non_real_floating_dtype(name, dtype):
    x = torch.ones(CASES[name].shape, dtype=dtype)
    with pytest.raises(ERRORS, match=rf"(?s){CASES[name].arg}\b.*dtype.*{re.escape(str(dtype))}"):
        CASES[name].call(x)


@pytest.mark.parametrize("np_dtype", [np.int64, np.int32, np.bool_], ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", TENSOR_METHODS)
def test_numpy_integer_array(name, np_dtype):
    arr = np.ones(CASES[name].shape, dtype=np_dtype)
    with pytest.raises(ERRORS, match=rf"(?s){CASES[name].arg}\b.*dtype"):
        CASES[name].call(arr)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=str)
def test_integer_train_in_tt_round(dtype):
    train = TT((torch.ones(1, 3, 2, dtype=dtype), torch.ones(2, 4, 1, dtype=dtype)))
    with pytest.raises(ERRORS, match=rf"(?s)(train|core).*dtype.*{re.escape(str(dtype))}"):
        tt_round(train, 1)


@pytest.mark.parametrize("name", TENSOR_METHODS)
def test_non_tensor_input(name):
    with pytest.raises(TypeError, match=rf"{CASES[name].arg}\b.*list"):
        CASES[name].call(valid_input(name).tolist())


def test_tt_round_needs_a_train():
    with pytest.raises(TypeError, match="train"):
        tt_round(valid_input("tt"), 2)


# ----------------------------------------------------------------------------- other options


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("svd", "method"),
        ("tucker", "method"),
        ("tucker", "init"),
        ("tucker", "subspace"),
        ("cp", "init"),
        ("tr", "method"),
    ],
)
def test_unknown_option_value(name, option):
    with pytest.raises(ValueError, match=rf"{option}\b.*bogus"):
        CASES[name].call(valid_input(name), **{option: "bogus"})


@pytest.mark.parametrize("name", ["tucker", "cp", "tr"])
@pytest.mark.parametrize(("option", "value"), [("n_iter_max", 0), ("n_iter_max", -5), ("stop_tol", -1e-3)])
def test_iteration_options(name, option, value):
    with pytest.raises(ERRORS, match=rf"{option}\b.*{_value_pattern(value)}"):
        CASES[name].call(valid_input(name), **{option: value})


@pytest.mark.parametrize("modes", [(0, 3), (0, 0), (), (-4,), (0.5,)], ids=repr)
def test_bad_tucker_modes(modes):
    with pytest.raises(ERRORS, match="modes"):
        tucker(valid_input("tucker"), 2, modes=modes)


@pytest.mark.parametrize(
    ("row_shape", "col_shape"),
    [((3, 5), (4, 5)), ((3, 4), (4, 6)), ((12,), (20,)), ((3, 4), (20,)), ((3, 2, 2), (4, 5))],
)
def test_tt_matrix_shapes_must_factor_the_matrix(row_shape, col_shape):
    with pytest.raises(ERRORS, match=r"row_shape|col_shape"):
        tt_matrix(valid_input("tt_matrix"), row_shape, col_shape, 2)
