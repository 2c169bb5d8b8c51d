"""Factorized convolutions: Tucker2Conv, CPConv, SVDConv (channel and spatial schemes).

The references are the dense ``nn.ConvNd`` layers themselves: a factorized module must
compute exactly what its ``to_dense()`` convolution computes, and what the original
convolution computes when the kernel is recovered exactly.
"""

import json
import math
import string
from unittest import mock

import pytest
import torch
from conftest import generator, randn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowrank.nn.base import FactorizedModule, UnsupportedLayerError
from lowrank.nn.conv import CPConv, SVDConv, Tucker2Conv
from lowrank.rank import VBMF, Energy, FixedRank, Threshold

F64 = torch.float64
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
KINDS = ("tucker2", "cp", "svd-channel", "svd-spatial")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# PyTorch warns that 'same' with an even kernel pads a copy of the input; that is the behaviour under test.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def make_conv(dim, in_channels, out_channels, kernel_size, seed=0, dtype=F64, **options):
    """A dense convolution with Gaussian weight and bias drawn from ``seed``."""
    conv = CONV[dim](in_channels, out_channels, kernel_size, dtype=dtype, **options)
    gen = generator(seed)
    with torch.no_grad():
        conv.weight.copy_(randn(*conv.weight.shape, gen=gen))
        if conv.bias is not None:
            conv.bias.copy_(randn(*conv.bias.shape, gen=gen))
    return conv


def max_ranks(kind, conv):
    """The largest rank each kind accepts for ``conv`` (per group)."""
    out_group, in_group, *kernel = conv.out_channels // conv.groups, *conv.weight.shape[1:]
    if kind == "tucker2":
        return (out_group, in_group)
    if kind == "cp":
        shape = (out_group, in_group, *kernel)
        return math.prod(shape) // max(shape)
    if kind == "svd-channel":
        return min(out_group, in_group * math.prod(kernel))
    return min(conv.in_channels * kernel[0], conv.out_channels * kernel[1])


def factorize(kind, conv, rank, **options):
    if kind == "tucker2":
        return Tucker2Conv.from_dense(conv, rank, **options)
    if kind == "cp":
        return CPConv.from_dense(conv, rank, **options)
    return SVDConv.from_dense(conv, rank, scheme=kind.removeprefix("svd-"), **options)


def assert_same_output(actual, expected, rtol=1e-10):
    """Equal up to ``rtol`` times the largest output entry."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual, expected = actual.detach(), expected.detach()
    error = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))
    assert error <= rtol, f"relative max error {error:.3e} > {rtol:.0e}"


def planted_cp_kernel(shape, rank, gen):
    """A kernel of CP rank ``rank``: orthonormal factor columns where a mode is long enough, distinct weights.

    Well separated components, so that CP-ALS converges to the exact kernel in a few dozen sweeps.
    """
    factors = [torch.linalg.qr(randn(n, rank, gen=gen)).Q if n >= rank else randn(n, rank, gen=gen) for n in shape]
    factors[0] = factors[0] * torch.arange(1, rank + 1, dtype=F64)
    letters = string.ascii_lowercase[: len(shape)]
    return torch.einsum(",".join(c + "z" for c in letters) + "->" + letters, *factors)


def plant(conv, group_kernel):
    """Give every group of ``conv`` a kernel from ``group_kernel(seed)`` (a float64 tensor)."""
    out_group = conv.out_channels // conv.groups
    with torch.no_grad():
        for g in range(conv.groups):
            conv.weight[g * out_group : (g + 1) * out_group] = group_kernel(g)


# ----------------------------------------------------------------------------- forward == to_dense()


@st.composite
def conv_cases(draw):
    """A random convolution (any dimension, stride, padding, dilation, groups, padding mode) and a kind."""
    kind = draw(st.sampled_from(KINDS))
    dim = 2 if kind == "svd-spatial" else draw(st.integers(1, 3))
    groups = 1 if kind == "svd-spatial" else draw(st.sampled_from([1, 2]))
    in_group = draw(st.integers(2 if kind == "tucker2" else 1, 4))
    out_group = draw(st.integers(1, 4))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "same":
        stride = (1,) * dim
        padding = "same"
    else:
        stride = tuple(draw(st.integers(1, 2)) for _ in range(dim))
        padding = {
            "int": draw(st.integers(0, 2)),
            "tuple": tuple(draw(st.integers(0, 2)) for _ in range(dim)),
            "valid": "valid",
        }[padding_kind]
    options = {
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": draw(st.sampled_from(PADDING_MODES)),
    }
    spatial = tuple(max(3, d * (k - 1) + 1) + draw(st.integers(0, 3)) for k, d in zip(kernel, dilation))
    seed = draw(st.integers(0, 2**16))
    conv = make_conv(dim, groups * in_group, groups * out_group, kernel, seed=seed, **options)
    bound = max_ranks(kind, conv)
    if kind == "tucker2":
        rank = (draw(st.integers(1, bound[0])), draw(st.integers(1, bound[1])))
    else:
        rank = draw(st.integers(1, bound))
    x = randn(draw(st.integers(1, 2)), groups * in_group, *spatial, gen=generator(seed + 1))
    return kind, conv, rank, x


@settings(max_examples=150)
@given(conv_cases())
def test_forward_equals_to_dense(case):
    kind, conv, rank, x = case
    module = factorize(kind, conv, rank, **({"n_iter_max": 3} if kind == "cp" else {}))
    dense = module.to_dense()
    assert type(dense) is type(conv)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(dense, name) == getattr(conv, name), name
    assert (dense.bias is None) == (conv.bias is None)
    assert_same_output(module(x), dense(x))
    assert module(x).shape == conv(x).shape


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize(
    ("dim", "kernel", "dilation"), [(1, (4,), 1), (2, (2, 4), 1), (2, (4, 3), 3), (3, (2, 3, 4), 1)]
)
def test_cp_same_padding_even_kernel_matches_original(dim, kernel, dilation, padding_mode):
    # 'same' with an even kernel pads one more at the end; each depthwise stage must do so on its own dimension.
    conv = make_conv(dim, 4, 6, kernel, padding="same", dilation=dilation, padding_mode=padding_mode)
    gen = generator(dim)
    plant(conv, lambda g: planted_cp_kernel((6, 4, *kernel), 2, gen))
    module = CPConv.from_dense(conv, 2, n_iter_max=100, stop_tol=0)
    x = randn(2, 4, *(7,) * dim, gen=gen)
    assert_same_output(module(x), conv(x))
    assert_same_output(module(x), module.to_dense()(x))


# ----------------------------------------------------------------------------- exact recovery


RECOVERY_CASES = [
    # dim, in, out, kernel, options
    (1, 6, 4, (3,), {"padding": 1, "stride": 2}),
    (2, 6, 8, (3, 2), {"padding": "same", "padding_mode": "reflect", "groups": 2}),
    (2, 4, 6, (3, 3), {"padding": (2, 1), "dilation": (2, 1), "padding_mode": "circular", "bias": False}),
    (3, 4, 6, (2, 3, 2), {"padding": "valid", "stride": (1, 2, 1), "padding_mode": "replicate"}),
    (3, 4, 4, (3, 1, 2), {"padding": (1, 0, 1), "groups": 2}),
]


@pytest.mark.parametrize("kind", ["tucker2", "svd-channel"])
@pytest.mark.parametrize(("dim", "in_channels", "out_channels", "kernel", "options"), RECOVERY_CASES)
def test_full_rank_recovers_original(kind, dim, in_channels, out_channels, kernel, options):
    conv = make_conv(dim, in_channels, out_channels, kernel, seed=3, **options)
    module = factorize(kind, conv, max_ranks(kind, conv))
    x = randn(2, in_channels, *(6,) * dim, gen=generator(4))
    assert_same_output(module(x), conv(x))
    weight = conv.weight.detach()
    assert torch.allclose(module.weight, weight, rtol=0, atol=1e-12 * float(weight.abs().max()))


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("options", [{"padding": (1, 2)}, {"padding": "same"}, {"stride": (2, 3), "dilation": (1, 2)}])
def test_spatial_svd_full_rank_recovers_original(options, padding_mode):
    conv = make_conv(2, 3, 5, (3, 4), seed=5, padding_mode=padding_mode, **options)
    module = SVDConv.from_dense(conv, max_ranks("svd-spatial", conv), scheme="spatial")
    x = randn(2, 3, 9, 10, gen=generator(6))
    assert_same_output(module(x), conv(x))


@pytest.mark.parametrize(("dim", "in_channels", "out_channels", "kernel", "options"), RECOVERY_CASES)
def test_planted_low_rank_kernels_recovered(dim, in_channels, out_channels, kernel, options):
    conv = make_conv(dim, in_channels, out_channels, kernel, **options)
    groups = conv.groups
    out_group, in_group = out_channels // groups, in_channels // groups
    x = randn(2, in_channels, *(6,) * dim, gen=generator(7))
    gen = generator(8)

    # Tucker-2 ranks (2, 2) per group: core (2, 2, *kernel) times two factors.
    def tucker_kernel(g):
        core = randn(2, 2, *kernel, gen=gen).flatten(2)
        kernel_ = torch.einsum("oa,abk,ib->oik", randn(out_group, 2, gen=gen), core, randn(in_group, 2, gen=gen))
        return kernel_.reshape(out_group, in_group, *kernel)

    plant(conv, tucker_kernel)
    assert_same_output(Tucker2Conv.from_dense(conv, (2, 2))(x), conv(x))

    # Channel SVD rank 2 per group.
    plant(conv, lambda g: (randn(out_group, 2, gen=gen) @ randn(2, in_group * math.prod(kernel), gen=gen)).reshape(
        out_group, in_group, *kernel))
    assert_same_output(SVDConv.from_dense(conv, 2)(x), conv(x))

    # CP rank 2 per group.
    plant(conv, lambda g: planted_cp_kernel((out_group, in_group, *kernel), 2, gen))
    assert_same_output(CPConv.from_dense(conv, 2, n_iter_max=100, stop_tol=0)(x), conv(x))


def test_planted_spatial_rank_recovered():
    conv = make_conv(2, 4, 6, (3, 5), padding=(1, 2), stride=(1, 2))
    gen = generator(9)
    # Rank 3 as an (in * kh, out * kw) matrix.
    matrix = randn(4 * 3, 3, gen=gen) @ randn(3, 6 * 5, gen=gen)
    with torch.no_grad():
        conv.weight.copy_(matrix.reshape(4, 3, 6, 5).permute(2, 0, 1, 3))
    module = SVDConv.from_dense(conv, 3, scheme="spatial")
    x = randn(2, 4, 8, 9, gen=gen)
    assert_same_output(module(x), conv(x))


# ----------------------------------------------------------------------------- config round trip


ROUND_TRIP_CASES = [
    ("tucker2", 2, {"groups": 2, "padding": "same", "padding_mode": "reflect"}, (2, 1)),
    ("tucker2", 1, {"stride": 2, "bias": False}, 3),
    ("tucker2", 3, {"padding": (1, 0, 1), "dilation": 2}, (4, 2)),
    ("cp", 1, {"padding": "valid", "padding_mode": "circular"}, 3),
    ("cp", 2, {"groups": 2, "stride": (2, 1), "padding": 1}, 2),
    ("cp", 3, {"padding": "same", "bias": False}, 4),
    ("svd-channel", 1, {"groups": 2, "padding_mode": "replicate", "padding": 2}, 2),
    ("svd-channel", 2, {"dilation": (2, 1)}, 5),
    ("svd-channel", 3, {"stride": (1, 2, 1)}, 3),
    ("svd-spatial", 2, {"padding": (1, 2), "padding_mode": "reflect"}, 6),
]


@pytest.mark.parametrize(("kind", "dim", "options", "rank"), ROUND_TRIP_CASES)
def test_config_rebuilds_identical_module(kind, dim, options, rank):
    conv = make_conv(dim, 4, 6, (3,) * dim, seed=10, **options)
    module = factorize(kind, conv, rank)
    config = json.loads(json.dumps(module.config()))  # JSON-able, and rebuilt from the parsed copy
    rebuilt = type(module)(**config, dtype=F64)
    assert isinstance(rebuilt, FactorizedModule)
    assert rebuilt.config() == module.config()
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    x = randn(2, 4, *(7,) * dim, gen=generator(11))
    assert torch.equal(rebuilt(x), module(x))
    assert torch.equal(rebuilt.to_dense().weight, module.to_dense().weight)


# ----------------------------------------------------------------------------- parameter and FLOP counts


def test_tucker2_counts():
    conv = make_conv(2, 16, 12, (3, 3), groups=2, stride=2, padding=1)
    module = Tucker2Conv.from_dense(conv, (3, 4))
    # first 2*4 x 8, core 2*3 x 4 x 3 x 3, last 12 x 3, bias 12
    assert module.num_params == 64 + 216 + 36 + 12
    # 10x10 -> 5x5: first at 100 positions, core and last at 25, batch 2
    assert module.flops((2, 16, 10, 10)) == 2 * (100 * 64 + 25 * (216 + 36))


def test_cp_counts():
    conv = make_conv(2, 16, 12, (3, 5), groups=2, stride=(2, 1), padding=(1, 2))
    module = CPConv.from_dense(conv, 3, n_iter_max=2)
    # R = 2 groups * 3: first 6 x 8, depthwise 6 x 3 and 6 x 5, last 12 x 3, bias 12
    assert module.num_params == 48 + 18 + 30 + 36 + 12
    # 10x11: first at 110 positions; the height stage gives 5x11, the width stage 5x11, last at 55
    assert module.flops((2, 16, 10, 11)) == 2 * (110 * 48 + 55 * 18 + 55 * 30 + 55 * 36)


def test_svd_channel_counts():
    conv = make_conv(1, 6, 8, (5,), groups=2, stride=2, padding=2)
    module = SVDConv.from_dense(conv, 3)
    # first 2*3 x 3 x 5, second 8 x 3, bias 8
    assert module.num_params == 90 + 24 + 8
    # length 20 -> 10
    assert module.flops((3, 6, 20)) == 3 * 10 * (90 + 24)


def test_svd_spatial_counts():
    conv = make_conv(2, 4, 6, (3, 5), stride=(2, 1), padding=(1, 0))
    module = SVDConv.from_dense(conv, 5, scheme="spatial")
    # first 5 x 4 x 3 x 1, second 6 x 5 x 1 x 5, bias 6
    assert module.num_params == 60 + 150 + 6
    # 9x12 -> 5x12 after the (3, 1) stage -> 5x8 after the (1, 5) stage
    assert module.flops((1, 4, 9, 12)) == 60 * 60 + 40 * 150


# ----------------------------------------------------------------------------- budgets


def count_at(kind, conv, rank):
    """Parameters of the ``kind`` module at ``rank`` for ``conv``'s shape, counted on an empty meta-device module."""
    options = {"scheme": kind.removeprefix("svd-")} if kind.startswith("svd") else {}
    cls = {"tucker2": Tucker2Conv, "cp": CPConv}.get(kind, SVDConv)
    module = cls(conv.in_channels, conv.out_channels, list(conv.kernel_size), rank, groups=conv.groups,
                 bias=conv.bias is not None, device="meta", **options)
    return module.num_params


def rank_for_budget(kind, conv, max_params):
    if kind == "tucker2":
        return Tucker2Conv.rank_for_budget(conv, max_params)
    if kind == "cp":
        return CPConv.rank_for_budget(conv, max_params)
    return SVDConv.rank_for_budget(conv, max_params, scheme=kind.removeprefix("svd-"))


def rank_matrices(kind, conv):
    if kind == "tucker2":
        return Tucker2Conv.rank_matrices(conv)
    if kind == "cp":
        return CPConv.rank_matrices(conv)
    return SVDConv.rank_matrices(conv, scheme=kind.removeprefix("svd-"))


def tucker2_step(step, out_group, in_group):
    """The Tucker-2 ranks at ``step``: the larger side gets ``step``, the other its rounded share (at least 1)."""
    larger = max(out_group, in_group)
    return max(1, round(step * out_group / larger)), max(1, round(step * in_group / larger))


@st.composite
def budget_cases(draw):
    """A convolution's shape (on the meta device), a kind and a budget from nothing to twice the dense size."""
    kind = draw(st.sampled_from(KINDS))
    dim = 2 if kind == "svd-spatial" else draw(st.integers(1, 3))
    groups = 1 if kind == "svd-spatial" else draw(st.sampled_from([1, 2, 4]))
    in_group = draw(st.integers(2 if kind == "tucker2" else 1, 12))
    out_group = draw(st.integers(1, 12))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dim))
    conv = CONV[dim](groups * in_group, groups * out_group, kernel, groups=groups, bias=draw(st.booleans()),
                     device="meta")
    dense = sum(p.numel() for p in conv.parameters())
    return kind, conv, draw(st.integers(0, 2 * dense))


@settings(max_examples=300)
@given(budget_cases())
def test_rank_for_budget_is_the_largest_fitting_rank(case):
    kind, conv, max_params = case
    rank = rank_for_budget(kind, conv, max_params)
    bound = max_ranks(kind, conv)
    if rank is None:
        assert count_at(kind, conv, (1, 1) if kind == "tucker2" else 1) > max_params
        return
    assert count_at(kind, conv, rank) <= max_params
    if kind != "tucker2":
        assert isinstance(rank, int) and 1 <= rank <= bound
        assert rank == bound or count_at(kind, conv, rank + 1) > max_params
        return
    (out_group, in_group), (r_out, r_in) = bound, rank
    # In proportion to the channels: the larger side's rank is the step, the other its rounded share.
    step = r_out if out_group >= in_group else r_in
    assert rank == tucker2_step(step, out_group, in_group)
    assert abs(r_out / out_group - r_in / in_group) <= 1 / min(out_group, in_group)
    assert step == max(bound) or count_at(kind, conv, tucker2_step(step + 1, out_group, in_group)) > max_params


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.7])
def test_from_dense_at_the_budget_rank_fits(kind, fraction):
    conv = make_conv(2, 12, 16, (3, 3), groups=1 if kind == "svd-spatial" else 2, padding=1)
    max_params = int(fraction * sum(p.numel() for p in conv.parameters()))
    rank = rank_for_budget(kind, conv, max_params)
    module = factorize(kind, conv, rank, **({"n_iter_max": 2} if kind == "cp" else {}))
    assert module.num_params <= max_params
    assert module.reported_rank == rank


def test_rank_for_budget_known_values_and_nothing_fits():
    conv = nn.Conv2d(64, 64, 3)  # weight 36864, bias 64
    quarter = 36864 // 4 + 64  # a quarter of the weight plus the bias: 9216 for the factors
    # Tucker-2 (25, 25): 64*25 + 25*25*9 + 64*25 = 8825 <= 9216 < 9412 for (26, 26)
    assert Tucker2Conv.rank_for_budget(conv, quarter) == (25, 25)
    assert CPConv.rank_for_budget(conv, quarter) == 9216 // (64 + 64 + 3 + 3)
    assert SVDConv.rank_for_budget(conv, quarter) == 9216 // (64 * 9 + 64)
    assert SVDConv.rank_for_budget(conv, quarter, scheme="spatial") == 9216 // (64 * 3 + 64 * 3)
    # Rank 1 costs the bias plus one rank's factors; a parameter less fits nothing.
    rank_one = {"tucker2": 64 + 9 + 64, "cp": 64 + 64 + 3 + 3, "svd-channel": 64 * 9 + 64, "svd-spatial": 64 * 3 * 2}
    for kind, factors in rank_one.items():
        assert rank_for_budget(kind, conv, 64 + factors - 1) is None
        assert rank_for_budget(kind, conv, 64 + factors) == ((1, 1) if kind == "tucker2" else 1)
        assert rank_for_budget(kind, conv, 63) is None and rank_for_budget(kind, conv, 0) is None
        # Without a bias, the factors get the whole budget.
        assert rank_for_budget(kind, nn.Conv2d(64, 64, 3, bias=False), factors) == ((1, 1) if kind == "tucker2" else 1)
    # Above the full size, the ranks stop at the largest ones the modules accept.
    assert Tucker2Conv.rank_for_budget(conv, 10**9) == (64, 64)
    assert CPConv.rank_for_budget(conv, 10**9) == 64 * 64 * 9 // 64
    assert SVDConv.rank_for_budget(conv, 10**9) == 64
    assert SVDConv.rank_for_budget(conv, 10**9, scheme="spatial") == 64 * 3


# ----------------------------------------------------------------------------- rank matrices and reported ranks


def gram(matrices):
    """``sum M Mᵀ`` over matrices that are wide (or equal-sided), ``sum Mᵀ M`` over tall ones."""
    rows, cols = matrices[0].shape
    return sum(m @ m.T if rows <= cols else m.T @ m for m in matrices)


@pytest.mark.parametrize(
    ("dim", "in_channels", "out_channels", "kernel", "groups", "mode0", "mode1", "channel"),
    [
        (2, 8, 6, (3, 3), 1, (6, 72), (8, 54), (6, 72)),
        (2, 16, 32, (3, 3), 4, (8, 144), (4, 288), (8, 144)),
        (1, 64, 8, (1,), 2, (4, 64), (64, 4), (4, 64)),  # one group's mode-1 unfolding (32, 4) is tall
        (3, 4, 6, (2, 1, 2), 2, (3, 16), (2, 24), (3, 16)),
        (2, 6, 40, (1, 1), 2, (40, 3), (3, 40), (40, 3)),  # one group's mode-0 unfolding (20, 3) is tall
    ],
)
def test_rank_matrices_shapes_and_contents(dim, in_channels, out_channels, kernel, groups, mode0, mode1, channel):
    conv = make_conv(dim, in_channels, out_channels, kernel, groups=groups)
    out_group, in_group, taps = out_channels // groups, in_channels // groups, math.prod(kernel)
    tucker_matrices = Tucker2Conv.rank_matrices(conv)
    (svd_matrix,) = SVDConv.rank_matrices(conv)
    assert [tuple(m.shape) for m in tucker_matrices] == [mode0, mode1]
    assert tuple(svd_matrix.shape) == channel
    # The smaller side is the largest rank the module accepts (for Tucker-2, unless the unfolding is tall,
    # where ranks beyond its smaller side add nothing).
    assert min(mode0) == min(out_group, in_group * taps) and min(mode1) == min(in_group, out_group * taps)
    assert min(channel) == max_ranks("svd-channel", conv)
    # Each group's unfolding, joined along the longer side: the same Gram matrix as the groups' blocks.
    blocks = conv.weight.detach().reshape(groups, out_group, in_group, taps)
    unfold0 = [blocks[g].reshape(out_group, -1) for g in range(groups)]
    unfold1 = [blocks[g].transpose(0, 1).reshape(in_group, -1) for g in range(groups)]
    for matrix, expected in [(tucker_matrices[0], unfold0), (tucker_matrices[1], unfold1), (svd_matrix, unfold0)]:
        assert matrix.dtype == F64 and not matrix.requires_grad
        assert torch.allclose(gram([matrix]), gram(expected), rtol=1e-12, atol=0)
    if groups == 1:
        assert torch.equal(tucker_matrices[0], conv.weight.detach().reshape(out_channels, -1))
        assert torch.equal(tucker_matrices[1], conv.weight.detach().transpose(0, 1).reshape(in_channels, -1))
    assert CPConv.rank_matrices(conv) == []


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_svd_rank_matrix_is_the_one_truncated(scheme):
    # Eckart-Young: the rank-r module's kernel error is the tail of the matrix's singular values.
    conv = make_conv(2, 5, 7, (3, 4), padding=1)
    (matrix,) = SVDConv.rank_matrices(conv, scheme=scheme)
    assert tuple(matrix.shape) == ((7, 5 * 12) if scheme == "channel" else (5 * 3, 7 * 4))
    singular_values = torch.linalg.svdvals(matrix)
    assert len(singular_values) == max_ranks(f"svd-{scheme}", conv)
    for rank in (1, 3, 6):
        error = torch.linalg.vector_norm(SVDConv.from_dense(conv, rank, scheme=scheme).weight - conv.weight).detach()
        assert float(error) == pytest.approx(float(singular_values[rank:].square().sum().sqrt()), rel=1e-9)


@pytest.mark.parametrize("policy", [Energy(0.999), VBMF(), FixedRank(10**6)], ids=str)
@pytest.mark.parametrize(
    ("dim", "in_channels", "out_channels", "kernel", "groups"),
    [(2, 16, 32, (3, 3), 4), (1, 64, 8, (1,), 2), (2, 6, 40, (1, 1), 2)],
)
@pytest.mark.parametrize("kind", ["tucker2", "svd-channel"])
def test_policies_on_rank_matrices_give_ranks_the_module_accepts(kind, dim, in_channels, out_channels, kernel,
                                                                 groups, policy):
    # Grouped: a rank read from the whole kernel's unfolding (up to 32 output channels) could exceed a group's.
    conv = make_conv(dim, in_channels, out_channels, kernel, groups=groups)
    ranks = tuple(policy.choose(torch.linalg.svdvals(m), m.shape) for m in rank_matrices(kind, conv))
    rank = ranks if kind == "tucker2" else ranks[0]
    bound = max_ranks(kind, conv)
    assert all(1 <= r <= b for r, b in zip(ranks, bound if kind == "tucker2" else [bound]))
    module = factorize(kind, conv, rank)
    assert module.reported_rank == rank


def test_planted_tucker2_ranks_read_from_rank_matrices():
    # Every group's kernel has Tucker ranks (2, 3), from its own factors: the joined unfoldings have rank
    # 2 * groups (output) and 3 * groups (input), at most the group bounds, which recover the kernel exactly.
    conv = make_conv(2, 16, 24, (3, 3), groups=2, padding=1)
    gen = generator(17)
    plant(conv, lambda g: torch.einsum("oa,abk,ib->oik", randn(12, 2, gen=gen), randn(2, 3, 9, gen=gen),
                                       randn(8, 3, gen=gen)).reshape(12, 8, 3, 3))
    ranks = tuple(Threshold(1e-10).choose(torch.linalg.svdvals(m), m.shape) for m in Tucker2Conv.rank_matrices(conv))
    assert ranks == (4, 6)
    x = randn(2, 16, 6, 6, gen=gen)
    assert_same_output(Tucker2Conv.from_dense(conv, ranks)(x), conv(x))


@pytest.mark.parametrize(("kind", "rank", "reported"), [
    ("tucker2", (3, 2), (3, 2)), ("tucker2", 2, (2, 2)), ("cp", 3, 3), ("svd-channel", 2, 2), ("svd-spatial", 5, 5),
])
def test_reported_rank(kind, rank, reported):
    module = factorize(kind, make_conv(2, 4, 6, (3, 3)), rank, **({"n_iter_max": 1} if kind == "cp" else {}))
    assert module.reported_rank == reported
    assert type(module.reported_rank) is type(reported)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["zero", "too large", "not an int"])
def test_bad_ranks_raise(kind, which):
    conv = make_conv(2, 4, 6, (3, 3))
    bound = max_ranks(kind, conv)
    if kind == "tucker2":
        rank = {"zero": (0, 2), "too large": (2, bound[1] + 1), "not an int": (2, 1.5)}[which]
    else:
        rank = {"zero": 0, "too large": bound + 1, "not an int": True}[which]
    # The message names the layer's shape, the offending rank and what is allowed.
    allowed = bound[1] if kind == "tucker2" else bound
    error, expected = {
        "zero": (ValueError, "must be at least 1, got 0"),
        "too large": (ValueError, f"must be at most {allowed}, got {allowed + 1}"),
        "not an int": (TypeError, "must be an int, got"),
    }[which]
    with pytest.raises(error, match=r"weight shape \(6, 4, 3, 3\)") as info:
        factorize(kind, conv, rank)
    assert expected in str(info.value)
    if kind == "tucker2":
        assert ("r_out" if which == "zero" else "r_in") in str(info.value)


def test_bad_arguments_raise():
    conv = make_conv(2, 4, 6, (3, 3))
    with pytest.raises(ValueError, match="sequence of 2 ints"):
        Tucker2Conv.from_dense(conv, (1, 2, 3))
    with pytest.raises(ValueError, match="scheme"):
        SVDConv.from_dense(conv, 2, scheme="diagonal")
    with pytest.raises(ValueError, match="scheme"):
        SVDConv.rank_for_budget(conv, 500, scheme="diagonal")
    with pytest.raises(ValueError, match="scheme"):
        SVDConv.rank_matrices(conv, scheme="diagonal")
    for bad_budget in (-1, 0.5, True, "many"):
        for cls in (Tucker2Conv, CPConv, SVDConv):
            with pytest.raises(ValueError, match="max_params"):
                cls.rank_for_budget(conv, bad_budget)
    with pytest.raises(ValueError, match="stride"):
        Tucker2Conv(4, 6, [3, 3], 2, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        CPConv(4, 6, [3, 3], 2, padding_mode="mirror")
    with pytest.raises(ValueError, match="groups"):
        SVDConv(4, 6, [3, 3], 2, groups=4)
    with pytest.raises(ValueError, match="kernel_size"):
        CPConv(4, 6, 3, 2)


@pytest.mark.parametrize("make", [lambda: nn.Linear(4, 4), lambda: nn.ConvTranspose2d(4, 4, 3)])
def test_non_convolutions_raise(make):
    for build in (lambda m: Tucker2Conv.from_dense(m, 2), lambda m: CPConv.from_dense(m, 2),
                  lambda m: SVDConv.from_dense(m, 2), lambda m: Tucker2Conv.rank_for_budget(m, 100),
                  lambda m: CPConv.rank_for_budget(m, 100), lambda m: SVDConv.rank_for_budget(m, 100),
                  lambda m: Tucker2Conv.rank_matrices(m), lambda m: SVDConv.rank_matrices(m)):
        with pytest.raises(TypeError, match="Conv"):
            build(make())


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_tucker2_refuses_depthwise(dim):
    depthwise = CONV[dim](8, 16, 3, groups=8)
    for call in (lambda: Tucker2Conv.from_dense(depthwise, (1, 1)),
                 lambda: Tucker2Conv.rank_for_budget(depthwise, 10**6),
                 lambda: Tucker2Conv.rank_matrices(depthwise)):
        with pytest.raises(UnsupportedLayerError, match="depthwise"):
            call()
    # The other schemes handle one input channel per group.
    gen = generator(12)
    with torch.no_grad():
        depthwise.weight.copy_(randn(*depthwise.weight.shape, gen=gen, dtype=torch.float32))
    x = randn(2, 8, *(6,) * dim, gen=gen, dtype=torch.float32)
    assert_same_output(SVDConv.from_dense(depthwise, 2)(x), depthwise(x), rtol=1e-5)
    assert SVDConv.rank_for_budget(depthwise, 10**6) == 2 and CPConv.rank_for_budget(depthwise, 10**6) >= 1


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 4, 3), nn.Conv3d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2)])
def test_spatial_scheme_needs_ungrouped_conv2d(conv):
    for call in (lambda: SVDConv.from_dense(conv, 2, scheme="spatial"),
                 lambda: SVDConv.rank_for_budget(conv, 10**6, scheme="spatial"),
                 lambda: SVDConv.rank_matrices(conv, scheme="spatial")):
        with pytest.raises(UnsupportedLayerError, match="Conv2d without groups"):
            call()


# ----------------------------------------------------------------------------- dtype, device, batching, autograd


@pytest.mark.parametrize("kind", KINDS)
def test_float32_and_half_dtypes_kept(kind):
    conv = make_conv(2, 6, 8, (3, 3), dtype=torch.float32, padding=1)
    x = randn(2, 6, 7, 7, gen=generator(13), dtype=torch.float32)
    rank = max_ranks(kind, conv)
    module = factorize(kind, conv, rank if kind != "cp" else 4, **({"n_iter_max": 3} if kind == "cp" else {}))
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert module(x).dtype == torch.float32 and module.to_dense().weight.dtype == torch.float32
    assert_same_output(module(x), module.to_dense()(x), rtol=1e-5)
    if kind != "cp":
        assert_same_output(module(x), conv(x), rtol=1e-4)
    half = factorize(kind, conv.to(torch.bfloat16), rank if kind != "cp" else 4)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_device_kept(kind):
    # Built on the meta device (no data), the module's parameters and outputs stay there, with the dense shapes.
    conv = nn.Conv2d(6, 8, 3, stride=2, padding="valid", device="meta")
    cls, rank = {"tucker2": (Tucker2Conv, (2, 3)), "cp": (CPConv, 3)}.get(kind, (SVDConv, 3))
    options = {"scheme": kind.removeprefix("svd-")} if kind.startswith("svd") else {}
    module = cls(6, 8, [3, 3], rank, stride=2, padding="valid", device="meta", **options)
    assert all(p.device.type == "meta" for p in module.parameters())
    x = torch.empty(2, 6, 11, 11, device="meta")
    assert module(x).device.type == "meta" and module(x).shape == conv(x).shape
    if torch.cuda.is_available():
        module = factorize(kind, make_conv(2, 6, 8, (3, 3), dtype=torch.float32).cuda(), rank)
        assert module(torch.randn(2, 6, 9, 9, device="cuda")).device.type == "cuda"


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input_and_input_gradient(kind):
    conv = make_conv(2, 4, 6, (3, 2), padding="same", padding_mode="circular")
    module = factorize(kind, conv, 2)
    dense = module.to_dense()
    x = randn(3, 4, 6, 7, gen=generator(14)).requires_grad_()
    assert_same_output(module(x[1]), dense(x[1]))
    # The chain is the same linear map as its dense kernel: the gradients agree too.
    probe = randn(3, 6, 6, 7, gen=generator(15))
    (grad_module,) = torch.autograd.grad((module(x) * probe).sum(), x)
    (grad_dense,) = torch.autograd.grad((dense(x) * probe).sum(), x)
    assert_same_output(grad_module, grad_dense)
    assert all(p.grad is None for p in module.parameters())
    (module(x) * probe).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_forward_never_rebuilds_the_kernel(kind):
    conv = make_conv(2, 4, 6, (3, 3), padding=1)
    module = factorize(kind, conv, 2)
    expected = module.to_dense()(randn(1, 4, 5, 5, gen=generator(16)))
    with mock.patch.object(type(module), "weight", property(lambda self: pytest.fail("forward rebuilt the kernel"))):
        assert_same_output(module(randn(1, 4, 5, 5, gen=generator(16))), expected)
