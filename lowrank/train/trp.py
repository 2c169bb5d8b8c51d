"""Trained Rank Pruning (Xu et al., 2019/2020): periodic energy truncation of dense weights during training.

Every ``period`` optimizer steps each targeted weight is replaced, in place, by
its truncated SVD at the smallest rank keeping ``energy`` of its squared
singular values; the step after, the nuclear-norm subgradient ``λ U_k V_kᵀ`` of
the truncated weight (the weight at which that step's gradient was computed)
is added to its gradient. The network keeps its dense shape while training, so
optimizers, DDP and checkpoints need nothing special; :meth:`TRP.finalize`
swaps each layer for its factorized module at the trained rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank.checks import check_choice, check_int, check_nonnegative
from lowrank.decompose import SVD, svd
from lowrank.distributed import broadcast_from, owner, world
from lowrank.nn import METHODS, Method, UnsupportedLayerError
from lowrank.nn.dense import is_hf_conv1d
from lowrank.report import LayerReport
from lowrank.targets import Targets, targets_from
from lowrank.train.base import TrainingMethod
from lowrank.train.schedules import Schedule, fraction_at

CONV_SCHEMES = ("channel", "spatial")
# The factorized module a layer becomes at the end, by the layout its weight was trained in.
FINAL_METHODS: dict[str, Method] = {
    "linear": METHODS["linear"]["svd"],
    "embedding": METHODS["embedding"]["svd"],
    "channel": METHODS["conv"]["svd-channel"],
    "spatial": METHODS["conv"]["svd-spatial"],
}
# Randomized SVD is tried with the last rank times this margin (plus a few) before falling back to the full spectrum,
# on matrices whose smaller side is at least RANDOMIZED_SIDE and at least four times that rank: there it is several
# times faster than the Gram path (a 512 x 784 weight at rank 36: 33 ms against 82 ms on 2 CPU cores), below it not.
RANK_MARGIN = 1.25
RANDOMIZED_SIDE = 256


@dataclass(frozen=True)
class WeightMatrix:
    """How TRP reads a layer's weight as a matrix and writes a matrix back.

    ``layout`` is ``"linear"`` (``(out, in)``; a Hugging Face ``Conv1D`` stores
    its transpose), ``"embedding"`` (``(num, dim)``), ``"channel"`` (a
    convolution as ``(out, in·k·k)``, Zhang et al.) or ``"spatial"`` (a 2-D
    convolution as ``(in·kh, out·kw)``, Jaderberg et al.).
    """

    layout: str
    transposed: bool = False

    def read(self, weight: torch.Tensor) -> torch.Tensor:
        """The matrix view of ``weight`` (a copy for the spatial layout)."""
        if self.layout == "spatial":
            out_channels, in_channels, kh, kw = weight.shape
            return weight.permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)
        if self.layout == "channel":
            return weight.reshape(weight.shape[0], -1)
        return weight.T if self.transposed else weight

    def write(self, weight: torch.Tensor, matrix: torch.Tensor) -> None:
        """Copy ``matrix`` (a matrix view's shape) into ``weight``, in place."""
        with torch.no_grad():
            weight.copy_(self.as_weight(matrix, weight.shape))

    def as_weight(self, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``matrix`` in the weight's own layout ``shape``."""
        if self.layout == "spatial":
            out_channels, in_channels, kh, kw = shape
            return matrix.reshape(in_channels, kh, out_channels, kw).permute(2, 0, 1, 3)
        if self.layout == "channel":
            return matrix.reshape(shape)
        return matrix.T if self.transposed else matrix


def weight_matrix(module: nn.Module, kind: str, conv_scheme: str = "channel") -> WeightMatrix:
    """How the weight of ``module`` (of a layer ``kind``) reads as a matrix; convolutions by ``conv_scheme``.

    Raises
    ------
    UnsupportedLayerError
        For a grouped convolution, or the spatial scheme on anything but a ``Conv2d``.

    """
    if kind == "embedding":
        return WeightMatrix("embedding")
    if kind == "linear":
        return WeightMatrix("linear", is_hf_conv1d(module))
    if module.groups > 1:
        raise UnsupportedLayerError(f"grouped convolution (groups={module.groups})")
    if conv_scheme == "spatial" and module.weight.ndim != 4:
        raise UnsupportedLayerError(f"the spatial scheme needs a Conv2d, got a {type(module).__name__}")
    return WeightMatrix(conv_scheme)


@dataclass
class _Layer:
    """A layer TRP trains: where it is, how its weight reads as a matrix, what replaces it at the end."""

    name: str
    module: nn.Module
    matrix: WeightMatrix
    method: Method


def energy_truncation(
    matrix: torch.Tensor, energy: float, rank_hint: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, s, vh)`` of ``matrix`` at the smallest rank keeping ``energy`` of ``sum(s**2)``.

    With a ``rank_hint`` (the last rank chosen) small against a large matrix,
    a seeded randomized SVD at a rank a little above it is tried first and
    kept when it holds the energy; otherwise, and always for small matrices,
    :func:`lowrank.decompose.svd` by relative error (its Gram fast path). The
    energy is a share of ``||matrix||_F^2``, computed in float64.
    """
    total = float(torch.linalg.vector_norm(matrix.double()) ** 2)
    full = min(matrix.shape)
    if total == 0:
        factorization = svd(matrix, 1)
    elif energy >= 1:
        factorization = svd(matrix, full, method="gram")
    else:
        factorization = None
        guess = None if rank_hint is None else min(full, math.ceil(rank_hint * RANK_MARGIN) + 4)
        if guess is not None and full >= RANDOMIZED_SIDE and guess <= full // 4:
            sketch = svd(matrix, guess, method="randomized", seed=seed)
            kept = torch.cumsum(sketch.s.double() ** 2, 0)
            if float(kept[-1]) >= energy * total:
                rank = int(torch.searchsorted(kept, energy * total)) + 1
                factorization = SVD(sketch.u[:, :rank], sketch.s[:rank], sketch.vh[:rank])
        if factorization is None:
            factorization = svd(matrix, full, tol=math.sqrt(1 - energy))
    return factorization.u.contiguous(), factorization.s.contiguous(), factorization.vh.contiguous()


class TRP(TrainingMethod):
    """Trained Rank Pruning: train dense, truncate every target weight by energy every ``period`` steps.

    Attaches to ``optimizer`` (its step hooks): nothing else is called while
    training. After ``period`` optimizer steps, and every ``period`` after
    that, each targeted weight becomes its truncation to the smallest rank
    keeping ``energy`` of its squared singular values; on the next step,
    ``nuclear_weight · U_k V_kᵀ`` (the nuclear-norm subgradient of the
    truncated weight) is added to its gradient before the update.
    :meth:`finalize` swaps each layer for its factorized module at the
    trained rank.

    Parameters
    ----------
    model : nn.Module
        The model (or its ``DistributedDataParallel`` wrapper).
    optimizer : torch.optim.Optimizer
        The optimizer training it; it must hold every targeted weight.
    energy : float or callable
        Share of the squared singular values kept, in (0, 1], or a callable
        ``energy(step)`` such as :class:`~lowrank.train.Ramp` ``(0.999, 0.99,
        steps)`` so ranks fall gradually. The default 0.99 is higher than TRP's
        code (0.9, for CIFAR ResNets with SGD): every truncation discards
        ``1 - energy`` of the spectrum and a few steps do not grow it back, so
        at 0.9 the ranks of a small transformer trained with AdamW fell to 3-7
        (7% of its block parameters, validation loss +32%;
        ``benchmarks/train.py``), while 0.99 settled at 37%.
    period : int
        Optimizer steps between truncations, ``>= 1`` (TRP: 5 to 20).
    nuclear_weight : float
        λ of the nuclear-norm subgradient, ``>= 0`` (TRP: 3e-4; 0 turns it off).
    conv_scheme : {"channel", "spatial"}
        How a convolution's weight is read as a matrix: ``(out, in·k·k)``
        (Zhang et al.; finalized into an :class:`~lowrank.nn.SVDConv` with
        ``scheme="channel"``, a k×k convolution to ``rank`` channels then a
        1×1) or ``(in·kh, out·kw)`` (Jaderberg et al.; a kh×1 then a 1×kw
        convolution, 2-D convolutions only).
    targets : Targets, optional
        The layers trained low-rank (default ``Targets()``: linear layers and
        k×k convolutions); output heads and grouped convolutions stay as they are.
    include, exclude, kinds, filter_fn
        Shortcuts for the fields of ``targets``.

    Attributes
    ----------
    ranks : dict of str to int
        The rank each layer was last truncated to.
    history : list of (int, dict)
        ``(step, ranks)`` at every truncation.

    Examples
    --------
    >>> import torch, lowrank
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> trp = lowrank.train.TRP(model, optimizer, energy=0.5, period=2, include="0")
    >>> for _ in range(4):
    ...     model(torch.randn(8, 32)).square().mean().backward()
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    >>> trp.history[0][0], trp.ranks["0"] < 32
    (2, True)
    >>> report = trp.finalize()
    >>> type(model[0]).__name__
    'LowRankLinear'

    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        energy: Schedule = 0.99,
        period: int = 10,
        nuclear_weight: float = 3e-4,
        *,
        conv_scheme: str = "channel",
        targets: Targets | None = None,
        include: Any = None,
        exclude: Any = None,
        kinds: Any = None,
        filter_fn: Any = None,
    ) -> None:
        super().__init__(model, optimizer)
        self.energy = energy
        for step in (0, getattr(energy, "steps", 0)):  # a Ramp's both ends
            fraction_at(energy, step, "energy")
        self.period = check_int(period, "period")
        self.nuclear_weight = check_nonnegative(nuclear_weight, "nuclear_weight")
        self.conv_scheme = check_choice(conv_scheme, CONV_SCHEMES, "conv_scheme")
        self.targets = targets_from(targets, include=include, exclude=exclude, kinds=kinds, filter_fn=filter_fn)
        self.skipped: dict[str, str] = {}
        self.layers: list[_Layer] = []
        self._order: list[str] = []
        for target in self.targets.select(self.model):
            self._order.append(target.name)
            try:
                if target.head:
                    raise UnsupportedLayerError("output head")
                matrix = weight_matrix(target.module, target.kind, self.conv_scheme)
            except UnsupportedLayerError as reason:
                self.skipped[target.name] = str(reason)
                continue
            self.layers.append(_Layer(target.name, target.module, matrix, FINAL_METHODS[matrix.layout]))
        if not self.layers:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in self.skipped.items())
            raise ValueError(f"TRP has no layer to train low-rank among the targets {self.targets.describe()} "
                             f"({reasons})")
        self._check_optimized([(f"{layer.name}.weight", layer.module.weight) for layer in self.layers])
        self.ranks: dict[str, int] = {}
        self.history: list[tuple[int, dict[str, int]]] = []
        self._directions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._attach(self._add_subgradients, self._after_step)

    def energy_at(self, step: int) -> float:
        """The energy kept at optimizer step ``step``."""
        return fraction_at(self.energy, step, "energy")

    def _add_subgradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before the update that follows a truncation: add ``λ U_k V_kᵀ`` to each truncated weight's gradient."""
        if self.nuclear_weight and self._directions:
            for layer in self.layers:
                u, vh = self._directions[layer.name]
                weight = layer.module.weight
                direction = layer.matrix.as_weight(self.nuclear_weight * (u @ vh), weight.shape)
                weight.grad = direction.clone() if weight.grad is None else weight.grad.add_(direction)
        self._directions.clear()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After each update: count it, and truncate every ``period`` steps."""
        self.step += 1
        if self.step % self.period == 0:
            self.truncate()

    @torch.no_grad()
    def truncate(self) -> dict[str, int]:
        """Truncate every layer now at the current step's energy (the hooks call it); the ranks chosen.

        Under torch.distributed each layer is decomposed by one rank and its
        factors broadcast, so every process holds the same weights.
        """
        energy = self.energy_at(self.step)
        rank, size = world()
        for layer in self.layers:  # on every rank, so that none waits on a broadcast that never comes
            if not bool(torch.isfinite(layer.module.weight).all()):
                raise FloatingPointError(f"TRP: layer {layer.name!r} has non-finite weights at optimizer step "
                                         f"{self.step} (a diverging learning rate?)")
        for index, layer in enumerate(self.layers):
            weight = layer.module.weight
            source = owner(index)
            if rank == source:
                u, s, vh = energy_truncation(layer.matrix.read(weight.detach()), energy,
                                             self.ranks.get(layer.name), seed=self.step)
                kept = torch.tensor([s.numel()], device=weight.device)
            else:
                kept = torch.zeros(1, dtype=torch.long, device=weight.device)
            if size > 1:
                broadcast_from([kept], source)
                if rank != source:
                    rows, cols = layer.matrix.read(weight.detach()).shape
                    k = int(kept)
                    u, s, vh = (weight.new_empty(rows, k), weight.new_empty(k), weight.new_empty(k, cols))
                broadcast_from([u, s, vh], source)
            layer.matrix.write(weight, (u * s) @ vh)
            self.ranks[layer.name] = int(s.numel())
            if self.nuclear_weight:
                self._directions[layer.name] = (u, vh)
        self.history.append((self.step, dict(self.ranks)))
        return dict(self.ranks)

    def state_dict(self) -> dict[str, Any]:
        """Step, ranks, rank history and the pending nuclear-norm directions."""
        return {
            **super().state_dict(),
            "ranks": dict(self.ranks),
            "history": [(step, dict(ranks)) for step, ranks in self.history],
            "directions": {name: (u.clone(), vh.clone()) for name, (u, vh) in self._directions.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output."""
        super().load_state_dict(state)
        self.ranks = dict(state["ranks"])
        self.history = [(step, dict(ranks)) for step, ranks in state["history"]]
        self._directions = {name: (u, vh) for name, (u, vh) in state["directions"].items()}

    @torch.no_grad()
    def finalize(self) -> Any:
        """Swap each layer for its factorized module at the trained rank (that of the last truncation).

        The module is the best approximation of the current weight at that
        rank (its truncated SVD), exact when no update came after the last
        truncation. A layer never truncated yet is truncated by the current
        energy; a layer whose factors would hold as many parameters as its
        dense weight stays dense (the report says why). The model is changed only if every layer could be factorized;
        TRP detaches from the optimizer (which still holds the dense weights:
        build a new one to train on).

        Returns
        -------
        CompressionReport
            One row per targeted layer: rank, parameters and the relative
            error of the factorized weight against the current dense one;
            skipped layers with their reason.

        """
        self._check_not_finalized()
        energy = self.energy_at(self.step)
        rows, replacements = [], []
        planned = {layer.name: layer for layer in self.layers}
        for name in self._order:
            if name in self.skipped:
                rows.append(LayerReport.dense(name, self.model.get_submodule(name), skip_reason=self.skipped[name]))
                continue
            layer = planned[name]
            rank = self.ranks.get(name)
            if rank is None:
                rank = energy_truncation(layer.matrix.read(layer.module.weight.detach()), energy)[1].numel()
            module = layer.method.from_dense(layer.module, rank)
            row = LayerReport.dense(name, layer.module, layer.method.name)
            if module.num_params >= row.params_before:
                row.skip_reason = (f"trained rank {rank} is above break-even: its factors would hold "
                                   f"{module.num_params:,} parameters, the dense layer {row.params_before:,}")
            else:
                row.record(layer.module, module)
                replacements.append((name, module))
            rows.append(row)
        settings = {"energy": energy, "period": self.period, "nuclear_weight": self.nuclear_weight,
                    "conv_scheme": self.conv_scheme, "targets": self.targets.to_dict()}
        return self._swap(rows, replacements, settings)
