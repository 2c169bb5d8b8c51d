"""Values that change over training steps: a linear ramp (TRP's energy) and AdaLoRA's cubic budget."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lowrank.checks import check_fraction, check_int, is_real

Schedule = float | Callable[[int], float]


@dataclass(frozen=True)
class Ramp:
    """A value that moves linearly from ``start`` to ``end`` over ``steps`` steps, then stays at ``end``.

    Examples
    --------
    >>> energy = Ramp(0.99, 0.9, steps=900)
    >>> energy(0), round(energy(450), 3), energy(5000)
    (0.99, 0.945, 0.9)

    """

    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            if not is_real(getattr(self, name)):
                raise ValueError(f"Ramp.{name} must be a number, got {getattr(self, name)!r}")
        check_int(self.steps, "Ramp.steps")

    def __call__(self, step: int) -> float:
        """The value at ``step``."""
        progress = min(max(step, 0) / self.steps, 1.0)
        return self.start + (self.end - self.start) * progress


def fraction_at(schedule: Schedule, step: int, name: str) -> float:
    """The value of a fraction schedule (a number or a callable of the step) at ``step``, checked in (0, 1]."""
    value = schedule(step) if callable(schedule) else schedule
    where = f" (at step {step})" if callable(schedule) else ""
    try:
        return check_fraction(value, name)
    except ValueError as error:
        raise ValueError(f"{error}{where}") from None


def cubic_budget(step: int, start: float, end: float, total_steps: int, warmup_steps: int, final_steps: int) -> float:
    """AdaLoRA's budget: ``start`` during warm-up, a cubic fall to ``end``, then ``end`` for the final steps.

    ``b(t) = end + (start - end) * (1 - (t - warmup) / (total - warmup - final))^3``
    between ``warmup_steps`` and ``total_steps - final_steps``.

    Examples
    --------
    >>> [round(cubic_budget(t, 100, 50, 10, 2, 2)) for t in (0, 2, 4, 6, 8, 10)]
    [100, 100, 65, 52, 50, 50]

    """
    fall = total_steps - warmup_steps - final_steps
    if step < warmup_steps:
        return float(start)
    if step >= total_steps - final_steps or fall <= 0:
        return float(end)
    return end + (start - end) * (1 - (step - warmup_steps) / fall) ** 3
