"""SVD convolution: a convolution split in two by a truncated SVD of its kernel, over channels or over space."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lowrank.checks import check_choice, check_int, check_ranks
from lowrank.decompose import svd
from lowrank.nn.base import UnsupportedLayerError
from lowrank.nn.components import RankAxis
from lowrank.nn.conv.base import (
    FactorizedConv,
    conv_hyperparameters,
    dense_conv,
    describe,
    group_shape,
    join_group_matrices,
    pointwise_out,
    pointwise_shape,
)
from lowrank.nn.dense import bias_size, conv_output_shape
from lowrank.rank.budget import budget_rank

SVD_SCHEMES = ("channel", "spatial")


def _group_matrix_shape(conv: nn.modules.conv._ConvNd | FactorizedConv, scheme: str) -> tuple[int, int]:
    """The shape of the matrix that ``scheme`` truncates (one group's for ``"channel"``).

    ``(out/groups, in/groups * prod(kernel))`` for ``"channel"``, ``(in * kh, out * kw)``
    for ``"spatial"``. Its smaller side is the largest rank, and each rank costs ``groups`` times
    the sum of its sides in parameters. ``"spatial"`` raises
    :class:`~lowrank.nn.base.UnsupportedLayerError` unless ``conv`` is a
    Conv2d without groups.
    """
    if scheme == "channel":
        out_group, in_group, *kernel = group_shape(conv)
        return out_group, in_group * math.prod(kernel)
    if len(conv.kernel_size) != 2 or conv.groups != 1:
        raise UnsupportedLayerError(
            f"the spatial SVD scheme needs a Conv2d without groups, got {describe(conv)}; use scheme='channel'"
        )
    kh, kw = conv.kernel_size
    return conv.in_channels * kh, conv.out_channels * kw


class SVDConv(FactorizedConv):
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
        self.scheme = check_choice(scheme, SVD_SCHEMES, "scheme")
        rows, cols = _group_matrix_shape(self, scheme)
        name = "spatial SVD rank" if scheme == "spatial" else "channel SVD rank (per group)"
        (self.rank,) = check_ranks((rank,), [min(rows, cols)], name=name, what=[describe(self)])
        n, kwargs = len(self.kernel_size), {"device": device, "dtype": dtype}
        if scheme == "spatial":
            kh, kw = self.kernel_size
            self.first = nn.Parameter(torch.empty(self.rank, in_channels, kh, 1, **kwargs))
            self.second = nn.Parameter(torch.empty(out_channels, self.rank, 1, kw, **kwargs))
        else:
            in_group = in_channels // groups
            self.first = nn.Parameter(torch.empty(groups * self.rank, in_group, *self.kernel_size, **kwargs))
            self.second = nn.Parameter(torch.empty(pointwise_shape(out_channels, self.rank, n), **kwargs))
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
        conv = dense_conv(conv)
        weight = conv.weight.detach()
        module = cls(**conv_hyperparameters(conv), rank=rank, scheme=scheme, device=weight.device, dtype=weight.dtype)
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

    @classmethod
    def rank_for_budget(
        cls, conv: nn.Module, max_params: int, scheme: str = "channel"
    ) -> int | None:
        """The largest rank whose module holds at most ``max_params`` parameters.

        Parameters
        ----------
        conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
            The dense convolution. ``scheme="spatial"`` raises
            :class:`~lowrank.nn.base.UnsupportedLayerError` unless it is an
            ``nn.Conv2d`` with ``groups=1``.
        max_params : int
            Parameters the module may hold, factors and bias together (the bias
            is kept as it is, so the factors get what it leaves).
        scheme : {"channel", "spatial"}
            The split; see the class.

        Returns
        -------
        int or None
            The rank (per group for ``"channel"``), as :meth:`from_dense` takes
            it, at most the largest rank it accepts; None when not even rank 1 fits.

        Examples
        --------
        >>> import torch
        >>> from lowrank.nn.conv import SVDConv
        >>> conv = torch.nn.Conv2d(64, 64, 3)
        >>> budget = 9216 + 64   # a quarter of the weight, plus the bias
        >>> SVDConv.rank_for_budget(conv, budget), SVDConv.rank_for_budget(conv, budget, scheme="spatial")
        (14, 24)

        """
        conv = dense_conv(conv)
        rows, cols = _group_matrix_shape(conv, check_choice(scheme, SVD_SCHEMES, "scheme"))
        max_params = check_int(max_params, "max_params", minimum=0)
        rank = budget_rank(max_params, conv.groups * (rows + cols), bias_size(conv), max_rank=min(rows, cols))
        return rank or None

    @classmethod
    def rank_matrices(cls, conv: nn.Module, scheme: str = "channel") -> list[torch.Tensor]:
        """The one matrix whose truncated SVD the module holds.

        Parameters
        ----------
        conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
            The dense convolution. ``scheme="spatial"`` raises
            :class:`~lowrank.nn.base.UnsupportedLayerError` unless it is an
            ``nn.Conv2d`` with ``groups=1``.
        scheme : {"channel", "spatial"}
            The split; see the class.

        Returns
        -------
        list of torch.Tensor
            One matrix, detached, in the kernel's dtype. ``"channel"``: the
            ``(out/groups, in/groups * prod(kernel))`` matrix of one group, or with
            groups the groups' matrices joined along their longer side, so that its
            smaller side is the per-group bound of the rank. ``"spatial"``: the
            kernel as an ``(in * kh, out * kw)`` matrix.

        Examples
        --------
        >>> import torch
        >>> from lowrank.nn.conv import SVDConv
        >>> conv = torch.nn.Conv2d(8, 6, 3)
        >>> SVDConv.rank_matrices(conv)[0].shape, SVDConv.rank_matrices(conv, scheme="spatial")[0].shape
        (torch.Size([6, 72]), torch.Size([24, 18]))

        """
        conv = dense_conv(conv)
        _group_matrix_shape(conv, check_choice(scheme, SVD_SCHEMES, "scheme"))
        weight = conv.weight.detach()
        if scheme == "spatial":
            out_channels, in_channels, kh, kw = weight.shape
            return [weight.permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)]
        return [join_group_matrices([kernel.reshape(kernel.shape[0], -1) for kernel in weight.chunk(conv.groups)])]

    @property
    def reported_rank(self) -> int:
        """The rank (per group for ``"channel"``)."""
        return self.rank

    def rank_axes(self) -> list[RankAxis]:
        """One axis: component ``i`` is output channel ``i`` of ``first`` (each group) and input ``i`` of ``second``."""
        return [RankAxis("rank", self.rank, (("first", 0, True), ("second", 1, False)))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The two convolutions of the scheme."""
        x, unbatched = self._batched(x)
        h = self._pad(x)
        if self.scheme == "spatial":
            h = self._drop_components(self._conv(h, self.first, **self._stage([0])), 1)
            out = self._conv(h, self.second, self.bias, **self._stage([1]))
        else:
            h = self._conv(h, self.first, groups=self.groups, **self._stage(range(len(self.kernel_size))))
            out = pointwise_out(self._drop_components(h, 1, self.groups), self.second, self.bias, self.groups)
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
        return {**conv_hyperparameters(self), "rank": self.rank, "scheme": self.scheme}

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
