"""The layer of rank-adaptive low-rank training (DLRT): ``W = U S Vᵀ`` with a rank that changes while training.

:class:`DLRTLinear` holds its factors at a fixed largest rank and uses only
the first ``active`` columns; its backward puts on ``U``, ``V`` and ``S`` the
three projected gradients the integrator of :class:`lowrank.train.DLRT`
needs, from one backward pass and without forming the dense gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from lowrank.checks import check_choice, check_ranks
from lowrank.decompose import svd
from lowrank.nn.base import FactorizedModule
from lowrank.nn.dense import LINEAR_TYPES, bias_size, dense_linear, linear_bias, linear_type, linear_weight
from lowrank.nn.linear import LowRankLinear


def default_max_rank(out_features: int, in_features: int, rank: int) -> int:
    """The largest rank a layer may grow to unless told: ``min(out, in, 2 * rank)``."""
    return min(out_features, in_features, 2 * rank)


def orthonormal_factors(
    u: torch.Tensor, core: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, V)`` with orthonormal columns and ``U diag(s) Vᵀ = u core vᵀ``, in float64.

    ``u`` (m, r) and ``v`` (n, r) need not be orthonormal (their QR factors
    move into the core), so factors read back from a lower precision come out
    orthonormal to float64 precision.
    """
    qu, ru = torch.linalg.qr(u.double())
    qv, rv = torch.linalg.qr(v.double())
    a, s, bh = torch.linalg.svd(ru @ core.double() @ rv.T)
    return qu @ a, s, qv @ bh.T


class _ProjectedGradients(torch.autograd.Function):
    """``y = ((x V_r) S_rᵀ) U_rᵀ + b`` whose backward gives the K-, L- and S-step gradients.

    With ``G = dyᵀ x`` the gradient of the dense weight, ``h = x V_r`` and
    ``g = dy U_r``, the parameters receive ``U.grad[:, :r] = G V_r = dyᵀ h``,
    ``V.grad[:, :r] = Gᵀ U_r = xᵀ g`` and ``S.grad[:r, :r] = U_rᵀ G V_r = gᵀ h``
    (zero beyond the active rank); the input ``dx = g S_r V_rᵀ``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor | None, rank: int) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ v[:, :rank]
        z = h @ s[:rank, :rank].T
        out_r = u[:, :rank].T
        y = z @ out_r if bias is None else torch.addmm(bias, z, out_r)
        ctx.save_for_backward(x2, h, u, s, v)
        ctx.rank, ctx.x_shape, ctx.has_bias = rank, x.shape, bias is not None
        return y.reshape(*x.shape[:-1], u.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, u, s, v = ctx.saved_tensors
        r = ctx.rank
        # in the dtype the forward computed in (autocast may have lowered it), cast back to each input's own
        dtype = h.dtype
        dy2 = dy.reshape(-1, u.shape[0]).to(dtype)
        u_r, s_r, v_r = u[:, :r].to(dtype), s[:r, :r].to(dtype), v[:, :r].to(dtype)
        g = dy2 @ u_r
        needs = ctx.needs_input_grad
        dx = du = ds = dv = db = None
        if needs[0]:
            dx = ((g @ s_r) @ v_r.T).to(x2.dtype).reshape(ctx.x_shape)
        if needs[1]:
            du = torch.zeros_like(u)
            du[:, :r] = dy2.T @ h
        if needs[2]:
            ds = torch.zeros_like(s)
            ds[:r, :r] = g.T @ h
        if needs[3]:
            dv = torch.zeros_like(v)
            dv[:, :r] = x2.to(dtype).T @ g
        if ctx.has_bias and needs[4]:
            db = dy2.sum(0).to(u.dtype)
        return dx, du, ds, dv, db, None


class DLRTLinear(FactorizedModule):
    """A linear layer ``y = x Wᵀ + b`` with ``W = U_r S_r V_rᵀ`` at an active rank ``r`` that training changes.

    The factors are stored at ``max_rank`` columns: ``U`` ``(out_features,
    max_rank)``, ``S`` ``(max_rank, max_rank)``, ``V`` ``(in_features,
    max_rank)``; only the first ``r`` columns (and the leading ``r x r`` block
    of ``S``) are used, the rest are zero. ``r`` is the persistent buffer
    ``active``, so it is saved and loaded with the model's state dict.

    The backward pass does not give the gradients of the product: it puts on
    ``U``, ``V`` and ``S`` the gradients of the K-, L- and S-steps of
    dynamical low-rank training, ``G V_r``, ``Gᵀ U_r`` and ``U_rᵀ G V_r``
    (``G`` the dense weight's gradient, never formed). Train it with
    :class:`lowrank.train.DLRT`, whose optimizer hooks turn one optimizer step
    on these gradients into a step of the rank-adaptive integrator; a plain
    optimizer step on its own does not train it correctly.

    Parameters
    ----------
    in_features, out_features : int
        The dense layer's sizes.
    max_rank : int
        The columns stored, ``1 <= max_rank <= min(in_features, out_features)``:
        the largest rank the layer can reach.
    bias : bool
        Whether the layer has a bias.
    dense_type : {"Linear", "Conv1D"}
        The layer type :meth:`to_dense` rebuilds (``"Conv1D"`` is Hugging Face's
        transposed linear layer).
    device, dtype
        Where and in which dtype the (uninitialised) factors are created; the
        active rank starts at ``max_rank``.

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn.dlrt import DLRTLinear
    >>> layer = DLRTLinear.from_dense(torch.nn.Linear(64, 32), rank=8)
    >>> layer(torch.randn(5, 64)).shape, layer.rank, layer.max_rank
    (torch.Size([5, 32]), 8, 16)

    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_rank: int,
        bias: bool = True,
        dense_type: str = "Linear",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_choice(dense_type, LINEAR_TYPES, "dense_type")
        (max_rank,) = check_ranks(max_rank, [min(in_features, out_features)], name="max_rank",
                                  what=[f"a DLRTLinear({in_features}, {out_features})"])
        self.in_features, self.out_features, self.max_rank, self.dense_type = (
            in_features, out_features, max_rank, dense_type)
        kwargs = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, max_rank, **kwargs))
        self.S = nn.Parameter(torch.empty(max_rank, max_rank, **kwargs))
        self.V = nn.Parameter(torch.empty(in_features, max_rank, **kwargs))
        self.bias = nn.Parameter(torch.empty(out_features, **kwargs)) if bias else None
        self.register_buffer("active", torch.tensor(max_rank, dtype=torch.int64, device=device))
        # the active rank as a Python int, so that the forward never reads the buffer (a device sync on a GPU)
        self._rank = max_rank

    @classmethod
    def from_dense(cls, layer: nn.Module, rank: int, max_rank: int | None = None,
                   **svd_options: Any) -> DLRTLinear:
        """Start from the truncated SVD of an ``nn.Linear`` or Hugging Face ``Conv1D`` at ``rank``.

        ``U`` and ``V`` hold the leading singular vectors (orthonormal), ``S``
        the singular values on its diagonal.

        Parameters
        ----------
        layer : nn.Linear or transformers Conv1D
            The dense layer; it is not modified.
        rank : int
            The initial rank, ``1 <= rank <= min(out_features, in_features)``.
        max_rank : int, optional
            The largest rank the layer can grow to, ``rank <= max_rank <=
            min(out_features, in_features)`` (default ``min(out, in, 2 * rank)``).
        **svd_options
            Passed on to :func:`lowrank.decompose.svd` (``method=``, ``seed=``, ...).

        Returns
        -------
        DLRTLinear
            On the layer's device, in its dtype, with a copy of its bias.

        """
        weight = linear_weight(layer).detach()
        out_features, in_features = weight.shape
        full = min(out_features, in_features)
        (rank,) = check_ranks(rank, [full], what=[f"a weight of shape {tuple(weight.shape)}"])
        if max_rank is None:
            max_rank = default_max_rank(out_features, in_features, rank)
        (max_rank,) = check_ranks(max_rank, [full], name="max_rank", what=[f"a weight of shape {tuple(weight.shape)}"])
        if max_rank < rank:
            raise ValueError(f"max_rank must be at least the initial rank {rank}, got {max_rank}")
        factorization = svd(weight, rank, **svd_options)
        bias = linear_bias(layer)
        module = cls(in_features, out_features, max_rank, bias is not None, linear_type(layer),
                     device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            module.assign(*orthonormal_factors(factorization.u, torch.diag(factorization.s), factorization.vh.T))
            if bias is not None:
                module.bias.copy_(bias)
        return module

    @classmethod
    def rank_for_budget(cls, layer: nn.Module, max_params: int, max_rank: int | None = None) -> int | None:
        """The largest initial rank whose module holds at most ``max_params`` parameters (None if none does).

        The module stores ``max_rank`` columns: ``max_rank * (in + out +
        max_rank)`` parameters and the bias. With ``max_rank`` given its size
        does not depend on the rank, and the answer is ``max_rank`` (clamped to
        the layer) or None; otherwise ``max_rank = min(out, in, 2 * rank)``.

        Examples
        --------
        >>> import torch
        >>> DLRTLinear.rank_for_budget(torch.nn.Linear(32, 64), 1056)   # 8 columns: 8 * (32 + 64 + 8) + 64 = 896
        4

        """
        out_features, in_features = linear_weight(layer).shape
        full = min(out_features, in_features)

        def size(columns: int) -> int:
            return columns * (in_features + out_features + columns) + bias_size(layer)

        if max_rank is not None:
            rank = min(max_rank, full)
            return rank if size(rank) <= max_params else None
        fitting = [r for r in range(full, 0, -1) if size(default_max_rank(out_features, in_features, r)) <= max_params]
        return fitting[0] if fitting else None

    @classmethod
    def rank_matrices(cls, layer: nn.Module, **options: Any) -> list[torch.Tensor]:
        """The ``(out, in)`` weight, whose truncation the initial rank is."""
        return [linear_weight(layer).detach()]

    @property
    def rank(self) -> int:
        """The active rank ``r``: the columns of the factors in use."""
        return self._rank

    @property
    def reported_rank(self) -> int:
        """The active rank."""
        return self._rank

    @torch.no_grad()
    def weight_norm_sq(self) -> torch.Tensor:
        """Refused: DLRT's integrator sets the factors' gradients itself, which a loss on the product would mix with.

        Raises
        ------
        TypeError
            Always (exclude DLRT layers from Frobenius decay).

        """
        raise TypeError("a DLRTLinear's gradients are the integrator's K-, L- and S-step gradients: Frobenius decay "
                        "does not apply to it (exclude it from the targets)")

    def assign(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
        """Set the factors to ``u`` ``(out, r)``, ``diag(s)`` (``s`` of length ``r``) and ``v`` ``(in, r)``.

        The active rank becomes ``r``; the columns beyond it are zeroed. ``u``
        and ``v`` should have orthonormal columns (the integrator relies on it).

        Raises
        ------
        ValueError
            If the shapes do not fit the layer or ``r`` is outside ``[1, max_rank]``.

        """
        rank = s.numel()
        if not 1 <= rank <= self.max_rank or u.shape != (self.out_features, rank) or v.shape != (self.in_features,
                                                                                                   rank):
            raise ValueError(
                f"assign needs u ({self.out_features}, r), s (r,) and v ({self.in_features}, r) with 1 <= r <= "
                f"{self.max_rank}; got {tuple(u.shape)}, {tuple(s.shape)} and {tuple(v.shape)}"
            )
        for parameter in (self.U, self.S, self.V):
            parameter.zero_()
        self.U[:, :rank] = u
        self.V[:, :rank] = v
        self.S[:rank, :rank] = torch.diag(s.to(self.S.dtype))
        self.active.fill_(rank)
        self._rank = rank

    def sync_rank(self) -> None:
        """Re-read the active rank from the ``active`` buffer after it was written in place.

        ``load_state_dict`` and :meth:`assign` do it themselves; code that
        writes ``active`` directly (a broadcast) calls this afterwards.
        """
        rank = int(self.active)
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"the active rank of a DLRTLinear must be in [1, {self.max_rank}], got {rank}")
        self._rank = rank

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.sync_rank()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``((x V_r) S_rᵀ) U_rᵀ + bias`` through the active rank (any leading dimensions)."""
        return _ProjectedGradients.apply(x, self.U, self.S, self.V, self.bias, self._rank)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight ``U_r S_r V_rᵀ``, rebuilt on every access.

        For checks, export and code that reads ``layer.weight.dtype``; the forward never uses it.
        """
        r = self._rank
        return (self.U[:, :r] @ self.S[:r, :r]) @ self.V[:, :r].T

    def dense_weight(self) -> torch.Tensor:
        """The product of the factors, ``(in, out)`` for a ``Conv1D`` and ``(out, in)`` otherwise."""
        return self.weight.T if self.dense_type == "Conv1D" else self.weight

    def to_dense(self) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``) with the product of the factors as weight."""
        return dense_linear(self.weight.detach(), self.bias, self.dense_type)

    @torch.no_grad()
    def to_low_rank(self) -> LowRankLinear:
        """The same layer as a :class:`~lowrank.nn.LowRankLinear` at the active rank.

        Through the SVD of ``S_r``, the singular values split evenly between
        its two factors (as :meth:`LowRankLinear.from_factorization` does).
        """
        r = self._rank
        u, s, v = orthonormal_factors(self.U[:, :r], self.S[:r, :r], self.V[:, :r])
        root = s.sqrt()
        return LowRankLinear.from_factors(root[:, None] * v.T, u * root, self.bias, self.dense_type,
                                          dtype=self.U.dtype)

    def config(self) -> dict[str, Any]:
        """``in_features``, ``out_features``, ``max_rank``, ``bias`` and ``dense_type`` (the rank is state)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "max_rank": self.max_rank,
            "bias": self.bias is not None,
            "dense_type": self.dense_type,
        }

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """``tokens * r * (in_features + r + out_features)`` multiply-accumulates at the active rank ``r``."""
        r = self._rank
        return math.prod(input_shape[:-1]) * r * (self.in_features + r + self.out_features)

    def extra_repr(self) -> str:
        """Sizes, active and largest rank, and bias."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self._rank}, "
            f"max_rank={self.max_rank}, bias={self.bias is not None}"
        )
