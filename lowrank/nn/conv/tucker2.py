"""Tucker-2 convolution: a 1x1 convolution in, a small core convolution, a 1x1 convolution out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lowrank.checks import check_int, check_ranks
from lowrank.decompose import tucker
from lowrank.nn.base import UnsupportedLayerError
from lowrank.nn.components import RankAxis
from lowrank.nn.conv.base import (
    FactorizedConv,
    channels_last,
    conv_hyperparameters,
    dense_conv,
    describe,
    group_shape,
    join_group_matrices,
    pointwise_out,
    pointwise_shape,
)
from lowrank.nn.dense import bias_size, conv_output_shape
from lowrank.rank.budget import largest_fitting


def _refuse_depthwise(conv: nn.modules.conv._ConvNd | FactorizedConv) -> None:
    """Raise :class:`~lowrank.nn.base.UnsupportedLayerError` if ``conv`` has one input channel per group."""
    if conv.in_channels // conv.groups == 1:
        raise UnsupportedLayerError(
            f"Tucker-2 does not apply to {describe(conv)}: it has one input channel per group "
            "(a depthwise convolution), so there is no input-channel mode to compress"
        )


def _proportional_ranks(step: int, out_group: int, in_group: int) -> tuple[int, int]:
    """``(r_out, r_in)`` at ``step`` of ``max(out_group, in_group)``: both ranks in proportion to their channels."""
    larger = max(out_group, in_group)
    return max(1, round(step * out_group / larger)), max(1, round(step * in_group / larger))


class Tucker2Conv(FactorizedConv):
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
        _refuse_depthwise(self)
        out_group, in_group, *_ = group_shape(self)
        layer = describe(self)
        self.ranks: tuple[int, int] = check_ranks(
            ranks,
            [out_group, in_group],
            name="Tucker-2 rank",
            what=[f"r_out (per group) of {layer}", f"r_in (per group) of {layer}"],
        )
        r_out, r_in = self.ranks
        n, kwargs = len(self.kernel_size), {"device": device, "dtype": dtype}
        self.first = nn.Parameter(torch.empty(pointwise_shape(groups * r_in, in_group, n), **kwargs))
        self.core = nn.Parameter(torch.empty(groups * r_out, r_in, *self.kernel_size, **kwargs))
        self.last = nn.Parameter(torch.empty(pointwise_shape(out_channels, r_out, n), **kwargs))
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
        conv = dense_conv(conv)
        weight = conv.weight.detach()
        module = cls(**conv_hyperparameters(conv), ranks=rank, device=weight.device, dtype=weight.dtype)
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

    @classmethod
    def rank_for_budget(cls, conv: nn.Module, max_params: int) -> tuple[int, int] | None:
        """The largest ranks, in proportion to the channels, whose module holds at most ``max_params`` parameters.

        Parameters
        ----------
        conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
            The dense convolution. Depthwise convolutions raise
            :class:`~lowrank.nn.base.UnsupportedLayerError`.
        max_params : int
            Parameters the module may hold, factors and bias together (the bias
            is kept as it is, so the factors get what it leaves).

        Returns
        -------
        (int, int) or None
            ``(r_out, r_in)`` per group, as :meth:`from_dense` takes them, with
            ``r_out / (out / groups)`` as close to ``r_in / (in / groups)`` as
            integers allow: step ``s`` of ``max(out, in) / groups`` gives the
            larger side rank ``s`` and the other its rounded share. The last step
            gives both ranks their bounds. None when not even ``(1, 1)`` fits.

        Examples
        --------
        >>> import torch
        >>> from lowrank.nn.conv import Tucker2Conv
        >>> conv = torch.nn.Conv2d(64, 64, 3)
        >>> Tucker2Conv.rank_for_budget(conv, 9216 + 64)   # a quarter of the weight, plus the bias
        (25, 25)
        >>> Tucker2Conv.from_dense(conv, (25, 25)).num_params
        8889

        """
        conv = dense_conv(conv)
        _refuse_depthwise(conv)
        budget = check_int(max_params, "max_params", minimum=0) - bias_size(conv)
        out_group, in_group, *kernel = group_shape(conv)
        taps = math.prod(kernel)

        def cost(step: int) -> int:
            r_out, r_in = _proportional_ranks(step, out_group, in_group)
            return conv.groups * (in_group * r_in + r_in * r_out * taps + out_group * r_out)

        step = largest_fitting(cost, budget, max(out_group, in_group))
        return _proportional_ranks(step, out_group, in_group) if step else None

    @classmethod
    def rank_matrices(cls, conv: nn.Module) -> list[torch.Tensor]:
        """The kernel's mode-0 and mode-1 unfoldings, whose truncations are ``r_out`` and ``r_in``.

        Parameters
        ----------
        conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
            The dense convolution. Depthwise convolutions raise
            :class:`~lowrank.nn.base.UnsupportedLayerError`.

        Returns
        -------
        list of torch.Tensor
            ``[(out/groups, in/groups * prod(kernel)), (in/groups, out/groups * prod(kernel))]``
            for one group, detached, in the kernel's dtype. With groups, the group
            kernels' unfoldings are joined along their longer side, so each
            matrix's smaller side is that of one group's unfolding: at most the
            per-group bound of its rank (equal to it unless the unfolding is
            taller than wide, where larger ranks add nothing), and a rank read
            from its singular values is one :meth:`from_dense` accepts.

        Examples
        --------
        >>> import torch
        >>> from lowrank.nn.conv import Tucker2Conv
        >>> [m.shape for m in Tucker2Conv.rank_matrices(torch.nn.Conv2d(8, 6, 3, groups=2))]
        [torch.Size([3, 72]), torch.Size([4, 54])]

        """
        conv = dense_conv(conv)
        _refuse_depthwise(conv)
        groups = conv.weight.detach().chunk(conv.groups)
        return [
            join_group_matrices([kernel.movedim(mode, 0).reshape(kernel.shape[mode], -1) for kernel in groups])
            for mode in (0, 1)
        ]

    @property
    def reported_rank(self) -> tuple[int, int]:
        """The ranks ``(r_out, r_in)`` per group."""
        return self.ranks

    def rank_axes(self) -> list[RankAxis]:
        """Two axes: ``r_out`` (a core output channel and its column of ``last``) and ``r_in``.

        Component ``j`` of ``r_in`` is output channel ``j`` of ``first`` and input channel ``j`` of the core.
        """
        r_out, r_in = self.ranks
        return [
            RankAxis("r_out", r_out, (("core", 0, True), ("last", 1, False)), "ranks", 0),
            RankAxis("r_in", r_in, (("first", 0, True), ("core", 1, False)), "ranks", 1),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """1x1 convolution to ``r_in`` channels, core convolution, 1x1 convolution to ``out_channels``."""
        x, unbatched = self._batched(x)
        h = self._pad(self._drop_components(self._conv(x, self.first, groups=self.groups), 1, self.groups))
        h = self._conv(h, channels_last(self.core), groups=self.groups, **self._stage(range(len(self.kernel_size))))
        out = pointwise_out(self._drop_components(h, 1, self.groups), self.last, self.bias, self.groups)
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
        return {**conv_hyperparameters(self), "ranks": list(self.ranks)}

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates of the three convolutions on an ``(N, C, *spatial)`` input."""
        batch, _, *spatial = input_shape
        positions_in = batch * math.prod(spatial)
        positions_out = batch * math.prod(conv_output_shape(self, tuple(spatial)))
        return positions_in * self.first.numel() + positions_out * (self.core.numel() + self.last.numel())

    def extra_repr(self) -> str:
        """The hyper-parameters and the ranks."""
        return f"{super().extra_repr()}, ranks={self.ranks}"
