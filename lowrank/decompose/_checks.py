"""Validation of the arguments shared by the decomposition functions.

Every check raises a ``TypeError`` or ``ValueError`` whose message names the
argument, the value received and the range that is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from lowrank.decompose._linalg import squared_norm

# Half-precision inputs are decomposed in float32 and the factors cast back.
_COMPUTE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
# Mean squared entry outside which an input is rescaled by a power of two (see checked_input).
_SAFE_MEAN_SQUARE = (2.0**-64, 2.0**64)


def as_float_tensor(x: Any, name: str = "x") -> torch.Tensor:
    """Return ``x`` as a finite, non-empty floating-point torch tensor.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        The input. A numpy array is converted with ``torch.from_numpy``.
    name : str
        The argument's name, used in error messages.

    Returns
    -------
    torch.Tensor
        The input, on its own device and in its own dtype. Finiteness is
        checked by :func:`finite_sq_norm`, which every decomposition calls once.

    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must have a real floating-point dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); every dimension must be at least 1")
    return x


def finite_sq_norm(x: torch.Tensor, name: str = "x") -> float:
    """Return ``||x||_F ** 2``, raising a ``ValueError`` if ``x`` holds NaN or Inf.

    One pass over the data: the norm is finite exactly when every entry is,
    unless the squares overflow or underflow, in which case the entries are
    checked one by one and the norm is recomputed in float64.
    """
    sq_norm = squared_norm(x)
    if math.isfinite(sq_norm) and (sq_norm > _SAFE_MEAN_SQUARE[0] * x.numel() or x.dtype == torch.float64):
        return sq_norm
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or Inf entries out of {x.numel()}; all must be finite")
    return squared_norm(x.double())


class CheckedInput(NamedTuple):
    """A validated decomposition input, as :func:`checked_input` returns it.

    ``x`` equals ``scale * work`` exactly: the algorithms decompose ``work``
    and multiply ``scale`` into one factor of the result.
    """

    x: torch.Tensor
    """The input as a tensor, in its own dtype (the dtype the factors are returned in)."""
    work: torch.Tensor
    """The input in the dtype the algorithms compute in (float32 for half types), contiguous
    so that unfoldings of its first and last modes are views, scaled into a safe range."""
    sq_norm: float
    """``||work||_F ** 2``."""
    scale: float
    """A power of two, 1.0 unless the input's magnitude is far from 1."""


def checked_input(x: Any, name: str = "x") -> CheckedInput:
    """Validate a decomposition's input and prepare it for computing.

    Gram matrices square the data, which under- or overflows float32 for
    entries far from 1 in magnitude (below about 1e-19 or above 1e19). An input
    whose root-mean-square entry lies outside ``[2**-32, 2**32]`` is therefore
    multiplied by the power of two that brings it near 1, which is exact and
    keeps every decomposition scale-equivariant.
    """
    x = as_float_tensor(x, name)
    work = x.to(compute_dtype(x.dtype)).contiguous()
    sq_norm = finite_sq_norm(work, name)
    mean_square = sq_norm / work.numel()
    if mean_square == 0.0 or _SAFE_MEAN_SQUARE[0] <= mean_square <= _SAFE_MEAN_SQUARE[1]:
        return CheckedInput(x, work, sq_norm, 1.0)
    exponent = round(math.log2(mean_square) / 2)
    # in float64, where 2**exponent itself cannot overflow
    work = (work.double() * 2.0**-exponent).to(work.dtype)
    return CheckedInput(x, work, sq_norm * 4.0**-exponent, 2.0**exponent)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype the algorithms compute in for inputs of ``dtype``."""
    return _COMPUTE_DTYPE.get(dtype, dtype)


def check_ndim(x: torch.Tensor, name: str, *, exact: int | None = None, minimum: int | None = None) -> None:
    """Raise a ``ValueError`` if ``x`` has the wrong number of modes."""
    if exact is not None and x.ndim != exact:
        raise ValueError(f"{name} must have exactly {exact} modes, got {x.ndim} (shape {tuple(x.shape)})")
    if minimum is not None and x.ndim < minimum:
        raise ValueError(f"{name} must have at least {minimum} modes, got {x.ndim} (shape {tuple(x.shape)})")


def check_tol(tol: float | None, name: str = "tol") -> float | None:
    """Check a relative-error target: ``None`` or a number in the open interval (0, 1)."""
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < float(tol) < 1.0:
        raise ValueError(f"{name} must be a relative error in the open interval (0, 1), got {tol!r}")
    return float(tol)


def check_nonnegative(value: float, name: str) -> float:
    """Check a non-negative number such as a stopping tolerance."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    """Check an integer option such as an iteration count."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_ranks(
    rank: int | Sequence[int],
    bounds: Sequence[int],
    *,
    name: str = "rank",
    what: Sequence[str] | None = None,
    clip: bool = False,
) -> tuple[int, ...]:
    """Check one rank per entry of ``bounds``, each in ``[1, bound]``.

    Parameters
    ----------
    rank : int or sequence of int
        One rank for every entry, or one rank per entry.
    bounds : sequence of int
        The largest meaningful rank of each entry.
    name : str
        The argument's name, used in error messages.
    what : sequence of str, optional
        What each entry is (for example ``"mode 2 (size 3)"``), used in error messages.
    clip : bool
        If True, ranks above their bound are lowered to it instead of raising.

    Returns
    -------
    tuple of int
        The ranks, one per entry of ``bounds``.

    """
    n = len(bounds)
    what = list(what) if what is not None else [f"entry {i}" for i in range(n)]
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
        ranks = [int(rank)] * n
    elif isinstance(rank, Sequence) and not isinstance(rank, str):
        if len(rank) != n:
            raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {len(rank)} values: {list(rank)!r}")
        ranks = list(rank)
    else:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(rank).__name__}")
    out = []
    for r, bound, label in zip(ranks, bounds, what):
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
            raise TypeError(f"{name} for {label} must be an int, got {r!r}")
        if r < 1:
            raise ValueError(f"{name} for {label} must be at least 1, got {int(r)}")
        if r > bound:
            if not clip:
                raise ValueError(
                    f"{name} for {label} must be at most {bound}, got {int(r)} "
                    "(pass clip=True to lower it to the largest possible rank)"
                )
            r = bound
        out.append(int(r))
    return tuple(out)


def check_method(method: str, allowed: Sequence[str], name: str = "method") -> str:
    """Check that ``method`` is one of ``allowed``."""
    if method not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {method!r}")
    return method


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """Return a generator on ``device`` seeded with ``seed`` (a fresh random seed when None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator
