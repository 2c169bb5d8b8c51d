"""A gradient-aware rank scheduler for factorized models and LoRA adapters: AdaLoRA's scores, one global budget.

Each rank component (see :mod:`lowrank.nn.components`) is scored by the
smoothed sensitivity ``|θ · ∇θ|`` of its entries times the smoothed
uncertainty of that sensitivity (Zhang et al. 2023, AdaLoRA). One parameter
budget, shared by every targeted module, falls on a cubic schedule from the
modules' starting size to ``ratio`` of their dense layers' size (of their
starting size, for adapter layers: see :class:`RankScheduler`); at each
update the lowest-scoring components are masked (set to zero and kept there)
until the model fits. Shapes never change while training, so optimizers and
DDP stay valid; :meth:`RankScheduler.finalize` removes the masked components,
which makes the modules smaller and their forward faster.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from lowrank.adapters.layers import dense_shape
from lowrank.checks import check_fraction, check_int
from lowrank.nn import FactorizedModule
from lowrank.nn.components import active_params, component_sums, keep_components, zero_components
from lowrank.nn.dense import count_params
from lowrank.report import LayerReport
from lowrank.targets import Targets, targets_from
from lowrank.train.base import TrainingMethod, ranked_modules
from lowrank.train.schedules import cubic_budget


class RankScheduler(TrainingMethod):
    """Mask the least important rank components of a factorized or adapted model until it fits a falling budget.

    Attaches to ``optimizer``: before each update it folds ``|θ · ∇θ|`` into
    every targeted entry's smoothed score; every ``interval`` steps within the
    fall (and at its last step) it masks the lowest-scoring components until
    the targeted modules hold at most the budget; after every update it keeps
    the masked components at zero.

    Parameters
    ----------
    model : nn.Module
        A model with factorized modules (from :func:`lowrank.compress`) or
        LoRA / FLoRA adapters (from :func:`lowrank.adapters.add`; AdaLoRA),
        or its DDP wrapper. A factorized module that is an adapter's frozen
        base is left alone.
    optimizer : torch.optim.Optimizer
        The optimizer training it; it must hold every targeted module's factors.
    ratio : float
        The final budget: parameters of the targeted modules as a share of
        their dense layers' (the meaning ``compress``'s ``ratio`` has), in (0, 1].
        An adapter layer counts its own parameters only (not its base's), and
        its share is of its starting size (a dense size means nothing for an
        adapter): on adapters alone, ``ratio=0.5`` halves the adapters'
        parameters, hence (for LoRA) their total rank.
    total_steps : int
        The optimizer steps of the run.
    warmup_steps : int, optional
        Steps at the starting budget before the fall (default: a tenth of ``total_steps``).
    final_steps : int, optional
        Steps at the final budget after the fall (default: a fifth of ``total_steps``).
    interval : int
        Optimizer steps between mask updates during the fall, ``>= 1``. With
        the default 1 the masks follow the budget at every step; a larger
        interval lets the budget in force lag the curve between updates.
    beta1, beta2 : float
        Smoothing of the sensitivity and of its uncertainty, in [0, 1) (AdaLoRA: 0.85).
    targets : Targets, optional
        Which factorized modules (by the kind of layer each replaced) and
        adapter layers (by the kind of their base layer; ``filter_fn`` sees
        the adapter layer); those without rank components (tensor trains and
        networks) are left as they are.
    include, exclude, kinds, filter_fn
        Shortcuts for the fields of ``targets``.

    Attributes
    ----------
    start_budget, final_budget : int
        Parameters of the targeted modules at the start and at the end.
    history : list of (int, dict)
        ``(step, ranks)`` after every mask update.

    Examples
    --------
    >>> import torch, lowrank
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))
    >>> _ = lowrank.compress(model, rank=24, progress=False)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> scheduler = lowrank.train.RankScheduler(model, optimizer, ratio=0.5, total_steps=20)
    >>> for _ in range(20):
    ...     model(torch.randn(16, 64)).square().mean().backward()
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    >>> scheduler.params() <= scheduler.final_budget
    True
    >>> report = scheduler.finalize()
    >>> report.params_after <= scheduler.final_budget
    True

    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ratio: float = 0.5,
        total_steps: int = 1000,
        *,
        warmup_steps: int | None = None,
        final_steps: int | None = None,
        interval: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        targets: Targets | None = None,
        include: Any = None,
        exclude: Any = None,
        kinds: Any = None,
        filter_fn: Any = None,
    ) -> None:
        super().__init__(model, optimizer)
        self.ratio = check_fraction(ratio, "ratio")
        self.total_steps = check_int(total_steps, "total_steps")
        self.warmup_steps = check_int(total_steps // 10 if warmup_steps is None else warmup_steps, "warmup_steps", 0)
        self.final_steps = check_int(total_steps // 5 if final_steps is None else final_steps, "final_steps", 0)
        if self.warmup_steps + self.final_steps >= self.total_steps:
            raise ValueError(f"warmup_steps + final_steps ({self.warmup_steps} + {self.final_steps}) must be less "
                             f"than total_steps ({self.total_steps}), or the budget never falls")
        self.interval = check_int(interval, "interval")
        self.beta1 = check_fraction(beta1, "beta1", low_closed=True, high_closed=False)
        self.beta2 = check_fraction(beta2, "beta2", low_closed=True, high_closed=False)
        self.targets = targets_from(targets, include=include, exclude=exclude, kinds=kinds, filter_fn=filter_fn)
        self.modules: dict[str, nn.Module] = ranked_modules(self.model, self.targets, "RankScheduler", adapters=True)
        scored = {f"{name}.{p}" for name, module in self.modules.items()
                  for axis in module.rank_axes() for p, _, _ in axis.slices}
        self._parameters = {name: self.model.get_parameter(name) for name in sorted(scored)}
        self._check_optimized(list(self._parameters.items()))
        self.kept: dict[str, dict[str, torch.Tensor]] = {
            name: {axis.name: torch.ones(axis.size, dtype=torch.bool) for axis in module.rank_axes()}
            for name, module in self.modules.items()
        }
        self._smoothed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        dense = sum(count_params(module.to_dense()) if isinstance(module, FactorizedModule)
                    else active_params(module, {}) for module in self.modules.values())
        self.start_budget = self.params()
        minimum = sum(active_params(module, {axis.name: 1 for axis in module.rank_axes()})
                      for module in self.modules.values())
        self.final_budget = min(self.start_budget, int(self.ratio * dense))
        if self.final_budget < minimum:
            raise ValueError(f"ratio={ratio} asks for {self.final_budget:,} parameters, fewer than the targeted "
                             f"modules hold at rank 1 ({minimum:,}, a ratio of {minimum / dense:.4f})")
        self.history: list[tuple[int, dict[str, Any]]] = []
        self._attach(self._score, self._after_step)

    def budget_at(self, step: int) -> float:
        """The cubic budget after ``step`` optimizer steps; the masks meet it at every update."""
        return cubic_budget(step, self.start_budget, self.final_budget, self.total_steps, self.warmup_steps,
                            self.final_steps)

    def params(self) -> int:
        """Parameters the targeted modules hold with their current masks (factors and bias)."""
        return sum(active_params(module, self._sizes(name)) for name, module in self.modules.items())

    def _sizes(self, name: str) -> dict[str, int]:
        """Per axis of module ``name``, the number of components kept."""
        return {axis: int(kept.sum()) for axis, kept in self.kept[name].items()}

    @property
    def ranks(self) -> dict[str, dict[str, int]]:
        """Per targeted module, the components kept on each rank axis."""
        return {name: self._sizes(name) for name in self.modules}

    def _score(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before an update within the fall: fold ``|θ · ∇θ|`` into the smoothed sensitivity and uncertainty."""
        if self.step >= self.total_steps - self.final_steps:
            return
        with torch.no_grad():
            for name, parameter in self._parameters.items():
                if parameter.grad is None:
                    continue
                sensitivity = (parameter * parameter.grad).abs()
                if name not in self._smoothed:  # both start at zero, as PEFT's AdaLoRA does
                    self._smoothed[name] = (torch.zeros_like(sensitivity), torch.zeros_like(sensitivity))
                mean, spread = self._smoothed[name]
                mean.mul_(self.beta1).add_(sensitivity, alpha=1 - self.beta1)
                spread.mul_(self.beta2).add_((sensitivity - mean).abs_(), alpha=1 - self.beta2)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After each update: count it, update the masks when due, keep masked components at zero."""
        self.step += 1
        end = self.total_steps - self.final_steps
        if self.warmup_steps < self.step <= end and (self.step % self.interval == 0 or self.step == end):
            self.update_masks()
        self._zero_masked()

    def scores(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per module and axis, each component's importance (AdaLoRA's score; zeros before any gradient)."""
        result = {}
        for name, module in self.modules.items():
            values = {}
            for axis in module.rank_axes():
                for p, _, _ in axis.slices:
                    mean, spread = self._smoothed.get(f"{name}.{p}", (None, None))
                    if mean is not None:
                        values[p] = mean * spread
            result[name] = {
                axis.name: component_sums(module, axis, values) if values else torch.zeros(axis.size)
                for axis in module.rank_axes()
            }
        return result

    @torch.no_grad()
    def update_masks(self) -> dict[str, dict[str, int]]:
        """Mask the lowest-scoring kept components until the modules fit :meth:`budget_at` the current step.

        Masked components stay masked; every axis keeps at least one. The
        order is a stable sort of the scores, which every process of a DDP
        run computes from the same all-reduced gradients, so all of them mask
        the same components. Returns :attr:`ranks`.
        """
        budget = self.budget_at(self.step)
        total = self.params()
        if total > budget:
            owners, indices, scores = [], [], []
            for name, by_axis in self.scores().items():
                for axis, score in by_axis.items():
                    kept = torch.nonzero(self.kept[name][axis]).flatten()
                    owners += [(name, axis)] * kept.numel()
                    indices.append(kept)
                    scores.append(score.detach().cpu().double()[kept])
            indices_all = torch.cat(indices).tolist()
            for j in torch.argsort(torch.cat(scores), stable=True).tolist():
                if total <= budget:
                    break
                (name, axis), index = owners[j], indices_all[j]
                kept = self.kept[name][axis]
                if int(kept.sum()) == 1:
                    continue
                before = active_params(self.modules[name], self._sizes(name))
                kept[index] = False
                total += active_params(self.modules[name], self._sizes(name)) - before
        self._zero_masked()
        self.history.append((self.step, self.ranks))
        return self.ranks

    def _zero_masked(self) -> None:
        """Set every masked component to zero (an optimizer with momentum would move it).

        Runs after every optimizer step, so it walks only the axes that have masked components.
        """
        for name, module in self.modules.items():
            for axis in module.rank_axes():
                kept = self.kept[name][axis.name]
                if not kept.all():
                    zero_components(module, axis, torch.nonzero(~kept).flatten())

    def state_dict(self) -> dict[str, Any]:
        """Step, masks, smoothed scores and history."""
        return {
            **super().state_dict(),
            "kept": {name: {axis: kept.clone() for axis, kept in by_axis.items()}
                     for name, by_axis in self.kept.items()},
            "smoothed": {name: (mean.clone(), spread.clone()) for name, (mean, spread) in self._smoothed.items()},
            "history": [(step, ranks) for step, ranks in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output."""
        super().load_state_dict(state)
        self.kept = {name: {axis: kept.clone() for axis, kept in by_axis.items()}
                     for name, by_axis in state["kept"].items()}
        self._smoothed = {name: (mean.clone(), spread.clone()) for name, (mean, spread) in state["smoothed"].items()}
        self.history = list(state["history"])

    def finalize(self) -> Any:
        """Remove the masked components: each module becomes a smaller one of its class, with the same outputs.

        Returns
        -------
        CompressionReport
            One row per targeted module: the ranks kept and the parameters
            before (at the start of the run) and after.

        """
        self._check_not_finalized()
        if self.step < self.total_steps - self.final_steps:
            warnings.warn(f"RankScheduler finalized at step {self.step}, before its budget reached the final "
                          f"{self.final_budget:,} parameters (step {self.total_steps - self.final_steps}): the "
                          f"modules keep {self.params():,}", stacklevel=2)
        rows, replacements = [], []
        for name, module in self.modules.items():
            keep = {axis: torch.nonzero(kept).flatten() for axis, kept in self.kept[name].items()}
            smaller = keep_components(module, keep)
            if isinstance(module, FactorizedModule):
                row = LayerReport.dense(name, module, "rank-scheduler")
                row.record(module, smaller)
            else:  # an adapter: its own parameters, its ranks as its tensors hold them
                ranks = tuple(axis.size for axis in smaller.rank_axes())
                row = LayerReport(name, type(module).__name__, dense_shape(module.base_layer), "rank-scheduler",
                                  ranks[0] if len(ranks) == 1 else ranks, active_params(module, {}),
                                  active_params(smaller, {}), None)
            rows.append(row)
            replacements.append((name, smaller))
        settings = {"ratio": self.ratio, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                    "final_steps": self.final_steps, "interval": self.interval, "targets": self.targets.to_dict()}
        return self._swap(rows, replacements, settings)
