"""Argument checks: the one place where a number, a fraction, a rank or a choice is validated.

Every function returns the checked value (converted where that helps, such as
a NumPy integer to an ``int``) or raises a ``ValueError`` (a ``TypeError`` for
a value of the wrong kind) whose message names the argument, the value
received and what is allowed. A value is checked once, where it is first
turned into a config, a policy or a module; everything downstream trusts it.
This module imports nothing of ``lowrank``: every floor of the package uses it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (an int, float or NumPy scalar; not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (an int or NumPy integer; not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_fraction(value: object, name: str, *, low_closed: bool = False, high_closed: bool = True) -> float:
    """``value`` as a float in ``(0, 1]`` (the ends open or closed as asked).

    Examples
    --------
    >>> check_fraction(0.5, "ratio", high_closed=False)
    0.5
    >>> check_fraction(1.5, "ratio", high_closed=False)
    Traceback (most recent call last):
    ...
    ValueError: ratio must be a fraction in (0, 1), got 1.5

    """
    interval = ("[" if low_closed else "(") + "0, 1" + ("]" if high_closed else ")")
    if not is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a fraction in {interval}, got {value!r}")
    low_ok = value >= 0 if low_closed else value > 0
    high_ok = value <= 1 if high_closed else value < 1
    if not (low_ok and high_ok):
        raise ValueError(f"{name} must be a fraction in {interval}, got {value!r}")
    return float(value)


def check_tol(tol: float | None, name: str = "tol") -> float | None:
    """A relative-error target: ``None`` or a number in the open interval (0, 1)."""
    if tol is None:
        return None
    if not is_real(tol) or not 0.0 < float(tol) < 1.0:
        raise ValueError(f"{name} must be a relative error in the open interval (0, 1), got {tol!r}")
    return float(tol)


def check_nonnegative(value: float, name: str) -> float:
    """A finite number ``>= 0``, such as a stopping tolerance."""
    if not is_real(value) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive(value: float, name: str) -> float:
    """A finite number ``> 0``, such as a learning rate or a number of seconds."""
    if not is_real(value) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_int(value: int, name: str, minimum: int = 1) -> int:
    """An integer ``>= minimum``, such as an iteration count."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is True or False (not 0, 1 or another truthy value)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(value: object, allowed: Sequence[object], name: str) -> object:
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_ranks(
    rank: int | Sequence[int],
    bounds: Sequence[int | None],
    *,
    name: str = "rank",
    what: Sequence[str] | None = None,
    clip: bool | None = None,
) -> tuple[int, ...]:
    """One rank per entry of ``bounds``, each in ``[1, bound]``.

    Parameters
    ----------
    rank : int or sequence of int
        One rank for every entry, or one rank per entry.
    bounds : sequence of int or None
        The largest meaningful rank of each entry (None: no upper bound).
    name : str
        The argument's name, used in error messages.
    what : sequence of str, optional
        What each entry is (for example ``"mode 2 (size 3)"``), used in error messages.
    clip : bool, optional
        True: ranks above their bound are lowered to it. False: they raise, and
        the message says that ``clip=True`` would lower them. None: they raise
        (for callers without a ``clip`` option).

    Returns
    -------
    tuple of int
        The ranks, one per entry of ``bounds``.

    Examples
    --------
    >>> check_ranks(3, [4, 5])
    (3, 3)
    >>> check_ranks((2, 9), [4, 5], what=["r_out", "r_in"])
    Traceback (most recent call last):
    ...
    ValueError: rank for r_in must be at most 5, got 9

    """
    n = len(bounds)
    what = list(what) if what is not None else [f"entry {i}" for i in range(n)]
    if is_int(rank):
        ranks = [int(rank)] * n
    elif isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)):
        if len(rank) != n:
            raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {len(rank)} values: {list(rank)!r}")
        ranks = list(rank)
    else:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(rank).__name__}")
    out = []
    for r, bound, label in zip(ranks, bounds, what):
        if not is_int(r):
            raise TypeError(f"{name} for {label} must be an int, got {r!r}")
        if r < 1:
            raise ValueError(f"{name} for {label} must be at least 1, got {int(r)}")
        if bound is not None and r > bound:
            if not clip:
                hint = " (pass clip=True to lower it to the largest possible rank)" if clip is False else ""
                raise ValueError(f"{name} for {label} must be at most {bound}, got {int(r)}{hint}")
            r = bound
        out.append(int(r))
    return tuple(out)
