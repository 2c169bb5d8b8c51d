"""Healing: a short distillation of a factorized model towards the dense one it came from."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank.calibrate import CalibrationBatch, eval_mode, model_output_tensor
from lowrank.checks import check_int, check_positive
from lowrank.nn import FactorizedModule
from lowrank.nn.surgery import train_only


@dataclass(frozen=True)
class HealConfig:
    """How long, and how fast, :func:`heal` trains the factors after compression.

    Attributes
    ----------
    steps : int
        Most Adam steps (0: no bound on steps).
    seconds : float, optional
        Most seconds. Healing runs when either bound is set; with both, it
        stops at the first reached.
    lr : float
        Adam's learning rate.
    holdout : float
        Share of the calibration batches held out of training (the last
        ones, at least one) to stop early on: every ``eval_every`` steps the
        distillation loss on them is measured, the factors of the best
        measurement are kept, and training stops after ``patience``
        measurements without improvement; the factors of the best are put
        back at the end (the held-out batches inform the compression itself,
        so this guards against overfitting the training batches, not the
        calibration text's domain). 0: train on every batch until a bound is
        reached. The default, a quarter, lost fewer points than healing on
        every batch on text of other domains in both calibration draws of
        ``benchmarks/generalise.py``.
    eval_every : int, optional
        Steps between held-out measurements (default: one pass over the
        training batches).
    patience : int
        Held-out measurements without improvement before stopping.

    Examples
    --------
    >>> HealConfig(steps=100).enabled, HealConfig().enabled
    (True, False)

    """

    steps: int = 0
    seconds: float | None = None
    lr: float = 1e-4
    holdout: float = 0.25
    eval_every: int | None = None
    patience: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_int(self.steps, "HealConfig.steps", minimum=0))
        if self.seconds is not None:
            object.__setattr__(self, "seconds", check_positive(self.seconds, "HealConfig.seconds"))
        object.__setattr__(self, "lr", check_positive(self.lr, "HealConfig.lr"))
        if not (isinstance(self.holdout, (int, float)) and 0.0 <= self.holdout < 1.0):
            raise ValueError(f"HealConfig.holdout must be a share in [0, 1), got {self.holdout!r}")
        if self.eval_every is not None:
            object.__setattr__(self, "eval_every", check_int(self.eval_every, "HealConfig.eval_every", minimum=1))
        object.__setattr__(self, "patience", check_int(self.patience, "HealConfig.patience", minimum=1))

    @property
    def enabled(self) -> bool:
        """Whether any healing is asked for."""
        return self.steps > 0 or self.seconds is not None

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data."""
        return asdict(self)


@dataclass(frozen=True)
class HealReport:
    """What :func:`heal` did: steps taken, seconds spent, and the distillation loss before and after.

    The losses are over the training batches; with a holdout, ``held_out_before``
    and ``held_out_after`` are over the held-out ones, ``best_step`` the step
    whose factors were kept (0: those before healing) and ``stopped_early``
    whether the patience ran out before a bound was reached.
    """

    steps: int
    seconds: float
    loss_before: float
    loss_after: float
    held_out_before: float | None = None
    held_out_after: float | None = None
    best_step: int | None = None
    stopped_early: bool = False


def reference_outputs(model: nn.Module, batches: Sequence[CalibrationBatch]) -> list[torch.Tensor]:
    """The model's output tensor on every batch (in eval mode, without gradients): the targets of :func:`heal`."""
    with eval_mode(model), torch.no_grad():
        return [model_output_tensor(batch.run(model)).detach() for batch in batches]


def _distance(output: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared distance over the real (unmasked) positions, relative to the target's mean square there."""
    squared, reference = (output - target) ** 2, target**2
    if token_mask is not None and output.shape[:2] == token_mask.shape:
        squared, reference = squared[token_mask], reference[token_mask]
    return squared.mean() / reference.mean().clamp_min(torch.finfo(reference.dtype).tiny)


def heal(
    model: nn.Module,
    batches: Sequence[CalibrationBatch],
    targets: Sequence[torch.Tensor],
    config: HealConfig,
    *,
    progress: bool = False,
) -> HealReport:
    """Train the factors of ``model``'s factorized modules towards ``targets``; all else (biases too) is frozen.

    Each step runs one calibration batch (cycling through them) and takes an
    Adam step on the relative mean squared distance between the model's output
    tensor and the dense model's (over real tokens only). Dropout is off
    (eval mode); every parameter's ``requires_grad`` and ``grad`` and every
    module's mode are restored afterwards. With ``config.holdout``, the last
    batches are held out of training to stop early on (see :class:`HealConfig`).

    Parameters
    ----------
    model : nn.Module
        The factorized model, trained in place.
    batches : sequence of CalibrationBatch
        The calibration inputs.
    targets : sequence of torch.Tensor
        The dense model's output tensor on each batch (:func:`reference_outputs`).
    config : HealConfig
        Most steps and seconds (at least one of them), and the learning rate.
    progress : bool
        Show a progress bar.

    Returns
    -------
    HealReport
        Steps, seconds, and the loss over the training batches before and
        after (all batches without a holdout; with one, the held-out loss too).

    """
    if not config.enabled:
        raise ValueError("heal needs a bound: give steps= or seconds= (or both)")
    if len(batches) != len(targets) or not batches:
        raise ValueError(f"need one target per batch and at least one batch; got {len(batches)} and {len(targets)}")
    factors = [
        p for m in model.modules() if isinstance(m, FactorizedModule)
        for name, p in m.named_parameters() if name != "bias"
    ]
    if not factors:
        raise ValueError("the model has no factorized module to heal")
    held = 0
    if config.holdout:
        if len(batches) < 2:
            raise ValueError(f"holding out {config.holdout} of the calibration for early stopping needs at least 2 "
                             f"batches, got {len(batches)} (holdout=0 trains on it without stopping early)")
        held = min(len(batches) - 1, max(1, round(config.holdout * len(batches))))
    train, train_targets = batches[:len(batches) - held], targets[:len(targets) - held]
    check, check_targets = batches[len(batches) - held:], targets[len(targets) - held:]
    eval_every = config.eval_every or len(train)
    start = time.perf_counter()
    taken = 0
    with train_only(model, factors), eval_mode(model):
        before = _mean_loss(model, train, train_targets)
        stopping = _EarlyStopping(model, factors, check, check_targets, config.patience) if held else None
        optimizer = torch.optim.Adam(factors, lr=config.lr)
        bar = tqdm(total=config.steps or None, desc="lowrank.heal", unit="step", disable=not progress)
        while (not config.steps or taken < config.steps) and (
            config.seconds is None or time.perf_counter() - start < config.seconds
        ) and not (stopping and stopping.out_of_patience):
            batch = train[taken % len(train)]
            loss = _distance(model_output_tensor(batch.run(model)), train_targets[taken % len(train)], batch.token_mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            taken += 1
            bar.update()
            if stopping and taken % eval_every == 0:
                stopping.measure(taken)
        bar.close()
        if stopping:
            if taken % eval_every:  # the steps after the last measurement are measured too
                stopping.measure(taken)
            stopping.restore_best()
        after = _mean_loss(model, train, train_targets)
        held_after = _mean_loss(model, check, check_targets) if held else None
    if stopping is None:
        return HealReport(taken, time.perf_counter() - start, before, after)
    return HealReport(taken, time.perf_counter() - start, before, after, stopping.first, held_after,
                      stopping.best_step, stopping.out_of_patience)


class _EarlyStopping:
    """The held-out loss of healing, measured now and then: the best factors so far, and patience left."""

    def __init__(self, model: nn.Module, factors: list[nn.Parameter], batches: Sequence[CalibrationBatch],
                 targets: Sequence[torch.Tensor], patience: int) -> None:
        self.model, self.factors, self.batches, self.targets, self.patience = model, factors, batches, targets, patience
        self.first = self.best = _mean_loss(model, batches, targets)
        self.best_step, self.best_factors, self.misses = 0, [p.detach().clone() for p in factors], 0

    @property
    def out_of_patience(self) -> bool:
        """Whether ``patience`` measurements in a row brought no improvement."""
        return self.misses >= self.patience

    def measure(self, step: int) -> None:
        """Measure the held-out loss after ``step`` steps; keep the factors if it is the best yet."""
        measured = _mean_loss(self.model, self.batches, self.targets)
        if measured < self.best:
            self.best, self.best_step, self.misses = measured, step, 0
            self.best_factors = [p.detach().clone() for p in self.factors]
        else:
            self.misses += 1

    def restore_best(self) -> None:
        """Put the best measurement's factors back into the model."""
        with torch.no_grad():
            for p, kept in zip(self.factors, self.best_factors):
                p.copy_(kept)


def _mean_loss(model: nn.Module, batches: Sequence[CalibrationBatch], targets: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(
            float(_distance(model_output_tensor(b.run(model)), t, b.token_mask)) for b, t in zip(batches, targets)
        ) / len(batches)
