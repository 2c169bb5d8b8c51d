"""CP convolution: a 1x1 convolution in, one depthwise convolution per spatial dimension, a 1x1 convolution out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lowrank.checks import check_int, check_ranks
from lowrank.decompose import CP, cp
from lowrank.nn.components import RankAxis
from lowrank.nn.conv.base import (
    FactorizedConv,
    conv_hyperparameters,
    dense_conv,
    describe,
    group_shape,
    pointwise_in,
    pointwise_out,
    pointwise_shape,
)
from lowrank.nn.dense import bias_size
from lowrank.rank.budget import budget_rank


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


def _max_rank(shape: Sequence[int]) -> int:
    """The largest CP rank of a group kernel of ``shape`` (the bound of :func:`lowrank.decompose.cp`)."""
    return math.prod(shape) // max(shape)


class CPConv(FactorizedConv):
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
        shape = group_shape(self)
        (self.rank,) = check_ranks((rank,), [_max_rank(shape)], name="CP rank (per group)", what=[describe(self)])
        n, channels, kwargs = len(self.kernel_size), groups * self.rank, {"device": device, "dtype": dtype}
        self.first = nn.Parameter(torch.empty(pointwise_shape(channels, shape[1], n), **kwargs))
        self.spatial = nn.ParameterList(
            nn.Parameter(torch.empty(channels, 1, *(k if j == i else 1 for j in range(n)), **kwargs))
            for i, k in enumerate(self.kernel_size)
        )
        self.last = nn.Parameter(torch.empty(pointwise_shape(out_channels, self.rank, n), **kwargs))
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
        conv = dense_conv(conv)
        weight = conv.weight.detach()
        module = cls(**conv_hyperparameters(conv), rank=rank, device=weight.device, dtype=weight.dtype)
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

    @classmethod
    def rank_for_budget(cls, conv: nn.Module, max_params: int) -> int | None:
        """The largest CP rank whose module holds at most ``max_params`` parameters.

        Parameters
        ----------
        conv : nn.Conv1d, nn.Conv2d or nn.Conv3d
            The dense convolution.
        max_params : int
            Parameters the module may hold, factors and bias together (the bias
            is kept as it is, so the factors get what it leaves).

        Returns
        -------
        int or None
            The rank per group, as :meth:`from_dense` takes it, at most the
            largest rank it accepts; None when not even rank 1 fits.

        Examples
        --------
        >>> import torch
        >>> from lowrank.nn.conv import CPConv
        >>> conv = torch.nn.Conv2d(64, 64, 3)
        >>> CPConv.rank_for_budget(conv, 9216 + 64)   # a quarter of the weight, plus the bias
        68
        >>> CPConv(64, 64, [3, 3], 68).num_params
        9176

        """
        conv = dense_conv(conv)
        shape = group_shape(conv)
        per_rank = conv.groups * (shape[0] + shape[1] + sum(shape[2:]))
        max_params = check_int(max_params, "max_params", minimum=0)
        rank = budget_rank(max_params, per_rank, fixed_params=bias_size(conv), max_rank=_max_rank(shape))
        return rank or None

    @property
    def reported_rank(self) -> int:
        """The CP rank per group."""
        return self.rank

    def rank_axes(self) -> list[RankAxis]:
        """One axis: component ``i`` is channel ``i`` of ``first``, of every spatial factor and of ``last``."""
        spatial = tuple((f"spatial.{i}", 0, True) for i in range(len(self.spatial)))
        return [RankAxis("rank", self.rank, (("first", 0, True), *spatial, ("last", 1, False)))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """1x1 convolution to ``R`` channels, a depthwise convolution per spatial dimension, 1x1 to ``out``."""
        x, unbatched = self._batched(x)
        h = self._pad(self._drop_components(pointwise_in(x, self.first, self.groups), 1, self.groups))
        for i, kernel in enumerate(self.spatial):
            h = self._conv(h, kernel, groups=kernel.shape[0], **self._stage([i]))
        out = pointwise_out(h, self.last, self.bias, self.groups)
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
        return {**conv_hyperparameters(self), "rank": self.rank}

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
