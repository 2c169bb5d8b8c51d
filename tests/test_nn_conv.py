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
from lowrank.nn.conv import (
    CPConv,
    SVDConv,
    Tucker2Conv,
    cp_rank_for_ratio,
    svd_rank_for_ratio,
    tucker2_ranks_for_ratio,
)

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


def weight_params(module):
    return module.num_params - (0 if module.bias is None else module.bias.numel())


@pytest.mark.parametrize(
    ("dim", "in_channels", "out_channels", "kernel", "groups"),
    [
        (2, 64, 64, (3, 3), 1),
        (2, 32, 96, (3, 3), 1),
        (1, 48, 16, (5,), 2),
        (3, 8, 12, (3, 3, 3), 4),
        (2, 3, 64, (7, 7), 1),
    ],
)
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.9])
def test_ratio_helpers_give_largest_fitting_ranks(dim, in_channels, out_channels, kernel, groups, ratio):
    conv = CONV[dim](in_channels, out_channels, kernel, groups=groups)
    budget = ratio * conv.weight.numel()
    out_group, in_group = out_channels // groups, in_channels // groups

    def tucker_params(r_out, r_in):
        return groups * (in_group * r_in + r_in * r_out * math.prod(kernel) + out_group * r_out)

    r_out, r_in = tucker2_ranks_for_ratio(conv, ratio)
    if r_out:
        module = Tucker2Conv(in_channels, out_channels, kernel, (r_out, r_in), groups=groups)
        assert weight_params(module) == tucker_params(r_out, r_in) <= budget
        assert abs(r_out / out_group - r_in / in_group) <= 1 / min(out_group, in_group)
    if r_out < out_group and r_in < in_group:
        assert tucker_params(r_out + 1, r_in + 1) > budget  # one more on both ranks no longer fits

    cases = [
        (cp_rank_for_ratio(conv, ratio), "cp", CPConv, in_group + out_group + sum(kernel)),
        (svd_rank_for_ratio(conv, ratio), "svd-channel", SVDConv, in_group * math.prod(kernel) + out_group),
    ]
    for rank, kind, cls, per_group_and_rank in cases:
        per_rank = groups * per_group_and_rank
        assert rank * per_rank <= budget
        assert rank == max_ranks(kind, conv) or (rank + 1) * per_rank > budget
        if rank:
            assert weight_params(cls(in_channels, out_channels, kernel, rank, groups=groups)) == rank * per_rank

    if dim == 2 and groups == 1:
        rank = svd_rank_for_ratio(conv, ratio, scheme="spatial")
        per_rank = in_channels * kernel[0] + out_channels * kernel[1]
        assert rank * per_rank <= budget
        assert rank == max_ranks("svd-spatial", conv) or (rank + 1) * per_rank > budget


def test_ratio_helpers_known_values_and_nothing_fits():
    conv = nn.Conv2d(64, 64, 3)
    # Tucker-2 (25, 25): 64*25 + 25*25*9 + 64*25 = 8825 <= 9216 < 9412 for (26, 26)
    assert tucker2_ranks_for_ratio(conv, 0.25) == (25, 25)
    assert cp_rank_for_ratio(conv, 0.25) == 9216 // (64 + 64 + 3 + 3)
    assert svd_rank_for_ratio(conv, 0.25) == 9216 // (64 * 9 + 64)
    assert svd_rank_for_ratio(conv, 0.25, scheme="spatial") == 9216 // (64 * 3 + 64 * 3)
    tiny = 1e-4
    assert tucker2_ranks_for_ratio(conv, tiny) == (0, 0)
    assert cp_rank_for_ratio(conv, tiny) == svd_rank_for_ratio(conv, tiny) == 0
    # Above the full size, the ranks stop at their bounds.
    assert tucker2_ranks_for_ratio(conv, 10.0) == (64, 64)
    assert svd_rank_for_ratio(conv, 10.0) == 64


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
    # The message names the layer's shape and the allowed range of the offending rank.
    allowed = (bound[0] if which == "zero" else bound[1]) if kind == "tucker2" else bound
    with pytest.raises(ValueError, match=r"weight shape \(6, 4, 3, 3\)") as info:
        factorize(kind, conv, rank)
    assert f"[1, {allowed}]" in str(info.value)


def test_bad_arguments_raise():
    conv = make_conv(2, 4, 6, (3, 3))
    with pytest.raises(ValueError, match=r"\(r_out, r_in\)"):
        Tucker2Conv.from_dense(conv, (1, 2, 3))
    with pytest.raises(ValueError, match="scheme"):
        SVDConv.from_dense(conv, 2, scheme="diagonal")
    with pytest.raises(ValueError, match="scheme"):
        svd_rank_for_ratio(conv, 0.5, scheme="diagonal")
    for bad_ratio in (0, -0.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="ratio"):
            tucker2_ranks_for_ratio(conv, bad_ratio)
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
                  lambda m: SVDConv.from_dense(m, 2), lambda m: tucker2_ranks_for_ratio(m, 0.5)):
        with pytest.raises(TypeError, match="Conv"):
            build(make())


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_tucker2_refuses_depthwise(dim):
    depthwise = CONV[dim](8, 16, 3, groups=8)
    with pytest.raises(UnsupportedLayerError, match="depthwise"):
        Tucker2Conv.from_dense(depthwise, (1, 1))
    # The other schemes handle one input channel per group.
    gen = generator(12)
    with torch.no_grad():
        depthwise.weight.copy_(randn(*depthwise.weight.shape, gen=gen, dtype=torch.float32))
    x = randn(2, 8, *(6,) * dim, gen=gen, dtype=torch.float32)
    assert_same_output(SVDConv.from_dense(depthwise, 2)(x), depthwise(x), rtol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 4, 3), nn.Conv3d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2)])
def test_spatial_scheme_needs_ungrouped_conv2d(conv):
    with pytest.raises(UnsupportedLayerError, match="Conv2d without groups"):
        SVDConv.from_dense(conv, 2, scheme="spatial")
    with pytest.raises(UnsupportedLayerError, match="Conv2d without groups"):
        svd_rank_for_ratio(conv, 0.5, scheme="spatial")


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
