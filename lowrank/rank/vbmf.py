"""Empirical variational Bayes matrix factorization (EVBMF) as a rank rule.

The global analytic solution of fully-observed VBMF (Nakajima, Sugiyama,
Babacan and Tomioka, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 14, 2013) keeps exactly the components
whose singular value exceeds a threshold set by the noise variance; the
*empirical* variant also estimates the noise variance, by minimising the free
energy over it. Both steps need only the singular values and the matrix shape.

This module also holds the input checks that every spectrum rule in
:mod:`lowrank.rank` shares (:func:`check_spectrum`, :func:`check_shape`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowrank.checks import check_positive

# Candidate noise variances per refinement round of the free-energy minimisation, and the number
# of rounds: each round zooms in on the best candidate's two neighbours.
_GRID_POINTS = 256
_GRID_ROUNDS = 4
# When the spectrum says the noise could be zero (an exactly low-rank matrix), the search for the
# noise variance stops at this fraction of its upper bound instead.
_NOISE_FLOOR = 1e-14


def check_spectrum(singular_values: torch.Tensor, name: str = "singular_values") -> torch.Tensor:
    """Validate a spectrum and return it as float64, sorted in decreasing order.

    Parameters
    ----------
    singular_values : torch.Tensor
        A non-empty 1-D tensor (or array-like) of finite, non-negative values.
    name : str
        The argument name used in error messages.

    Returns
    -------
    torch.Tensor
        The values in float64, on the input's device, largest first.

    Raises
    ------
    ValueError
        If the input is not 1-D, is empty, complex or boolean, or holds a
        negative, NaN or infinite value.

    """
    values = torch.as_tensor(singular_values)
    if values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"{name} must be real numbers, got dtype {values.dtype}")
    if not isinstance(singular_values, torch.Tensor):  # an array-like: read it in float64 directly
        values = torch.as_tensor(singular_values, dtype=torch.float64)
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    values = values.detach().to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} must be finite, got {values.tolist()[:8]}...")
    if bool((values < 0).any()):
        raise ValueError(f"{name} must be non-negative, got minimum {float(values.min())!r}")
    return torch.sort(values, descending=True).values


def check_shape(shape: Sequence[int], spectrum_length: int | None = None) -> tuple[int, int]:
    """Validate ``(rows, cols)`` of the matrix a spectrum came from.

    Parameters
    ----------
    shape : sequence of two ints
        Positive row and column counts.
    spectrum_length : int, optional
        The number of singular values given; it may not exceed ``min(shape)``.

    Returns
    -------
    tuple of int
        ``(rows, cols)``.

    Raises
    ------
    ValueError
        If ``shape`` is not two positive ints, or the spectrum is longer than
        ``min(shape)``.

    """
    try:
        rows, cols = shape
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (rows, cols), got {shape!r}") from None
    for size in (rows, cols):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"shape must be two positive ints (rows, cols), got {shape!r}")
    if spectrum_length is not None and spectrum_length > min(rows, cols):
        raise ValueError(
            f"a {rows}x{cols} matrix has at most {min(rows, cols)} singular values, got {spectrum_length}"
        )
    return rows, cols


@dataclass(frozen=True)
class VBMFResult:
    """What :func:`vbmf` found.

    Attributes
    ----------
    rank : int
        Number of components EVBMF keeps (may be 0).
    noise_variance : float
        The noise variance per matrix entry (estimated, or the one given).
    threshold : float
        The singular value a component must exceed to be kept,
        ``sqrt(M * noise_variance * (1 + tau) * (1 + alpha / tau))``.

    """

    rank: int
    noise_variance: float
    threshold: float


def evb_tau_bar(alpha: float) -> float:
    """The EVB threshold constant ``tau_bar`` for aspect ratio ``alpha = L / M`` in (0, 1].

    ``tau_bar`` is the positive zero of the concave function
    ``psi(tau) = log(1 + tau) + alpha * log(1 + tau / alpha) - tau``
    (Nakajima et al. 2013; it is about ``2.5129`` for square matrices, and the
    popular approximation ``2.5129 * sqrt(alpha)`` elsewhere). It is found by
    bisection to machine precision.

    Parameters
    ----------
    alpha : float
        ``min(shape) / max(shape)``.

    Returns
    -------
    float
        ``tau_bar``.

    Examples
    --------
    >>> round(evb_tau_bar(1.0), 4)
    2.5129

    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")

    def psi(tau: float) -> float:
        return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau

    # psi(0) = 0 and psi'(0) = 1, psi is concave, and psi(10) < 0 for every alpha <= 1.
    low, high = math.sqrt(alpha) * 0.5, 10.0
    while psi(low) <= 0.0:  # only for extreme alpha, where sqrt(alpha) / 2 is already past the root
        low *= 0.5
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if psi(middle) > 0.0:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``tau(x)``, the inverse of ``x = (1 + tau)(1 + alpha / tau)`` on ``tau >= sqrt(alpha)``."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + torch.sqrt((b * b - 4.0 * alpha).clamp_min(0.0)))


def _free_energy(sigma2: torch.Tensor, squares: torch.Tensor, rows_m: int, alpha: float, x_bar: float) -> torch.Tensor:
    """The EVB free energy (up to terms constant in sigma2, divided by ``M / 2``) at each ``sigma2``.

    ``sum_h x_h + L log sigma2 + sum_{h: x_h > x_bar} psi(tau(x_h))`` with
    ``x_h = gamma_h**2 / (M sigma2)``; ``squares`` holds all ``L`` squared
    singular values (zeros included).
    """
    x = squares[None, :] / (rows_m * sigma2[:, None])
    tau = _tau(x, alpha)
    psi = torch.log1p(tau) + alpha * torch.log1p(tau / alpha) - tau
    kept = torch.where(x > x_bar, psi, torch.zeros_like(psi))
    return x.sum(1) + squares.numel() * torch.log(sigma2) + kept.sum(1)


def _estimate_noise_variance(squares: torch.Tensor, m: int, alpha: float, x_bar: float) -> float:
    """Minimise the free energy over the noise variance within its analytic bounds."""
    ell = squares.numel()
    upper = float(squares.sum()) / (ell * m)
    # At most h_bar components can be kept (Nakajima et al. 2013), which bounds sigma2 from below.
    h_bar = min(math.ceil(ell / (1.0 + alpha)) - 1, ell)
    tail = squares[h_bar:]
    lower = max(float(tail[0]) / (m * x_bar), float(tail.mean()) / m) if tail.numel() else 0.0
    lower = min(max(lower, _NOISE_FLOOR * upper), upper)
    if lower >= upper:
        return upper
    # The free energy is piecewise smooth but not convex: scan a log-spaced grid, then zoom in.
    low, high = math.log(lower), math.log(upper)
    best = high
    for _ in range(_GRID_ROUNDS):
        grid = torch.linspace(low, high, _GRID_POINTS, dtype=torch.float64, device=squares.device)
        energy = _free_energy(torch.exp(grid), squares, m, alpha, x_bar)
        index = int(torch.argmin(energy))
        best = float(grid[index])
        low, high = float(grid[max(index - 1, 0)]), float(grid[min(index + 1, _GRID_POINTS - 1)])
    return math.exp(best)


def vbmf(singular_values: torch.Tensor, shape: Sequence[int], *, noise_variance: float | None = None) -> VBMFResult:
    """Empirical variational Bayes matrix factorization of a spectrum: rank, noise variance, threshold.

    Follows the global analytic solution of Nakajima, Sugiyama, Babacan and
    Tomioka (JMLR 2013). With ``L = min(shape)``, ``M = max(shape)`` and
    ``alpha = L / M``, a component is kept exactly when its singular value
    exceeds ``sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))`` (see
    :func:`evb_tau_bar`). When ``noise_variance`` is not given, ``sigma2`` is
    the minimiser of the EVB free energy within its analytic bounds
    ``[max(gamma_{H+1}**2 / (M x_bar), mean(gamma_{H+1:}**2) / M), ||Y||**2 / (L M)]``
    (``H = ceil(L / (1 + alpha)) - 1``, ``x_bar = (1 + tau_bar)(1 + alpha / tau_bar)``),
    found by a log-spaced grid search refined around the best point (the
    free energy is not convex, so a grid finds the global minimum where a
    bounded local search may not). Everything is computed in float64.

    Parameters
    ----------
    singular_values : torch.Tensor
        Singular values of the matrix, any order. Fewer than ``min(shape)`` may
        be given: the missing ones are taken to be zero (so a spectrum from a
        truncated SVD of an exactly low-rank matrix is fine, but a truncated
        spectrum of a full-rank matrix underestimates the noise).
    shape : tuple of int
        ``(rows, cols)`` of the matrix; the result does not depend on the order.
    noise_variance : float, optional
        The noise variance per entry if known; it is estimated otherwise.

    Returns
    -------
    VBMFResult
        The number of components kept, the noise variance and the threshold.
        An all-zero spectrum gives rank 0 with zero noise variance.

    """
    s = check_spectrum(singular_values)
    rows, cols = check_shape(shape, s.numel())
    ell, m = min(rows, cols), max(rows, cols)
    alpha = ell / m
    tau_bar = evb_tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    if noise_variance is None:
        top = float(s[0])
        if top == 0.0:
            return VBMFResult(0, 0.0, 0.0)
        # Estimated on the spectrum divided by its largest value, so that the squares neither overflow
        # (values above about 1e154) nor underflow (below about 1e-154) and the rank does not depend on
        # the scale. Only the returned variance and threshold are scaled back; they may overflow to inf
        # or underflow for a spectrum near the ends of the float64 range, the rank does not.
        scaled = s / top
        squares = torch.zeros(ell, dtype=torch.float64, device=s.device)
        squares[: s.numel()] = scaled * scaled
        sigma2 = _estimate_noise_variance(squares, m, alpha, x_bar)
        threshold = math.sqrt(m * x_bar) * math.sqrt(sigma2)
        return VBMFResult(int((scaled > threshold).sum()), sigma2 * top * top, threshold * top)
    sigma2 = check_positive(noise_variance, "noise_variance")
    # sqrt(M x_bar) sqrt(sigma2), not sqrt(M sigma2 x_bar): the product overflows for a huge sigma2
    threshold = math.sqrt(m * x_bar) * math.sqrt(sigma2)
    return VBMFResult(int((s > threshold).sum()), sigma2, threshold)


def vbmf_rank(singular_values: torch.Tensor, shape: Sequence[int], *, noise_variance: float | None = None) -> int:
    """Number of components empirical VBMF keeps; 0 when it finds only noise.

    See :func:`vbmf` for the method. The result may be 0 (pure noise, or an
    all-zero spectrum); :class:`lowrank.rank.VBMF` clamps it to its
    ``min_rank``.

    For a Tucker-2 convolution, :func:`lowrank.compress` applies the rule to
    each mode unfolding separately: the spectrum of the mode-0 unfolding
    ``(out_channels, in_channels * kh * kw)`` with that shape gives the output
    rank, and the mode-1 unfolding ``(in_channels, out_channels * kh * kw)`` the
    input rank. An unfolding is just a matrix, so nothing else changes.

    Parameters
    ----------
    singular_values : torch.Tensor
        Singular values, any order; missing trailing ones count as zero.
    shape : tuple of int
        ``(rows, cols)`` of the matrix they came from.
    noise_variance : float, optional
        The noise variance per entry if known; estimated otherwise.

    Returns
    -------
    int
        A rank in ``[0, len(singular_values)]``.

    Examples
    --------
    >>> import torch
    >>> # known unit noise on a 100 x 100 matrix: the threshold is about 22.16
    >>> vbmf_rank(torch.tensor([30.0, 23.0, 22.0, 5.0]), (100, 100), noise_variance=1.0)
    2

    """
    return vbmf(singular_values, shape, noise_variance=noise_variance).rank
