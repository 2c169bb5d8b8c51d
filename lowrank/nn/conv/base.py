"""The plumbing every factorized convolution shares: hyper-parameters, padding, 1x1 stages and the dense rebuild.

Each module of :mod:`lowrank.nn.conv` replaces one ``nn.Conv1d``, ``nn.Conv2d``
or ``nn.Conv3d`` and keeps its stride, padding (ints, per-dimension tuples,
``"same"``, ``"valid"``), dilation, groups, padding mode, bias, dtype and
device. The forward pass runs the factors as a chain of small convolutions and
never rebuilds the dense kernel.

Every padding mode is a per-dimension index map (zero padding aside), which
commutes with channel mixing and with convolutions along other dimensions. So
a ``"reflect"``, ``"replicate"`` or ``"circular"`` chain pads once, right before
its first spatial convolution, and then runs unpadded convolutions; a
``"zeros"`` chain gives each spatial convolution the padding of its own
dimensions (``"same"`` included, whose even-kernel asymmetry PyTorch then
applies per dimension, as the dense convolution does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lowrank.checks import check_choice
from lowrank.nn.base import FactorizedModule
from lowrank.nn.dense import conv_output_size

CONV_TYPES: dict[int, type[nn.modules.conv._ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

CONV_FUNCTIONS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _as_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """``value`` repeated ``n`` times (an int) or checked to hold ``n`` ints (a sequence)."""
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or {n} ints, got {value!r}")
    return tuple(values)


def dense_conv(conv: nn.Module) -> nn.modules.conv._ConvNd:
    """``conv`` if it is an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``; a ``TypeError`` otherwise."""
    if not isinstance(conv, tuple(CONV_TYPES.values())):
        raise TypeError(f"expected an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}")
    return conv


def conv_hyperparameters(conv: nn.modules.conv._ConvNd | FactorizedConv) -> dict[str, Any]:
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


def group_shape(conv: nn.modules.conv._ConvNd | FactorizedConv) -> tuple[int, ...]:
    """The shape of one group's kernel, ``(out/groups, in/groups, *kernel_size)``."""
    return (conv.out_channels // conv.groups, conv.in_channels // conv.groups, *conv.kernel_size)


def describe(conv: nn.modules.conv._ConvNd | FactorizedConv) -> str:
    """``"a Conv2d with weight shape (out, in/groups, kh, kw) and groups=g"``."""
    name = CONV_TYPES[len(conv.kernel_size)].__name__
    shape = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    return f"a {name} with weight shape {shape} and groups={conv.groups}"


def join_group_matrices(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """One matrix per group, joined along their longer side (side by side when wide, stacked when tall).

    The joined matrix's smaller side is that of each group's matrix, so a rank
    read from its singular values is a valid rank for every group.
    """
    rows, cols = matrices[0].shape
    return torch.cat(list(matrices), dim=1 if rows <= cols else 0)


def pointwise_shape(rows: int, cols: int, n: int) -> tuple[int, ...]:
    """The weight shape of a 1x1 convolution in ``n`` spatial dimensions."""
    return (rows, cols, *(1,) * n)


def pointwise_in(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A bias-free 1x1 convolution of ``x`` by ``weight`` ``(r, in/groups, 1, ...)``, laid out channels-last.

    Without groups it is one batched GEMM that writes the channels-last layout
    directly, the layout in which the depthwise convolutions of
    :class:`~lowrank.nn.conv.CPConv` run fastest on CPU. Grouped ones run ``F.convNd``.
    """
    if groups > 1:
        return CONV_FUNCTIONS[x.ndim - 2](x, weight, groups=groups)
    n, _, *spatial = x.shape
    rows = x.flatten(2).transpose(1, 2)  # (N, L, in): a view for NC... and channels-last inputs
    out = torch.bmm(rows, weight.flatten(1).t().expand(n, -1, -1))  # (N, L, r), contiguous
    return out.view(n, *spatial, -1).movedim(-1, 1)


def channels_last(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with its input channels stored last (no copy when they already are).

    A convolution with such a weight runs channels-last, which on CPU (oneDNN)
    is the fastest layout for the narrow core of a Tucker-2 chain.
    """
    return weight.movedim(1, -1).contiguous().movedim(-1, 1)


def pointwise_out(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """The closing 1x1 convolution of a chain, ``(out, r/groups, 1, ...)`` plus ``bias``; contiguous result.

    Without groups it is one batched GEMM that reads ``h`` in any layout (channels-last
    included) and writes the usual contiguous ``(N, out, ...)`` layout.
    """
    if groups > 1:
        return CONV_FUNCTIONS[h.ndim - 2](h, weight, bias, groups=groups)
    n, _, *spatial = h.shape
    columns = h.flatten(2)
    matrix = weight.flatten(1).expand(n, -1, -1)
    out = torch.bmm(matrix, columns) if bias is None else torch.baddbmm(bias[:, None], matrix, columns)
    return out.view(n, -1, *spatial)



def padding_amounts(conv: nn.Module) -> list[int]:
    """The ``F.pad`` amounts ``nn.ConvNd`` uses for a non-zero ``padding_mode``, last spatial dimension first.

    ``conv`` is any module with ``kernel_size``, ``padding`` (ints, ``"same"``
    or ``"valid"``) and ``dilation``; for ``"same"`` the extra pad of an even
    kernel goes to the end, as in PyTorch.
    """
    amounts: list[int] = []
    for i in reversed(range(len(conv.kernel_size))):
        if conv.padding == "valid":
            amounts += [0, 0]
        elif conv.padding == "same":
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            amounts += [total // 2, total - total // 2]
        else:
            amounts += [conv.padding[i], conv.padding[i]]
    return amounts

class FactorizedConv(FactorizedModule):
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
        check_choice(padding_mode, PADDING_MODES, "padding_mode")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups must divide in_channels={in_channels} and out_channels={out_channels}, got {groups}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.padding_mode = padding_mode
        self._conv = CONV_FUNCTIONS[n]

    @property
    def kind(self) -> str:
        """``"pointwise"`` for a 1x1 kernel, ``"conv"`` otherwise."""
        return "pointwise" if all(k == 1 for k in self.kernel_size) else "conv"

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded in every spatial dimension for a non-zero padding mode, unchanged for ``"zeros"``.

        The amounts are those ``nn.ConvNd`` uses (for ``"same"``, the extra pad of
        an even kernel goes to the end).
        """
        if self.padding_mode == "zeros":
            return x
        return F.pad(x, padding_amounts(self), mode=self.padding_mode)

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
