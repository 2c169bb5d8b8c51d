"""Factorized convolutions: Tucker-2, CP and SVD (channel and spatial) chains of small convolutions.

Each module replaces one ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` and keeps
its stride, padding (ints, per-dimension tuples, ``"same"``, ``"valid"``),
dilation, groups, padding mode, bias, dtype and device. The forward pass runs
the factors as a chain of small convolutions and never rebuilds the dense
kernel.

Every padding mode is a per-dimension index map (zero padding aside), which
commutes with channel mixing and with convolutions along other dimensions. So
a ``"reflect"``, ``"replicate"`` or ``"circular"`` chain pads once, right before
its first spatial convolution, and then runs unpadded convolutions; a
``"zeros"`` chain gives each spatial convolution the padding of its own
dimensions (``"same"`` included, whose even-kernel asymmetry PyTorch then
applies per dimension, as the dense convolution does).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lowrank.decompose import CP, cp, svd, tucker
from lowrank.nn.base import FactorizedModule, UnsupportedLayerError, conv_output_shape, conv_output_size

CONV_TYPES: dict[int, type[nn.modules.conv._ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
SVD_SCHEMES = ("channel", "spatial")

_CONV_FUNCTIONS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _as_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """``value`` repeated ``n`` times (an int) or checked to hold ``n`` ints (a sequence)."""
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or {n} ints, got {value!r}")
    return tuple(values)


def _check_rank(value: Any, name: str, maximum: int, layer: str) -> int:
    """``value`` as an int, raising a ``ValueError`` unless ``1 <= value <= maximum``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        rank = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} for {layer} must be an int in [1, {maximum}], got {value!r}") from None
    if not 1 <= rank <= maximum:
        raise ValueError(f"{name} for {layer} must be in [1, {maximum}], got {rank}")
    return rank


def _check_ratio(ratio: float) -> float:
    """``ratio`` as a float, raising a ``ValueError`` unless it is a positive finite number."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < math.inf:
        raise ValueError(f"ratio must be a positive number (the fraction of weight parameters kept), got {ratio!r}")
    return float(ratio)


def _dense_conv(conv: nn.Module) -> nn.modules.conv._ConvNd:
    """``conv`` if it is an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``; a ``TypeError`` otherwise."""
    if not isinstance(conv, tuple(CONV_TYPES.values())):
        raise TypeError(f"expected an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}")
    return conv


def _conv_hyperparameters(conv: nn.modules.conv._ConvNd | _FactorizedConv) -> dict[str, Any]:
    """The JSON-able keyword arguments of a factorized convolution that describe ``conv`` (dense or factorized)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
        "dilation": list(conv.dilation),
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _group_shape(conv: nn.modules.conv._ConvNd | _FactorizedConv) -> tuple[int, ...]:
    """The shape of one group's kernel, ``(out/groups, in/groups, *kernel_size)``."""
    return (conv.out_channels // conv.groups, conv.in_channels // conv.groups, *conv.kernel_size)


def _describe(conv: nn.modules.conv._ConvNd | _FactorizedConv) -> str:
    """``"a Conv2d with weight shape (out, in/groups, kh, kw) and groups=g"``."""
    name = CONV_TYPES[len(conv.kernel_size)].__name__
    shape = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    return f"a {name} with weight shape {shape} and groups={conv.groups}"


def _pointwise_in(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A bias-free 1x1 convolution of ``x`` by ``weight`` ``(r, in/groups, 1, ...)``, laid out channels-last.

    Without groups it is one batched GEMM that writes the channels-last layout
    directly, the layout in which the depthwise convolutions of :class:`CPConv`
    run fastest on CPU. Grouped ones run ``F.convNd``.
    """
    if groups > 1:
        return _CONV_FUNCTIONS[x.ndim - 2](x, weight, groups=groups)
    n, _, *spatial = x.shape
    rows = x.flatten(2).transpose(1, 2)  # (N, L, in): a view for NC... and channels-last inputs
    out = torch.bmm(rows, weight.flatten(1).t().expand(n, -1, -1))  # (N, L, r), contiguous
    return out.view(n, *spatial, -1).movedim(-1, 1)


def _channels_last(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with its input channels stored last (no copy when they already are).

    A convolution with such a weight runs channels-last, which on CPU (oneDNN)
    is the fastest layout for the narrow core of a Tucker-2 chain.
    """
    return weight.movedim(1, -1).contiguous().movedim(-1, 1)


def _pointwise_out(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """The closing 1x1 convolution of a chain, ``(out, r/groups, 1, ...)`` plus ``bias``; contiguous result.

    Without groups it is one batched GEMM that reads ``h`` in any layout (channels-last
    included) and writes the usual contiguous ``(N, out, ...)`` layout.
    """
    if groups > 1:
        return _CONV_FUNCTIONS[h.ndim - 2](h, weight, bias, groups=groups)
    n, _, *spatial = h.shape
    columns = h.flatten(2)
    matrix = weight.flatten(1).expand(n, -1, -1)
    out = torch.bmm(matrix, columns) if bias is None else torch.baddbmm(bias[:, None], matrix, columns)
    return out.view(n, -1, *spatial)


class _FactorizedConv(FactorizedModule):
    """The hyper-parameters, padding and dense rebuild shared by the factorized convolutions.

    The attributes ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
    ``padding``, ``dilation``, ``groups`` and ``padding_mode`` mean what they mean
    on ``nn.ConvNd``.
    """

    bias: nn.Parameter | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: int | Sequence[int],
        padding: int | Sequence[int] | str,
        dilation: int | Sequence[int],
        groups: int,
        padding_mode: str,
    ) -> None:
        super().__init__()
        if isinstance(kernel_size, int) or len(kernel_size) not in CONV_TYPES:
            raise ValueError(f"kernel_size must list 1, 2 or 3 ints (one per spatial dimension), got {kernel_size!r}")
        n = len(kernel_size)
        self.kernel_size = _as_tuple(kernel_size, n, "kernel_size")
        self.stride = _as_tuple(stride, n, "stride")
        self.dilation = _as_tuple(dilation, n, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, {n} ints, 'same' or 'valid', got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(f"padding='same' needs stride 1, got stride {self.stride}")
            self.padding: tuple[int, ...] | str = padding
        else:
            self.padding = _as_tuple(padding, n, "padding")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups must divide in_channels={in_channels} and out_channels={out_channels}, got {groups}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.padding_mode = padding_mode
        self._conv = _CONV_FUNCTIONS[n]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded in every spatial dimension for a non-zero padding mode, unchanged for ``"zeros"``.

        The amounts are those ``nn.ConvNd`` uses (for ``"same"``, the extra pad of
        an even kernel goes to the end).
        """
        if self.padding_mode == "zeros":
            return x
        amounts = []
        for i in reversed(range(len(self.kernel_size))):
            if self.padding == "valid":
                amounts += [0, 0]
            elif self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                amounts += [total // 2, total - total // 2]
            else:
                amounts += [self.padding[i], self.padding[i]]
        return F.pad(x, amounts, mode=self.padding_mode)

    def _stage(self, dims: Sequence[int]) -> dict[str, Any]:
        """``stride``, ``padding`` and ``dilation`` of a convolution whose kernel spans the spatial ``dims``.

        The others get stride 1, dilation 1 and no padding; after :meth:`_pad` (a
        non-zero padding mode) no dimension is padded again.
        """
        n = len(self.kernel_size)
        if self.padding_mode != "zeros":
            padding: tuple[int, ...] | str = (0,) * n
        elif isinstance(self.padding, str):
            padding = self.padding
        else:
            padding = tuple(self.padding[i] if i in dims else 0 for i in range(n))
        return {
            "stride": tuple(self.stride[i] if i in dims else 1 for i in range(n)),
            "padding": padding,
            "dilation": tuple(self.dilation[i] if i in dims else 1 for i in range(n)),
        }

    def _output_size(self, i: int, size: int) -> int:
        """Length of spatial dimension ``i`` after the convolution along it."""
        padding = self.padding if isinstance(self.padding, str) else self.padding[i]
        return conv_output_size(size, self.kernel_size[i], self.stride[i], padding, self.dilation[i])

    def _batched(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``x`` with a batch dimension (added when ``x`` is unbatched, as ``nn.ConvNd`` accepts), and whether."""
        unbatched = x.ndim == len(self.kernel_size) + 1
        return (x.unsqueeze(0) if unbatched else x), unbatched

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel ``(out_channels, in_channels / groups, *kernel_size)``, rebuilt on every access.

        For checks, export and code that reads ``layer.weight.dtype``; the forward never uses it.
        """
        raise NotImplementedError

    def to_dense(self) -> nn.modules.conv._ConvNd:
        """An ``nn.ConvNd`` with this module's hyper-parameters whose weight is the rebuilt kernel."""
        weight = self.weight.detach()
        conv = CONV_TYPES[len(self.kernel_size)](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        """The hyper-parameters, as ``nn.ConvNd`` prints them."""
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * len(self.kernel_size):
            text += f", padding={self.padding!r}"
        if self.dilation != (1,) * len(self.kernel_size):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text


def _pointwise_shape(rows: int, cols: int, n: int) -> tuple[int, ...]:
    """The weight shape of a 1x1 convolution in ``n`` spatial dimensions."""
    return (rows, cols, *(1,) * n)


class Tucker2Conv(_FactorizedConv):
    """Tucker-2 convolution (Kim et al. 2016): 1x1 in->r_in, core conv r_in->r_out, 1x1 r_out->out.

    The kernel is ``core ×_0 U_out ×_1 U_in``: the first 1x1 convolution applies
    ``U_inᵀ``, the core convolution has the original kernel size, stride,
    padding, dilation and padding mode, and the last 1x1 convolution applies
    ``U_out`` and adds the bias. A grouped convolution is decomposed one group at
    a time and all three convolutions keep its ``groups``. A depthwise
    convolution (one input channel per group) has no input-channel mode to
    compress and raises :class:`~lowrank.nn.base.UnsupportedLayerError` (a
    ``ValueError``).

    The core convolution runs channels-last (its weight is handed to it in that
    layout) and the closing 1x1 convolution is one batched GEMM that writes the
    usual contiguous layout: on CPU the fastest of the arrangements that
    ``benchmarks/layers.py`` compares.

    Parameters
    ----------
    in_channels, out_channels : int
        The dense convolution's channels.
    kernel_size : sequence of int
        One size per spatial dimension (1, 2 or 3 of them: Conv1d, Conv2d, Conv3d).
    ranks : int or (int, int)
        ``(r_out, r_in)`` per group, ``1 <= r_out <= out_channels / groups`` and
        ``1 <= r_in <= in_channels / groups``; an int sets both.
    stride, padding, dilation, groups, bias, padding_mode
        As in ``nn.ConvNd`` (``padding`` also ``"same"`` or ``"valid"``).
    device, dtype
        Where and in which dtype the (uninitialised) factors are created.

    Attributes
    ----------
    first : nn.Parameter
        ``(groups * r_in, in_channels / groups, 1, ...)``, the transposed input factors.
    core : nn.Parameter
        ``(groups * r_out, r_in, *kernel_size)``, the cores.
    last : nn.Parameter
        ``(out_channels, r_out, 1, ...)``, the output factors.
    bias : nn.Parameter or None
        ``(out_channels,)``.

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn.conv import Tucker2Conv
    >>> conv = torch.nn.Conv2d(64, 32, 3, padding=1)
    >>> layer = Tucker2Conv.from_dense(conv, (8, 16))
    >>> layer(torch.randn(2, 64, 10, 10)).shape, layer.num_params
    (torch.Size([2, 32, 10, 10]), 2464)

    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        ranks: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        out_group, in_group, *_ = _group_shape(self)
        if in_group == 1:
            raise UnsupportedLayerError(
                f"Tucker-2 does not apply to {_describe(self)}: it has one input channel per group "
                "(a depthwise convolution), so there is no input-channel mode to compress"
            )
        pair = tuple(ranks) if isinstance(ranks, Sequence) and not isinstance(ranks, str) else (ranks, ranks)
        if len(pair) != 2:
            raise ValueError(f"Tucker-2 ranks for {_describe(self)} must be (r_out, r_in), got {ranks!r}")
        self.ranks = (
            _check_rank(pair[0], "r_out (per group)", out_group, _describe(self)),
            _check_rank(pair[1], "r_in (per group)", in_group, _describe(self)),
        )
        r_out, r_in = self.ranks
        n, kwargs = len(self.kernel_size), {"device": device, "dtype": dtype}
        self.first = nn.Parameter(torch.empty(_pointwise_shape(groups * r_in, in_group, n), **kwargs))
        self.core = nn.Parameter(torch.empty(groups * r_out, r_in, *self.kernel_size, **kwargs))
        self.last = nn.Parameter(torch.empty(_pointwise_shape(out_channels, r_out, n), **kwargs))
        self.bias = nn.Parameter(torch.empty(out_channels, **kwargs)) if bias else None

    @classmethod
    def from_dense(cls, conv: nn.Module, rank: int | Sequence[int], **tucker_options: Any) -> Tucker2Conv:
        """Decompose a dense convolution's kernel by Tucker-2 (HOOI on its channel modes).

        Parameters
        ----------
        conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
            The dense convolution; it is not modified. Depthwise convolutions (one
            input channel per group) raise :class:`~lowrank.nn.base.UnsupportedLayerError`.
        rank : int or (int, int)
            ``(r_out, r_in)`` per group (an int sets both); see the class.
        **tucker_options
            Passed on to :func:`lowrank.decompose.tucker` (``method=``, ``n_iter_max=``, ...).

        Returns
        -------
        Tucker2Conv
            On the convolution's device, in its dtype.

        """
        conv = _dense_conv(conv)
        weight = conv.weight.detach()
        module = cls(**_conv_hyperparameters(conv), ranks=rank, device=weight.device, dtype=weight.dtype)
        (r_out, r_in), groups = module.ranks, conv.groups
        with torch.no_grad():
            first = module.first.view(groups, r_in, -1)
            core = module.core.view(groups, r_out, r_in, *conv.kernel_size)
            last = module.last.view(groups, -1, r_out)
            for g, kernel in enumerate(weight.chunk(groups)):
                f = tucker(kernel, (r_out, r_in), modes=(0, 1), **tucker_options)
                u_out, u_in = f.factors
                first[g].copy_(u_in.T)
                core[g].copy_(f.core)
                last[g].copy_(u_out)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """1x1 convolution to ``r_in`` channels, core convolution, 1x1 convolution to ``out_channels``."""
        x, unbatched = self._batched(x)
        h = self._pad(self._conv(x, self.first, groups=self.groups))
        h = self._conv(h, _channels_last(self.core), groups=self.groups, **self._stage(range(len(self.kernel_size))))
        out = _pointwise_out(h, self.last, self.bias, self.groups)
        return out.squeeze(0) if unbatched else out

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel ``core ×_0 U_out ×_1 U_in`` of every group, rebuilt on every access."""
        groups, (r_out, r_in) = self.groups, self.ranks
        last = self.last.reshape(groups, -1, r_out)
        core = self.core.reshape(groups, r_out, r_in, -1)
        first = self.first.reshape(groups, r_in, -1)
        kernel = torch.einsum("goa,gabk,gbi->goik", last, core, first)
        return kernel.reshape(self.out_channels, -1, *self.kernel_size)

    def config(self) -> dict[str, Any]:
        """The hyper-parameters of the dense convolution and ``ranks`` ``[r_out, r_in]`` (per group)."""
        return {**_conv_hyperparameters(self), "ranks": list(self.ranks)}

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of the three convolutions on an ``(N, C, *spatial)`` input."""
        batch, _, *spatial = input_shape
        positions_in = batch * math.prod(spatial)
        positions_out = batch * math.prod(conv_output_shape(self, tuple(spatial)))
        return positions_in * self.first.numel() + positions_out * (self.core.numel() + self.last.numel())

    def extra_repr(self) -> str:
        """The hyper-parameters and the ranks."""
        return f"{super().extra_repr()}, ranks={self.ranks}"


def _balanced_cp_factors(f: CP) -> list[torch.Tensor]:
    """The factors of ``f`` with its weights spread evenly: each component's columns get equal norms.

    Keeps every factor equally well scaled for training and low-precision
    arithmetic (ALS leaves arbitrary scales between the factors).
    """
    work = torch.promote_types(f.dtype, torch.float32)
    factors = [factor.to(work) for factor in f.factors]
    norms = torch.stack([torch.linalg.vector_norm(factor, dim=0) for factor in factors])
    scale = (f.weights.to(work).abs() * norms.prod(0)) ** (1 / len(factors))
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    balanced = [factor / norm * scale for factor, norm in zip(factors, safe)]
    balanced[0] = balanced[0] * torch.sign(f.weights.to(work))
    return [factor.to(f.dtype) for factor in balanced]


class CPConv(_FactorizedConv):
    """CP convolution (Lebedev et al. 2015): 1x1 in->R, one depthwise conv per spatial dimension, 1x1 R->out.

    The kernel is a sum of ``R`` rank-one terms ``a_out ⊗ a_in ⊗ k_1 ⊗ ... ⊗ k_d``.
    The first 1x1 convolution applies the input factors, then one depthwise
    convolution per spatial dimension ``i`` (kernel ``k_i`` along it, 1 along the
    others, ``groups = R``) carries that dimension's stride, padding and
    dilation, and the last 1x1 convolution applies the output factors and adds
    the bias. A grouped convolution is decomposed one group at a time (``R`` per
    group) and both 1x1 convolutions keep its ``groups``. Without groups, both
    1x1 convolutions are batched GEMMs and the first writes the channels-last
    layout, in which the depthwise convolutions run fastest on CPU.

    Parameters
    ----------
    in_channels, out_channels : int
        The dense convolution's channels.
    kernel_size : sequence of int
        One size per spatial dimension (1, 2 or 3 of them).
    rank : int
        CP rank ``R`` per group, at most ``prod(group kernel shape) / max(group kernel shape)``
        where a group's kernel is ``(out/groups, in/groups, *kernel_size)`` (the bound of
        :func:`lowrank.decompose.cp`).
    stride, padding, dilation, groups, bias, padding_mode
        As in ``nn.ConvNd`` (``padding`` also ``"same"`` or ``"valid"``).
    device, dtype
        Where and in which dtype the (uninitialised) factors are created.

    Attributes
    ----------
    first : nn.Parameter
        ``(groups * R, in_channels / groups, 1, ...)``, the input factors.
    spatial : nn.ParameterList
        One ``(groups * R, 1, 1, ..., k_i, ..., 1)`` depthwise kernel per spatial dimension.
    last : nn.Parameter
        ``(out_channels, R, 1, ...)``, the output factors.
    bias : nn.Parameter or None
        ``(out_channels,)``.

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn.conv import CPConv
    >>> conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    >>> layer = CPConv.from_dense(conv, 8)
    >>> layer(torch.randn(2, 16, 10, 10)).shape, layer.num_params
    (torch.Size([2, 32, 10, 10]), 464)

    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        rank: int,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        shape = _group_shape(self)
        self.rank = _check_rank(rank, "CP rank (per group)", math.prod(shape) // max(shape), _describe(self))
        n, channels, kwargs = len(self.kernel_size), groups * self.rank, {"device": device, "dtype": dtype}
        self.first = nn.Parameter(torch.empty(_pointwise_shape(channels, shape[1], n), **kwargs))
        self.spatial = nn.ParameterList(
            nn.Parameter(torch.empty(channels, 1, *(k if j == i else 1 for j in range(n)), **kwargs))
            for i, k in enumerate(self.kernel_size)
        )
        self.last = nn.Parameter(torch.empty(_pointwise_shape(out_channels, self.rank, n), **kwargs))
        self.bias = nn.Parameter(torch.empty(out_channels, **kwargs)) if bias else None

    @classmethod
    def from_dense(cls, conv: nn.Module, rank: int, **cp_options: Any) -> CPConv:
        """Decompose a dense convolution's kernel by CP-ALS, one group at a time.

        Parameters
        ----------
        conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
            The dense convolution; it is not modified.
        rank : int
            CP rank per group; see the class.
        **cp_options
            Passed on to :func:`lowrank.decompose.cp` (``n_iter_max=``, ``tol=``, ``init=``, ``seed=``, ...).

        Returns
        -------
        CPConv
            On the convolution's device, in its dtype, with every rank-one term's
            scale spread evenly over its factors.

        """
        conv = _dense_conv(conv)
        weight = conv.weight.detach()
        module = cls(**_conv_hyperparameters(conv), rank=rank, device=weight.device, dtype=weight.dtype)
        rank, groups = module.rank, conv.groups
        with torch.no_grad():
            first = module.first.view(groups, rank, -1)
            spatial = [kernel.view(groups, rank, -1) for kernel in module.spatial]
            last = module.last.view(groups, -1, rank)
            for g, kernel in enumerate(weight.chunk(groups)):
                a_out, a_in, *a_spatial = _balanced_cp_factors(cp(kernel, rank, **cp_options))
                first[g].copy_(a_in.T)
                for target, factor in zip(spatial, a_spatial):
                    target[g].copy_(factor.T)
                last[g].copy_(a_out)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """1x1 convolution to ``R`` channels, a depthwise convolution per spatial dimension, 1x1 to ``out``."""
        x, unbatched = self._batched(x)
        h = self._pad(_pointwise_in(x, self.first, self.groups))
        for i, kernel in enumerate(self.spatial):
            h = self._conv(h, kernel, groups=kernel.shape[0], **self._stage([i]))
        out = _pointwise_out(h, self.last, self.bias, self.groups)
        return out.squeeze(0) if unbatched else out

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel, the sum of the rank-one terms of every group, rebuilt on every access."""
        groups, rank, n = self.groups, self.rank, len(self.kernel_size)
        letters = "xyz"[:n]
        operands = [self.last.reshape(groups, -1, rank), self.first.reshape(groups, rank, -1)]
        operands += [kernel.reshape(groups, rank, -1) for kernel in self.spatial]
        spec = "gor,gri," + ",".join(f"gr{c}" for c in letters) + "->goi" + letters
        return torch.einsum(spec, *operands).reshape(self.out_channels, -1, *self.kernel_size)

    def config(self) -> dict[str, Any]:
        """The hyper-parameters of the dense convolution and the CP ``rank`` (per group)."""
        return {**_conv_hyperparameters(self), "rank": self.rank}

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of the 1x1, depthwise and 1x1 convolutions on an ``(N, C, *spatial)`` input."""
        batch, _, *spatial = input_shape
        total = batch * math.prod(spatial) * self.first.numel()
        for i, kernel in enumerate(self.spatial):
            spatial[i] = self._output_size(i, spatial[i])
            total += batch * math.prod(spatial) * kernel.numel()
        return total + batch * math.prod(spatial) * self.last.numel()

    def extra_repr(self) -> str:
        """The hyper-parameters and the rank."""
        return f"{super().extra_repr()}, rank={self.rank}"


class SVDConv(_FactorizedConv):
    """A convolution split in two by a truncated SVD of its kernel, over channels or over space.

    ``scheme="channel"``: a ``kernel_size`` convolution ``in -> r`` carrying the
    stride, padding, dilation and padding mode, then a 1x1 convolution
    ``r -> out`` with the bias, from the SVD of the ``(out, in * prod(kernel))``
    matrix (per group: both convolutions keep ``groups`` and ``r`` is per group).

    ``scheme="spatial"`` (Conv2d without groups only; Jaderberg et al. 2014): a
    ``(kh, 1)`` convolution ``in -> r``, then a ``(1, kw)`` convolution
    ``r -> out`` with the bias, each carrying its own dimension's stride,
    padding and dilation, from the SVD of the kernel rearranged as an
    ``(in * kh, out * kw)`` matrix.

    Parameters
    ----------
    in_channels, out_channels : int
        The dense convolution's channels.
    kernel_size : sequence of int
        One size per spatial dimension (1, 2 or 3 of them; 2 for ``"spatial"``).
    rank : int
        ``"channel"``: ``1 <= r <= min(out / groups, in / groups * prod(kernel_size))``;
        ``"spatial"``: ``1 <= r <= min(in * kh, out * kw)``.
    scheme : {"channel", "spatial"}
        The split; see above.
    stride, padding, dilation, groups, bias, padding_mode
        As in ``nn.ConvNd`` (``padding`` also ``"same"`` or ``"valid"``).
    device, dtype
        Where and in which dtype the (uninitialised) factors are created.

    Attributes
    ----------
    first : nn.Parameter
        ``"channel"``: ``(groups * r, in / groups, *kernel_size)``; ``"spatial"``: ``(r, in, kh, 1)``.
    second : nn.Parameter
        ``"channel"``: ``(out, r, 1, ...)``; ``"spatial"``: ``(out, r, 1, kw)``.
    bias : nn.Parameter or None
        ``(out_channels,)``.

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn.conv import SVDConv
    >>> conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    >>> layer = SVDConv.from_dense(conv, 8, scheme="spatial")
    >>> layer(torch.randn(2, 16, 10, 10)).shape, layer.num_params
    (torch.Size([2, 32, 10, 10]), 1184)

    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        rank: int,
        scheme: str = "channel",
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        if scheme not in SVD_SCHEMES:
            raise ValueError(f"scheme must be one of {SVD_SCHEMES}, got {scheme!r}")
        self.scheme = scheme
        n, kwargs = len(self.kernel_size), {"device": device, "dtype": dtype}
        if scheme == "spatial":
            if n != 2 or groups != 1:
                raise UnsupportedLayerError(
                    f"the spatial SVD scheme needs a Conv2d without groups, got {_describe(self)}; "
                    "use scheme='channel'"
                )
            kh, kw = self.kernel_size
            maximum = min(in_channels * kh, out_channels * kw)
            self.rank = _check_rank(rank, "spatial SVD rank", maximum, _describe(self))
            self.first = nn.Parameter(torch.empty(self.rank, in_channels, kh, 1, **kwargs))
            self.second = nn.Parameter(torch.empty(out_channels, self.rank, 1, kw, **kwargs))
        else:
            out_group, in_group, *_ = _group_shape(self)
            maximum = min(out_group, in_group * math.prod(self.kernel_size))
            self.rank = _check_rank(rank, "channel SVD rank (per group)", maximum, _describe(self))
            self.first = nn.Parameter(torch.empty(groups * self.rank, in_group, *self.kernel_size, **kwargs))
            self.second = nn.Parameter(torch.empty(_pointwise_shape(out_channels, self.rank, n), **kwargs))
        self.bias = nn.Parameter(torch.empty(out_channels, **kwargs)) if bias else None

    @classmethod
    def from_dense(cls, conv: nn.Module, rank: int, scheme: str = "channel", **svd_options: Any) -> SVDConv:
        """Split a dense convolution in two by a truncated SVD of its kernel.

        Parameters
        ----------
        conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
            The dense convolution; it is not modified. ``scheme="spatial"`` needs an
            ``nn.Conv2d`` with ``groups=1`` and raises
            :class:`~lowrank.nn.base.UnsupportedLayerError` otherwise.
        rank : int
            The rank kept (per group for ``"channel"``); see the class.
        scheme : {"channel", "spatial"}
            The split; see the class.
        **svd_options
            Passed on to :func:`lowrank.decompose.svd` (``method=``, ``seed=``, ...).

        Returns
        -------
        SVDConv
            On the convolution's device, in its dtype, the singular values split
            evenly between the two factors.

        """
        conv = _dense_conv(conv)
        weight = conv.weight.detach()
        module = cls(**_conv_hyperparameters(conv), rank=rank, scheme=scheme, device=weight.device, dtype=weight.dtype)
        rank, groups = module.rank, conv.groups
        with torch.no_grad():
            if scheme == "spatial":
                out_channels, in_channels, kh, kw = weight.shape
                f = svd(weight.permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw), rank, **svd_options)
                root = f.s.sqrt()
                module.first.copy_((f.u * root).T.reshape(module.first.shape))
                module.second.copy_((root[:, None] * f.vh).reshape(rank, out_channels, 1, kw).transpose(0, 1))
            else:
                first = module.first.view(groups, rank, -1)
                second = module.second.view(groups, -1, rank)
                for g, kernel in enumerate(weight.chunk(groups)):
                    f = svd(kernel.reshape(kernel.shape[0], -1), rank, **svd_options)
                    root = f.s.sqrt()
                    first[g].copy_(root[:, None] * f.vh)
                    second[g].copy_(f.u * root)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The two convolutions of the scheme."""
        x, unbatched = self._batched(x)
        h = self._pad(x)
        if self.scheme == "spatial":
            h = self._conv(h, self.first, **self._stage([0]))
            out = self._conv(h, self.second, self.bias, **self._stage([1]))
        else:
            h = self._conv(h, self.first, groups=self.groups, **self._stage(range(len(self.kernel_size))))
            out = _pointwise_out(h, self.second, self.bias, self.groups)
        return out.squeeze(0) if unbatched else out

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel, the product of the two factors, rebuilt on every access."""
        if self.scheme == "spatial":
            return torch.einsum("rch,orw->ochw", self.first[..., 0], self.second[:, :, 0])
        second = self.second.reshape(self.groups, -1, self.rank)
        first = self.first.reshape(self.groups, self.rank, -1)
        return (second @ first).reshape(self.out_channels, -1, *self.kernel_size)

    def config(self) -> dict[str, Any]:
        """The hyper-parameters of the dense convolution, the ``rank`` and the ``scheme``."""
        return {**_conv_hyperparameters(self), "rank": self.rank, "scheme": self.scheme}

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of the two convolutions on an ``(N, C, *spatial)`` input."""
        batch, _, *spatial = input_shape
        out_positions = batch * math.prod(conv_output_shape(self, tuple(spatial)))
        if self.scheme == "channel":
            return out_positions * (self.first.numel() + self.second.numel())
        middle_positions = batch * self._output_size(0, spatial[0]) * spatial[1]
        return middle_positions * self.first.numel() + out_positions * self.second.numel()

    def extra_repr(self) -> str:
        """The hyper-parameters, the rank and the scheme."""
        return f"{super().extra_repr()}, rank={self.rank}, scheme={self.scheme!r}"


def tucker2_ranks_for_ratio(conv: nn.Module, ratio: float) -> tuple[int, int]:
    """The largest Tucker-2 ranks whose factors keep at most ``ratio`` of ``conv``'s weight parameters.

    Parameters
    ----------
    conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
        The dense convolution.
    ratio : float
        Fraction of ``conv.weight.numel()`` the factors may hold (the bias is not counted).

    Returns
    -------
    (int, int)
        ``(r_out, r_in)`` per group, as :meth:`Tucker2Conv.from_dense` takes them,
        with ``r_out / (out / groups)`` as close to ``r_in / (in / groups)`` as
        integers allow; ``(0, 0)`` when not even ``(1, 1)`` fits.

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn.conv import tucker2_ranks_for_ratio
    >>> tucker2_ranks_for_ratio(torch.nn.Conv2d(64, 64, 3), 0.25)
    (25, 25)

    """
    conv, ratio = _dense_conv(conv), _check_ratio(ratio)
    out_group, in_group, *kernel = _group_shape(conv)
    budget = ratio * out_group * in_group * math.prod(kernel)
    larger, best = max(out_group, in_group), (0, 0)
    for step in range(1, larger + 1):
        r_out = max(1, round(step * out_group / larger))
        r_in = max(1, round(step * in_group / larger))
        if in_group * r_in + r_in * r_out * math.prod(kernel) + out_group * r_out > budget:
            break
        best = (r_out, r_in)
    return best


def cp_rank_for_ratio(conv: nn.Module, ratio: float) -> int:
    """The largest CP rank whose factors keep at most ``ratio`` of ``conv``'s weight parameters.

    Parameters
    ----------
    conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
        The dense convolution.
    ratio : float
        Fraction of ``conv.weight.numel()`` the factors may hold (the bias is not counted).

    Returns
    -------
    int
        The rank per group, as :meth:`CPConv.from_dense` takes it, at most the
        largest rank it accepts; 0 when not even rank 1 fits.

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn.conv import cp_rank_for_ratio
    >>> cp_rank_for_ratio(torch.nn.Conv2d(64, 64, 3), 0.25)
    68

    """
    conv, ratio = _dense_conv(conv), _check_ratio(ratio)
    shape = _group_shape(conv)
    per_rank = shape[0] + shape[1] + sum(shape[2:])
    return min(int(ratio * math.prod(shape) / per_rank), math.prod(shape) // max(shape))


def svd_rank_for_ratio(conv: nn.Module, ratio: float, scheme: str = "channel") -> int:
    """The largest SVD rank whose two factors keep at most ``ratio`` of ``conv``'s weight parameters.

    Parameters
    ----------
    conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
        The dense convolution.
    ratio : float
        Fraction of ``conv.weight.numel()`` the factors may hold (the bias is not counted).
    scheme : {"channel", "spatial"}
        The split of :class:`SVDConv`. ``"spatial"`` raises
        :class:`~lowrank.nn.base.UnsupportedLayerError` unless ``conv`` is an
        ``nn.Conv2d`` with ``groups=1``.

    Returns
    -------
    int
        The rank (per group for ``"channel"``), as :meth:`SVDConv.from_dense`
        takes it, at most the largest rank it accepts; 0 when not even rank 1 fits.

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn.conv import svd_rank_for_ratio
    >>> conv = torch.nn.Conv2d(64, 64, 3)
    >>> svd_rank_for_ratio(conv, 0.25), svd_rank_for_ratio(conv, 0.25, scheme="spatial")
    (14, 24)

    """
    conv, ratio = _dense_conv(conv), _check_ratio(ratio)
    out_group, in_group, *kernel = _group_shape(conv)
    budget = ratio * conv.weight.numel()
    if scheme == "channel":
        per_group = budget / conv.groups
        return min(int(per_group / (in_group * math.prod(kernel) + out_group)), out_group, in_group * math.prod(kernel))
    if scheme != "spatial":
        raise ValueError(f"scheme must be one of {SVD_SCHEMES}, got {scheme!r}")
    if len(kernel) != 2 or conv.groups != 1:
        raise UnsupportedLayerError(f"the spatial SVD scheme needs a Conv2d without groups, got {_describe(conv)}")
    (kh, kw), in_channels, out_channels = kernel, conv.in_channels, conv.out_channels
    return min(int(budget / (in_channels * kh + out_channels * kw)), in_channels * kh, out_channels * kw)
