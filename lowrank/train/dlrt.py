"""Rank-adaptive low-rank training (DLRT, Schotthöfer et al., 2022), one gradient per optimizer step.

Each targeted linear layer becomes a :class:`~lowrank.nn.dlrt.DLRTLinear`,
``W = U S Vᵀ`` at a rank that training adapts. One backward pass gives the
gradients of the three sub-steps of the parallel rank-adaptive BUG integrator
(Ceruti, Kusch & Lubich, 2024): ``G V`` for ``K = U S``, ``Gᵀ U`` for ``L = V
Sᵀ`` and ``Uᵀ G V`` for ``S``. The optimizer's step hooks turn one ordinary
``optimizer.step()`` into one step of the integrator:

1. before the update, ``U`` holds ``K = U₀ S₀`` and ``V`` holds ``L = V₀ S₀ᵀ``,
   so the optimizer's own rule (SGD, momentum, Adam, ...) takes the K-, L- and
   S-steps from the same gradient;
2. after it, the bases are augmented with the new directions of ``K`` and
   ``L`` (``Û = [U₀, Ũ]``, ``V̂ = [V₀, Ṽ]``, at most twice the rank), the
   ``2r x 2r`` core ``Ŝ = [[S̃, Lᵀ Ṽ], [Ũᵀ K, 0]]`` is decomposed, and the
   rank is truncated to the smallest keeping all but ``tol`` of its
   singular values' norm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank.checks import check_fraction, check_int
from lowrank.distributed import broadcast_from, owner, world
from lowrank.nn.dense import linear_weight
from lowrank.nn.dlrt import DLRTLinear
from lowrank.nn.surgery import swap_modules
from lowrank.report import CompressionReport, LayerReport
from lowrank.targets import Targets, targets_from
from lowrank.train.base import TrainingMethod

# New basis directions whose singular value is below this share of ||K||_F (and the factors' own rounding) are
# left out: they are noise, and orthonormalizing them would lose orthogonality to the old basis.
_NEGLIGIBLE = 1e-12


def _compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype the integrator's small decompositions run in: float64, or float32 where there is none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def new_directions(basis: torch.Tensor, k: torch.Tensor, threshold: float) -> torch.Tensor:
    """An orthonormal basis of the part of ``range(k)`` orthogonal to ``basis``, at most ``k``'s columns wide.

    ``basis`` has orthonormal columns. ``(I - basis basisᵀ) k`` is projected
    twice (classical Gram-Schmidt with one re-orthogonalization), and its
    directions whose singular value is at most ``threshold`` are dropped; the
    kept ones are projected once more and orthonormalized, so that they are
    orthogonal to ``basis`` to working precision.
    """
    p = k - basis @ (basis.T @ k)
    p = p - basis @ (basis.T @ p)
    q, r = torch.linalg.qr(p)
    a, s, _ = torch.linalg.svd(r)
    new = q @ a[:, s > threshold]
    new = new - basis @ (basis.T @ new)
    return torch.linalg.qr(new).Q


class DLRT(TrainingMethod):
    """Dynamical low-rank training with rank adaptation: train the factors of each linear layer, rank included.

    Swaps each targeted ``nn.Linear`` (or Hugging Face ``Conv1D``) for a
    :class:`~lowrank.nn.dlrt.DLRTLinear` started from its truncated SVD at
    ``rank``, puts the layer's ``U``, ``S`` and ``V`` in the optimizer in
    place of its dense weight (the bias stays the same parameter), and
    attaches to the optimizer's step hooks: every ``optimizer.step()`` is one
    step of the parallel rank-adaptive BUG integrator, after which each
    layer's rank is the smallest whose discarded singular values hold at most
    ``tol`` of the norm (within ``[min_rank, max_rank]``). The training loop
    stays ``loss.backward(); optimizer.step(); optimizer.zero_grad()``.
    :meth:`finalize` swaps each layer for a :class:`~lowrank.nn.LowRankLinear`
    at its learned rank.

    Under ``torch.distributed``, attach DLRT before wrapping the model in
    ``DistributedDataParallel`` (it replaces parameters, which DDP must see);
    gradients are averaged by DDP, each layer's truncation is computed by one
    rank and broadcast, so every process holds the same factors and ranks.

    To resume, build the model and the optimizer as before, attach a DLRT
    with the same arguments, then load the model's, the optimizer's and this
    method's state dicts (the factors and ranks live in the model's).

    Parameters
    ----------
    model : nn.Module
        The model, modified in place (not yet wrapped in ``DistributedDataParallel``).
    optimizer : torch.optim.Optimizer
        The optimizer training it; it must hold every targeted weight. Its
        update rule makes the K-, L- and S-steps (plain SGD gives the
        integrator's explicit Euler step; momentum, Adam and weight decay act
        on ``K``, ``L`` and ``S`` as on any parameter). Its state for the
        dense weights is dropped.
    rank : int
        The initial rank of every layer, ``>= 1`` and at most each layer's
        ``min(out_features, in_features)``.
    tol : float
        The relative truncation tolerance θ in (0, 1) (DLRT: 0.1): the
        singular values dropped after each step hold at most ``tol`` of the
        norm of all of them.
    max_rank : int, optional
        The largest rank a layer can reach, ``>= rank`` (lowered to each
        layer's smaller side); default ``min(out, in, 2 * rank)`` per layer.
        The factors are stored at this width.
    min_rank : int
        The smallest rank a layer is truncated to, ``1 <= min_rank <= rank``.
    targets : Targets, optional
        The layers trained (default ``Targets()``); only linear layers are,
        output heads and layers of other kinds are left as they are.
    include, exclude, kinds, filter_fn
        Shortcuts for the fields of ``targets``.

    Attributes
    ----------
    layers : dict of str to DLRTLinear
        The trained layers by name.
    skipped : dict of str to str
        Targeted layers left dense, with the reason.
    history : list of (int, dict)
        ``(step, ranks)`` after the first optimizer step and every step that changed a rank.

    Examples
    --------
    >>> import torch
    >>> from lowrank.train.dlrt import DLRT
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> dlrt = DLRT(model, optimizer, rank=8, include="0")
    >>> for _ in range(3):
    ...     model(torch.randn(16, 32)).square().mean().backward()
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    >>> dlrt.history[0][0], 2 <= dlrt.ranks["0"] <= 16
    (1, True)
    >>> report = dlrt.finalize()
    >>> type(model[0]).__name__
    'LowRankLinear'

    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        rank: int,
        *,
        tol: float = 0.1,
        max_rank: int | None = None,
        min_rank: int = 2,
        targets: Targets | None = None,
        include: Any = None,
        exclude: Any = None,
        kinds: Any = None,
        filter_fn: Any = None,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("DLRT replaces the targeted layers' parameters, which a DistributedDataParallel "
                             "wrapper would not see: attach DLRT to the model first, then wrap it")
        super().__init__(model, optimizer)
        self.rank = check_int(rank, "rank")
        self.tol = check_fraction(tol, "tol", high_closed=False)
        self.min_rank = check_int(min_rank, "min_rank")
        if self.min_rank > self.rank:
            raise ValueError(f"min_rank must be at most rank ({self.rank}), got {self.min_rank}")
        self.max_rank = None if max_rank is None else check_int(max_rank, "max_rank")
        if self.max_rank is not None and self.max_rank < self.rank:
            raise ValueError(f"max_rank must be at least rank ({self.rank}), got {self.max_rank}")
        self.targets = targets_from(targets, include=include, exclude=exclude, kinds=kinds, filter_fn=filter_fn)

        self.skipped: dict[str, str] = {}
        self._order: list[str] = []
        chosen = []
        for target in self.targets.select(self.model):
            self._order.append(target.name)
            if target.head:
                self.skipped[target.name] = "output head"
            elif target.kind != "linear":
                self.skipped[target.name] = f"DLRT trains linear layers only, not {target.kind} layers"
            else:
                chosen.append(target)
        if not chosen:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in self.skipped.items())
            raise ValueError(f"DLRT has no linear layer to train among the targets {self.targets.describe()} of "
                             f"the {type(self.model).__name__} ({reasons})")
        weights: dict[int, str] = {}
        for target in chosen:
            weight = linear_weight(target.module)
            if min(weight.shape) < self.rank:
                raise ValueError(f"rank {self.rank} exceeds the largest rank {min(weight.shape)} of layer "
                                 f"{target.name!r} (weight {tuple(weight.shape)}): lower rank or exclude the layer")
            if id(target.module.weight) in weights:
                raise ValueError(f"layers {weights[id(target.module.weight)]!r} and {target.name!r} share their "
                                 f"weight: exclude one of them")
            weights[id(target.module.weight)] = target.name
        self._check_optimized([(f"{target.name}.weight", target.module.weight) for target in chosen])

        replacements = []
        for target in chosen:
            weight = linear_weight(target.module)
            widest = None if self.max_rank is None else min(self.max_rank, *weight.shape)
            layer = DLRTLinear.from_dense(target.module, self.rank, widest)
            if target.module.bias is not None:
                layer.bias = target.module.bias  # the same parameter: the optimizer keeps it and its state
            replacements.append((target.name, layer))
        swap_modules(self.model, replacements)
        self._replace_in_optimizer({id(t.module.weight): layer for t, (_, layer) in zip(chosen, replacements)})
        self.layers: dict[str, DLRTLinear] = dict(replacements)
        self.history: list[tuple[int, dict[str, int]]] = []
        self._before: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._attach(self._before_step, self._after_step)

    def _replace_in_optimizer(self, factors: dict[int, DLRTLinear]) -> None:
        """Put each layer's ``U``, ``S``, ``V`` where its dense weight was in the optimizer, dropping its state."""
        for group in self.optimizer.param_groups:
            params = []
            for parameter in group["params"]:
                if id(parameter) in factors:
                    layer = factors[id(parameter)]
                    params += [layer.U, layer.S, layer.V]
                    self.optimizer.state.pop(parameter, None)
                else:
                    params.append(parameter)
            group["params"] = params

    @property
    def ranks(self) -> dict[str, int]:
        """The active rank of every trained layer."""
        return {name: layer.rank for name, layer in self.layers.items()}

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before the update: keep ``U₀, S₀, V₀`` and let ``U`` hold ``K = U₀ S₀`` and ``V`` hold ``L = V₀ S₀ᵀ``."""
        self._before = []
        for layer in self.layers.values():
            r = layer.rank
            u0, s0, v0 = layer.U[:, :r].clone(), layer.S[:r, :r].clone(), layer.V[:, :r].clone()
            layer.U[:, :r] = u0 @ s0
            layer.V[:, :r] = v0 @ s0.T
            self._before.append((u0, s0, v0))

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After the update: augment, truncate and write back every layer; count the step."""
        me, size = world()
        for name, layer in self.layers.items():  # on every rank, so that none waits on a broadcast that never comes
            r = layer.rank
            if not all(bool(torch.isfinite(f).all()) for f in (layer.U[:, :r], layer.S[:r, :r], layer.V[:, :r])):
                raise FloatingPointError(f"DLRT: layer {name!r} has non-finite factors after optimizer step "
                                         f"{self.step + 1} (a diverging learning rate?)")
        for index, (layer, before) in enumerate(zip(self.layers.values(), self._before)):
            if owner(index) == me:
                layer.assign(*self._integrate(layer, *before))
        if size > 1:
            for index, layer in enumerate(self.layers.values()):
                broadcast_from([layer.U, layer.S, layer.V, layer.active], owner(index))
                layer.sync_rank()
        self._before = []
        self.step += 1
        if not self.history or self.history[-1][1] != self.ranks:
            self.history.append((self.step, self.ranks))

    def _integrate(
        self, layer: DLRTLinear, u0: torch.Tensor, s0: torch.Tensor, v0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The augmented, truncated factors ``(U₁, s₁, V₁)`` of one layer after the optimizer's update.

        ``U₀`` and ``V₀`` are read back from the factors' dtype, so they are
        orthonormal only to its precision: their QR factors ``U₀ = Q_U R_U``
        carry the (near-identity) triangles into the core, which keeps the
        bases from drifting away from orthonormality over many steps.
        """
        r = u0.shape[1]
        dtype = _compute_dtype(layer.U.device)
        k, l_, s1 = layer.U[:, :r].to(dtype), layer.V[:, :r].to(dtype), layer.S[:r, :r].to(dtype)
        qu, ru = torch.linalg.qr(u0.to(dtype))
        qv, rv = torch.linalg.qr(v0.to(dtype))
        negligible = max(torch.finfo(dtype).eps, _NEGLIGIBLE)
        u_new = new_directions(qu, k, negligible * float(torch.linalg.matrix_norm(k)))
        v_new = new_directions(qv, l_, negligible * float(torch.linalg.matrix_norm(l_)))
        core = torch.cat([
            torch.cat([ru @ s1 @ rv.T, ru @ l_.T @ v_new], dim=1),
            torch.cat([u_new.T @ k @ rv.T, k.new_zeros(u_new.shape[1], v_new.shape[1])], dim=1),
        ])
        p, sigma, qh = torch.linalg.svd(core)
        rank = self._truncation_rank(sigma, layer.max_rank)
        u1 = torch.cat([qu, u_new], dim=1) @ p[:, :rank]
        v1 = torch.cat([qv, v_new], dim=1) @ qh[:rank].T
        # an SVD's signs are arbitrary: keep each column's sign where it was, so that the optimizer's
        # momentum for that column still points the way it did
        kept = min(r, rank)
        agreement = (u0[:, :kept].to(dtype) * u1[:, :kept]).sum(0) + (v0[:, :kept].to(dtype) * v1[:, :kept]).sum(0)
        signs = torch.ones(rank, dtype=dtype, device=u1.device)
        signs[:kept] = torch.where(agreement < 0, -1.0, 1.0)
        return u1 * signs, sigma[:rank], v1 * signs

    def _truncation_rank(self, sigma: torch.Tensor, max_rank: int) -> int:
        """The smallest ``r`` with ``||sigma[r:]|| <= tol ||sigma||``, clamped to ``[min_rank, max_rank]``.

        ``sigma`` holds the singular values of the augmented core, in
        decreasing order; the rank is at most its length.
        """
        squares = sigma.square()
        tails = torch.cat([squares.flip(0).cumsum(0).flip(0), squares.new_zeros(1)]).sqrt()
        rank = int(torch.nonzero(tails <= self.tol * tails[0])[0, 0])
        return min(max(rank, self.min_rank), max_rank, sigma.numel())

    def state_dict(self) -> dict[str, Any]:
        """Step and rank history (the factors and ranks are in the model's state dict)."""
        return {**super().state_dict(), "history": [(step, dict(ranks)) for step, ranks in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output."""
        super().load_state_dict(state)
        self.history = [(int(step), dict(ranks)) for step, ranks in state["history"]]

    @torch.no_grad()
    def finalize(self) -> CompressionReport:
        """Swap each trained layer for a :class:`~lowrank.nn.LowRankLinear` at its active rank.

        The factored weight is the same (up to rounding); DLRT detaches from
        the optimizer, which still holds the layers' ``U``, ``S`` and ``V``:
        build a new one to train on.

        Returns
        -------
        CompressionReport
            One row per targeted layer: rank, parameters (those of the dense
            layer before) and the relative error of the conversion; skipped
            layers with their reason.

        """
        rows, replacements = [], []
        for name in self._order:
            if name in self.skipped:
                rows.append(LayerReport.dense(name, self.model.get_submodule(name), skip_reason=self.skipped[name]))
                continue
            layer = self.layers[name]
            dense, module = layer.to_dense(), layer.to_low_rank()
            row = LayerReport.dense(name, dense, method="dlrt")
            row.record(dense, module)
            rows.append(row)
            replacements.append((name, module))
        settings = {"rank": self.rank, "tol": self.tol, "min_rank": self.min_rank, "max_rank": self.max_rank,
                    "targets": self.targets.to_dict()}
        return self._swap(rows, replacements, settings)
