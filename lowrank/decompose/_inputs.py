"""The input tensor of a decomposition: validated, in the dtype it is computed in, scaled into a safe range.

Every check raises a ``TypeError`` or ``ValueError`` whose message names the
argument, the value received and the range that is allowed; the checks of
plain arguments (ranks, tolerances, counts) are in :mod:`lowrank.checks`.
"""

from __future__ import annotations

import math
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


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """Return a generator on ``device`` seeded with ``seed`` (a fresh random seed when None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator
