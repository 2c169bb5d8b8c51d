"""Rank rules, rank policies and the whole-model budget allocation.

Expected ranks of the simple rules are worked out by hand in the comments. VBMF is checked
against the paper's constant, a planted-rank recovery, and an independent numpy statement of
the EVB free energy minimised on a fine grid. The allocation is checked against brute force.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import F64, add_noise, generator, planted_tucker, randn, random_orthonormal, unfold
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

from lowrank.rank import (
    VBMF,
    Energy,
    FixedRank,
    HeavyTail,
    LayerBudget,
    ParamFraction,
    RankPolicy,
    StableRank,
    Threshold,
    VBMFResult,
    allocate_ranks,
    energy_rank,
    heavy_tail_rank,
    minimum_budget,
    param_fraction_rank,
    policy_from_string,
    stable_rank,
    threshold_rank,
    vbmf,
    vbmf_rank,
)
from lowrank.rank.vbmf import evb_tau_bar

# ----------------------------------------------------------------------------- rules, by hand


@pytest.mark.parametrize(
    ("spectrum", "energy", "expected"),
    [
        ([3.0, 2.0, 1.0], 0.9, 2),  # 9, 13, 14 of 14: 13/14 = 0.93 >= 0.9
        ([1.0, 2.0, 3.0], 0.9, 2),  # any order
        ([3.0, 2.0, 1.0], 0.5, 1),  # 9/14 = 0.64
        ([4.0, 3.0], 0.64, 1),  # 16/25 = 0.64 exactly
        ([3.0, 2.0, 1.0], 1.0, 3),
        ([0.0, 0.0], 0.5, 1),  # an all-zero spectrum keeps one
    ],
)
def test_energy_rank_by_hand(spectrum, energy, expected):
    assert energy_rank(torch.tensor(spectrum), energy) == expected
    assert Energy(energy).choose(torch.tensor(spectrum), (len(spectrum), 10)) == expected


@pytest.mark.parametrize(
    ("spectrum", "threshold", "relative", "expected"),
    [
        ([10.0, 5.0, 1.0, 0.1], 0.1, True, 2),  # cut 1.0, strictly above: 10 and 5
        ([1.0, 10.0, 0.1, 5.0], 0.1, True, 2),  # any order
        ([10.0, 5.0, 1.0, 0.1], 0.0, True, 4),  # everything non-zero
        ([10.0, 5.0, 0.0, 0.0], 0.0, True, 2),  # the numerical rank
        ([10.0, 5.0, 1.0, 0.1], 1.0, True, 0),  # nothing is above the largest
        ([10.0, 5.0, 1.0, 0.1], 0.5, False, 3),  # absolute: 10, 5, 1
        ([10.0, 5.0, 1.0, 0.1], 20.0, False, 0),
        ([0.0, 0.0, 0.0], 0.1, True, 0),
    ],
)
def test_threshold_rank_by_hand(spectrum, threshold, relative, expected):
    assert threshold_rank(torch.tensor(spectrum), threshold, relative=relative) == expected


@pytest.mark.parametrize(
    ("spectrum", "expected"),
    [
        ([2.0, 1.0, 1.0], 2),  # (4 + 1 + 1) / 4 = 1.5
        ([3.0, 3.0, 3.0], 3),  # exactly 3
        ([0.1] * 7, 7),  # 7 * 0.01 / 0.01, integer up to rounding: not 8
        ([5.0, 0.0, 0.0], 1),
        ([4.0, 2.0, 2.0, 2.0, 2.0, 2.0], 3),  # (16 + 20) / 16 = 2.25
        ([0.0, 0.0], 0),
    ],
)
def test_stable_rank_by_hand(spectrum, expected):
    assert stable_rank(torch.tensor(spectrum)) == expected


@pytest.mark.parametrize(
    ("spectrum", "threshold", "expected"),
    [
        ([9.0, 5.0, 2.0, 1.0], 0.2, 2),  # normalised 1, 0.5, 0.125, 0
        ([1.0, 2.0, 9.0, 5.0], 0.2, 2),  # any order
        ([9.0, 5.0, 2.0, 1.0], 0.5, 2),  # 0.5 reaches 0.5
        ([9.0, 5.0, 2.0, 1.0], 0.51, 1),
        ([9.0, 5.0, 2.0, 1.0], 0.0, 4),
        ([9.0, 5.0, 2.0, 1.0], 1.0, 1),  # the largest always stays
        ([3.0, 3.0, 3.0], 0.5, 3),  # constant spectrum: keep all
        ([0.0, 0.0], 0.5, 0),
        ([11.0, 3.0, 2.0, 1.5, 1.0], 0.1, 3),  # 1, 0.2, 0.1, 0.05, 0: the 0.1 reaches 0.1
    ],
)
def test_heavy_tail_rank_by_hand(spectrum, threshold, expected):
    assert heavy_tail_rank(torch.tensor(spectrum), threshold) == expected
    assert HeavyTail(threshold).choose(torch.tensor(spectrum), (len(spectrum), 20)) == max(expected, 1)


def test_heavy_tail_default_threshold():
    # 0.175 is WeLore's 50% setting; normalised values 1, 0.5, 0.2, 0.15, 0 keep three
    assert HeavyTail().threshold == 0.175
    assert heavy_tail_rank(torch.tensor([21.0, 11.0, 5.0, 4.0, 1.0])) == 3


@pytest.mark.parametrize(
    ("shape", "fraction", "expected"),
    [
        ((64, 32), 0.5, 10),  # 1024 / 96 = 10.7
        ((4, 4), 0.5, 1),  # 8 / 8 = 1 exactly
        ((10, 10), 0.2, 1),  # 20 / 20 = 1 exactly
        ((20, 20), 0.3, 3),  # 120 / 40 = 3 exactly (0.3 is not exact in binary)
        ((10, 10), 0.19, 0),  # 19 / 20: not even rank 1
        ((100, 100), 1.0, 50),
        ((3, 1000), 1.0, 2),  # 3000 / 1003 = 2.99
        ((1, 1), 1.0, 0),  # 1 / 2
    ],
)
def test_param_fraction_rank_by_hand(shape, fraction, expected):
    assert param_fraction_rank(shape, fraction) == expected


@settings(max_examples=200)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 100))
def test_param_fraction_rank_matches_integer_arithmetic(rows, cols, percent):
    # largest r with r (rows + cols) <= percent / 100 rows cols, in exact integers
    expected = max(r for r in range(min(rows, cols) + 1) if 100 * r * (rows + cols) <= percent * rows * cols)
    assert param_fraction_rank((rows, cols), percent / 100) == expected


# ----------------------------------------------------------------------------- rules: invariances and input checks

SPECTRUM_RULES = {
    "energy": lambda s: energy_rank(s, 0.8),
    "threshold": lambda s: threshold_rank(s, 0.05),
    "threshold-abs": lambda s: threshold_rank(s, 0.3, relative=False),
    "stable": stable_rank,
    "heavy-tail": lambda s: heavy_tail_rank(s, 0.1),
    "vbmf": lambda s: vbmf_rank(s, (len(s), 2 * len(s))),
}


@settings(max_examples=40)
@given(
    st.lists(st.floats(0.0, 100.0) | st.floats(0.0, sys.float_info.max), min_size=1, max_size=30),
    st.randoms(use_true_random=False),
)
@example([3.22238221490463e-195], random.Random(0))  # stable_rank squared the largest value to 0.0 and divided by it
def test_rules_ignore_order_and_dtype(values, rng):
    s = torch.tensor(values, dtype=F64)
    shuffled = s[torch.tensor(rng.sample(range(len(values)), len(values)))]
    for name, rule in SPECTRUM_RULES.items():
        expected = rule(s)
        assert rule(shuffled) == expected, name
        assert rule(s.tolist()) == expected, name  # array-likes are converted at the boundary


@pytest.mark.parametrize("name", ["energy", "threshold", "stable", "heavy-tail", "vbmf"])
def test_relative_rules_ignore_scale(name):
    s = torch.tensor([9.0, 7.5, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1], dtype=F64)
    rule = SPECTRUM_RULES[name]
    assert rule(s) == rule(s * 1e-3) == rule(s * 1e4)


# Exact references for the relative rules, in rational arithmetic on the float values as given (so they
# see a subnormal or a 1e300 value exactly): the definitions of the docstrings, slack included.
_SLACK = 1 - Fraction(1, 10**12)


def _exact_energy_rank(values: list[float], energy: float) -> int:
    squares = [Fraction(v) ** 2 for v in sorted(values, reverse=True)]
    goal = Fraction(energy) * sum(squares) * _SLACK
    kept = Fraction(0)
    for rank, square in enumerate(squares, 1):
        kept += square
        if kept >= goal:
            return rank
    raise AssertionError("unreachable: the whole spectrum meets any goal")


def _exact_threshold_rank(values: list[float], threshold: float) -> int:
    cut = Fraction(threshold) * Fraction(max(values))
    return sum(Fraction(v) > cut for v in values)


def _exact_stable_rank(values: list[float]) -> int:
    top = Fraction(max(values))
    if top == 0:
        return 0
    ratio = sum(Fraction(v) ** 2 for v in values) / top**2
    return min(max(math.ceil(ratio * _SLACK), 1), len(values))


def _exact_heavy_tail_rank(values: list[float], threshold: float) -> int:
    top, bottom = Fraction(max(values)), Fraction(min(values))
    if top == bottom:
        return len(values) if top > 0 else 0
    return sum((Fraction(v) - bottom) / (top - bottom) >= Fraction(threshold) for v in values)


def _check_against_exact(s: torch.Tensor) -> None:
    """Every relative rule on ``s`` against its exact reference; thresholds are dyadic (exact in binary)."""
    values = s.tolist()
    for energy in (0.5, 0.9, 1.0):
        assert energy_rank(s, energy) == _exact_energy_rank(values, energy), ("energy", energy)
    for threshold in (0.0, 0.125, 0.375):
        assert threshold_rank(s, threshold) == _exact_threshold_rank(values, threshold), ("threshold", threshold)
        assert heavy_tail_rank(s, threshold) == _exact_heavy_tail_rank(values, threshold), ("heavy-tail", threshold)
    assert stable_rank(s) == _exact_stable_rank(values), "stable"


def _scaled(values: list[int], k: int) -> torch.Tensor:
    """``values * 2**k`` in float64, checked to be exact (integers below 2**11 stay exact down to 2**-1074)."""
    s = torch.tensor([math.ldexp(v, k) for v in values], dtype=F64)
    assert [Fraction(x) for x in s.tolist()] == [v * Fraction(2) ** k for v in values]
    return s


SCALE_RULES = {
    "energy": lambda s: [energy_rank(s, e) for e in (0.5, 0.8, 0.9, 1.0)],
    "threshold": lambda s: [threshold_rank(s, t) for t in (0.0, 0.05, 0.3, 0.375)],
    "stable": stable_rank,
    "heavy-tail": lambda s: [heavy_tail_rank(s, t) for t in (0.0, 0.1, 0.125, 0.3)],
    "vbmf": lambda s: [vbmf_rank(s, (len(s), len(s))), vbmf_rank(s, (len(s), 3 * len(s)))],
}


@settings(max_examples=100)
@given(
    st.lists(st.integers(0, 1024), min_size=1, max_size=12),  # all zeros included
    st.integers(-1074, 1013) | st.integers(-1074, -1030),  # the second: subnormal, where rounding is coarsest
)
@example([1, 1], 512)  # energy_rank: the squares overflowed to inf, the first one "kept" all the energy
@example([1], 512)  # stable_rank: max(s)**2 overflowed (OverflowError)
@example([1, 1], -538)  # energy_rank: the squares underflowed to 0, an "all-zero" spectrum kept one
@example([1], -538)  # stable_rank: max(s)**2 underflowed to 0 (ZeroDivisionError)
@example([0, 1], -513)  # vbmf: the noise bounds underflowed to 0, log(0) (ValueError)
@example([1], -537)  # vbmf: subnormal squares kept a component the unscaled spectrum does not
@example([12, 4], -1074)  # threshold_rank: 0.3 * 12 * 2**-1074 rounded up to 4 * 2**-1074 (energy_rank underflowed too)
def test_relative_rules_ignore_power_of_two_scale(values, k):
    # 2**k from the subnormal range (2**-1074 is the smallest float64 above 0) to 2**1023: the scaled
    # spectrum is exact, so every relative rule must give the rank it gives on the integers
    s, base = _scaled(values, k), torch.tensor(values, dtype=F64)
    for name, rule in SCALE_RULES.items():
        assert rule(s) == rule(base), name
    _check_against_exact(s)
    _check_against_exact(base)


@pytest.mark.parametrize("k", [-1074, -1070, -1060, -1022, -600, -300, 0, 300, 600, 1000, 1020])
def test_rules_on_tiny_huge_and_subnormal_spectra(k):
    # 12, 10, 6, 4, 2, 1 times 2**k: subnormal for k < -1025, 1.35e308 (near the float64 maximum) for k = 1020
    s = _scaled([12, 10, 6, 4, 2, 1], k)
    assert energy_rank(s, 0.8) == 2  # squares 144, 100, 36, 16, 4, 1: 244 of 301 is 0.81
    assert energy_rank(s, 1.0) == 6
    assert threshold_rank(s, 0.3) == 4  # above 3.6: 12, 10, 6, 4
    assert threshold_rank(s, 0.0) == 6
    assert stable_rank(s) == 3  # 301 / 144 = 2.09
    assert heavy_tail_rank(s, 0.1) == 4  # (s - 1) / 11: 1, 0.82, 0.45, 0.27, 0.09, 0
    base = vbmf(torch.tensor([12.0, 10.0, 6.0, 4.0, 2.0, 1.0], dtype=F64), (6, 12))
    result = vbmf(s, (6, 12))
    assert result.rank == base.rank
    # the threshold scales with the spectrum, the noise variance with its square, where representable
    if abs(k) <= 1000:
        assert result.threshold == pytest.approx(math.ldexp(base.threshold, k), rel=1e-12)
    if abs(k) <= 500:
        assert result.noise_variance == pytest.approx(math.ldexp(base.noise_variance, 2 * k), rel=1e-12)


def test_rules_at_the_ends_of_the_float64_range():
    biggest, smallest = sys.float_info.max, math.ldexp(1.0, -1074)
    equal = torch.tensor([biggest] * 3, dtype=F64)  # the squares overflow to inf
    assert energy_rank(equal, 0.9) == 3
    assert stable_rank(equal) == 3
    assert threshold_rank(equal, 0.5) == 3 and threshold_rank(equal, 1.0) == 0
    assert heavy_tail_rank(equal, 0.5) == 3
    assert vbmf_rank(equal, (3, 5)) == vbmf_rank(torch.ones(3, dtype=F64), (3, 5))
    tiny = torch.tensor([smallest] * 3, dtype=F64)  # the squares underflow to 0
    assert energy_rank(tiny, 0.9) == 3
    assert stable_rank(tiny) == 3
    assert threshold_rank(tiny, 0.5) == 3
    assert vbmf_rank(tiny, (3, 5)) == vbmf_rank(torch.ones(3, dtype=F64), (3, 5))
    # the whole range in one spectrum: next to the largest the others carry no energy, but are non-zero
    span = torch.tensor([biggest, 1.0, smallest], dtype=F64)
    assert energy_rank(span, 1.0) == 1
    assert stable_rank(span) == 1
    assert threshold_rank(span, 0.0) == 3  # the numerical rank counts every non-zero value
    assert threshold_rank(span, 1e-300) == 1
    assert heavy_tail_rank(span, 0.0) == 3 and heavy_tail_rank(span, 1e-300) == 1
    _check_against_exact(span)
    # a known noise variance near the float64 maximum: sqrt(M sigma2 x_bar) must not overflow
    # (1e308 * 2 * 4.91 is past it; the threshold is sqrt(9.8e308) = 3.1e154)
    assert vbmf(torch.tensor([1e155, 1e153], dtype=F64), (2, 2), noise_variance=1e308).rank == 1


def test_low_precision_spectrum_is_computed_in_float64():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    for name, rule in SPECTRUM_RULES.items():
        assert rule(s.half()) == rule(s.bfloat16()) == rule(s.double()), name


BAD_SPECTRA = [
    (torch.ones(2, 3), "1-D"),
    (torch.tensor([]), "non-empty"),
    (torch.tensor([1.0, -0.5]), "non-negative"),
    (torch.tensor([1.0, float("nan")]), "finite"),
    (torch.tensor([1.0, float("inf")]), "finite"),
    (torch.tensor([1.0 + 1j]), "real"),
    (torch.tensor([True, False]), "real"),
]


@pytest.mark.parametrize("name", list(SPECTRUM_RULES))
@pytest.mark.parametrize(("spectrum", "words"), BAD_SPECTRA)
def test_rules_reject_bad_spectra(name, spectrum, words):
    with pytest.raises(ValueError, match=f"singular_values must be.*{words}"):
        SPECTRUM_RULES[name](spectrum)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda s: energy_rank(s, 0.0), r"energy must be a fraction in \(0, 1\], got 0.0"),
        (lambda s: energy_rank(s, 1.5), "got 1.5"),
        (lambda s: threshold_rank(s, 1.5), r"relative threshold must be a fraction in \[0, 1\], got 1.5"),
        (lambda s: threshold_rank(s, -1.0, relative=False), "absolute threshold must be .* >= 0, got -1.0"),
        (lambda s: threshold_rank(s, float("nan"), relative=False), "got nan"),
        (lambda s: heavy_tail_rank(s, 1.2), r"threshold must be a fraction in \[0, 1\], got 1.2"),
        (lambda s: param_fraction_rank((4, 4), 0.0), r"fraction must be a fraction in \(0, 1\], got 0.0"),
        (lambda s: param_fraction_rank((4, 4), True), "got True"),
        (lambda s: param_fraction_rank((4, 0), 0.5), r"shape must be two positive ints.*\(4, 0\)"),
        (lambda s: param_fraction_rank((4,), 0.5), r"shape must be \(rows, cols\)"),
        (lambda s: vbmf_rank(s, (2, 10)), "a 2x10 matrix has at most 2 singular values, got 3"),
        (lambda s: vbmf_rank(s, (3, 10), noise_variance=0.0), "noise_variance must be .* > 0, got 0.0"),
    ],
)
def test_rules_reject_bad_parameters(call, words):
    with pytest.raises(ValueError, match=words):
        call(torch.tensor([3.0, 2.0, 1.0]))


# ----------------------------------------------------------------------------- VBMF


def test_tau_bar_matches_the_paper_and_an_independent_root():
    # Nakajima et al. 2013: tau_bar = 2.5129 for square matrices (2 log(1 + tau) = tau)
    assert evb_tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)
    for alpha in (1.0, 0.75, 0.3, 0.05, 1e-3):
        psi = lambda tau, a=alpha: math.log1p(tau) + a * math.log1p(tau / a) - tau  # noqa: E731
        reference = brentq(psi, math.sqrt(alpha) / 4, 20.0, xtol=1e-14)
        assert evb_tau_bar(alpha) == pytest.approx(reference, rel=1e-10)


def test_vbmf_with_known_noise_by_hand():
    # 100 x 100 with unit noise: threshold = sqrt(100 (1 + 2.5129)(1 + 1 / 2.5129)) = sqrt(491.08) = 22.160
    result = vbmf(torch.tensor([30.0, 23.0, 22.0, 5.0]), (100, 100), noise_variance=1.0)
    assert isinstance(result, VBMFResult)
    assert result.threshold == pytest.approx(22.160, abs=2e-3)
    assert result.rank == 2 and result.noise_variance == 1.0
    # the threshold scales with the noise standard deviation
    assert vbmf(torch.tensor([30.0]), (100, 100), noise_variance=4.0).threshold == pytest.approx(2 * 22.160, abs=4e-3)


def _planted(rows: int, cols: int, signal: torch.Tensor, noise_std: float, seed: int) -> torch.Tensor:
    gen = generator(seed)
    u, v = random_orthonormal(rows, signal.numel(), gen), random_orthonormal(cols, signal.numel(), gen)
    return (u * signal) @ v.T + noise_std * randn(rows, cols, gen=gen)


@pytest.mark.parametrize("seed", range(5))
def test_vbmf_recovers_a_planted_rank(seed):
    # rank 10, singular values 60..120 against unit noise (noise edge sqrt(200) + sqrt(300) = 31.5)
    y = _planted(200, 300, torch.linspace(60.0, 120.0, 10, dtype=F64), 1.0, seed)
    s = torch.linalg.svdvals(y)
    result = vbmf(s, (200, 300))
    assert result.rank == 10
    assert result.noise_variance == pytest.approx(1.0, rel=0.05)
    assert vbmf_rank(s, (300, 200)) == 10  # the orientation does not matter
    assert vbmf_rank(s * 1e3, (200, 300)) == 10  # nor the scale
    assert vbmf_rank(s.float(), (200, 300)) == 10


@pytest.mark.parametrize("seed", range(5))
def test_vbmf_keeps_nothing_of_pure_noise(seed):
    y = 3.0 * randn(200, 300, gen=generator(100 + seed))
    result = vbmf(torch.linalg.svdvals(y), y.shape)
    assert result.rank == 0
    assert result.noise_variance == pytest.approx(9.0, rel=0.05)
    assert VBMF().choose(torch.linalg.svdvals(y), y.shape) == 1  # the policy clamps to min_rank
    assert VBMF(min_rank=0).choose(torch.linalg.svdvals(y), y.shape) == 0


def _reference_free_energy(sigma2: np.ndarray, s: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """EVB free energy at each sigma2 (constants dropped), as Nakajima et al. write it at the EVB solution.

    2F = L M log sigma2 + ||Y||^2 / sigma2 + sum over kept h of M log(tau_h + 1) + L log(tau_h / alpha + 1) - M tau_h.
    """
    ell, m = min(rows, cols), max(rows, cols)
    alpha = ell / m
    tau_bar = brentq(lambda t: math.log1p(t) + alpha * math.log1p(t / alpha) - t, math.sqrt(alpha) / 4, 20.0)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    out = []
    for v in sigma2:
        x = s**2 / (m * v)
        kept = x[x > x_bar]
        tau = 0.5 * (kept - (1 + alpha) + np.sqrt((kept - (1 + alpha)) ** 2 - 4 * alpha))
        extra = np.sum(m * np.log1p(tau) + ell * np.log1p(tau / alpha) - m * tau)
        out.append(ell * m * np.log(v) + np.sum(s**2) / v + extra)
    return np.array(out)


@pytest.mark.parametrize(
    ("signal", "seed"),
    [
        (torch.linspace(60.0, 120.0, 10, dtype=F64), 0),
        (torch.linspace(33.0, 40.0, 6, dtype=F64), 1),  # components at the threshold: a rugged free energy
        (torch.tensor([], dtype=F64), 2),
    ],
)
def test_vbmf_noise_variance_minimises_the_free_energy(signal, seed):
    rows, cols = 120, 160
    y = _planted(rows, cols, signal, 1.0, seed) if signal.numel() else randn(rows, cols, gen=generator(seed))
    s = torch.linalg.svdvals(y)
    result = vbmf(s, (rows, cols))
    s_np = s.numpy()
    ell, m = rows, cols
    # the analytic bounds on sigma2, and a fine grid over them
    tau_bar = evb_tau_bar(ell / m)
    x_bar = (1 + tau_bar) * (1 + ell / m / tau_bar)
    h = math.ceil(ell / (1 + ell / m)) - 1
    lower = max(s_np[h] ** 2 / (m * x_bar), np.mean(s_np[h:] ** 2) / m)
    upper = np.sum(s_np**2) / (ell * m)
    assert lower <= result.noise_variance <= upper
    grid = np.exp(np.linspace(np.log(lower), np.log(upper), 20001))
    ours = _reference_free_energy(np.array([result.noise_variance]), s_np, rows, cols)[0]
    best = _reference_free_energy(grid, s_np, rows, cols).min()
    assert ours <= best + 1e-9 * abs(best)
    assert result.rank == int(np.sum(s_np > math.sqrt(m * result.noise_variance * x_bar)))


def test_vbmf_exactly_low_rank_and_truncated_spectrum():
    gen = generator(7)
    y = randn(50, 5, gen=gen) @ randn(5, 80, gen=gen)
    s = torch.linalg.svdvals(y)
    assert vbmf_rank(s, (50, 80)) == 5
    assert vbmf_rank(s[:5], (50, 80)) == 5  # the missing singular values count as zero
    assert vbmf_rank(torch.zeros(4), (4, 9)) == 0
    assert vbmf(torch.zeros(4), (4, 9)) == VBMFResult(0, 0.0, 0.0)


def test_vbmf_on_tucker2_unfoldings():
    # a conv weight of Tucker-2 ranks (8, 6) on its channel modes, plus noise: each unfolding is a matrix
    weight = add_noise(planted_tucker((64, 48, 3, 3), (8, 6), seed=3, modes=(0, 1)), 0.01, seed=4)
    for mode, rank in ((0, 8), (1, 6)):
        unfolding = unfold(weight, mode)
        assert vbmf_rank(torch.linalg.svdvals(unfolding), tuple(unfolding.shape)) == rank


# ----------------------------------------------------------------------------- policies


def test_policies_match_their_rules_and_clamp():
    s = torch.tensor([9.0, 5.0, 2.0, 1.0, 0.5, 0.1])
    shape = (6, 40)
    assert FixedRank(3).choose(s, shape) == 3
    assert FixedRank(50).choose(None, (10, 20)) == 10  # capped by the shape
    assert FixedRank(5, max_rank=3).choose(None, (10, 20)) == 3
    assert FixedRank(2, min_rank=8).choose(None, (4, 9)) == 4  # the shape wins over min_rank
    assert ParamFraction(0.5).choose(None, (64, 32)) == 10
    assert ParamFraction(0.01).choose(None, (10, 10)) == 1  # the rule says 0, min_rank says 1
    assert ParamFraction(0.01, min_rank=0).choose(None, (10, 10)) == 0
    assert Energy(0.9).choose(s, shape) == energy_rank(s, 0.9) == 2  # 81 + 25 = 106 of 111.26
    assert Energy(0.9, min_rank=4).choose(s, shape) == 4
    assert Threshold(0.15).choose(s, shape) == 3  # above 1.35: 9, 5 and 2
    assert Threshold(0.15, max_rank=1).choose(s, shape) == 1
    assert Threshold(1.5, relative=False).choose(s, shape) == 3
    assert Threshold(1.0).choose(s, shape) == 1  # the rule says 0
    assert StableRank().choose(s, shape) == 2  # 111.26 / 81 = 1.37
    assert HeavyTail(0.2).choose(s, shape) == 3  # (5 - 0.1) / 8.9 = 0.55, (2 - 0.1) / 8.9 = 0.21, then 0.1
    assert VBMF().choose(s, shape) == max(vbmf_rank(s, shape), 1)


def test_policies_are_frozen_and_comparable():
    policy = Energy(0.9, max_rank=64)
    assert isinstance(policy, RankPolicy)
    assert policy == Energy(0.9, max_rank=64) and policy != Energy(0.9)
    with pytest.raises(AttributeError):
        policy.energy = 0.5


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: FixedRank(0), "rank must be an int >= 1, got 0"),
        (lambda: FixedRank(2.0), "rank must be an int >= 1, got 2.0"),
        (lambda: ParamFraction(1.5), "fraction must be a fraction in .*got 1.5"),
        (lambda: Energy(0), "energy must be a fraction in .*got 0"),
        (lambda: Threshold(2.0), "relative threshold must be a fraction.*got 2.0"),
        (lambda: Threshold(-2.0, relative=False), "absolute threshold must be .*got -2.0"),
        (lambda: HeavyTail(-0.1), "threshold must be a fraction.*got -0.1"),
        (lambda: VBMF(min_rank=-1), "min_rank must be an int >= 0, got -1"),
        (lambda: VBMF(max_rank=0), "max_rank must be an int >= 1, got 0"),
        (lambda: StableRank(min_rank=4, max_rank=2), r"max_rank \(2\) must be >= min_rank \(4\)"),
    ],
)
def test_policies_reject_bad_parameters(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_choose_rejects_bad_input():
    with pytest.raises(ValueError, match="Energy picks a rank from singular values; got None"):
        Energy(0.9).choose(None, (4, 4))
    with pytest.raises(ValueError, match="a 2x8 matrix has at most 2 singular values, got 3"):
        StableRank().choose(torch.ones(3), (2, 8))
    with pytest.raises(ValueError, match="shape must be"):
        FixedRank(2).choose(None, (4, -1))
    with pytest.raises(ValueError, match="non-negative"):
        VBMF().choose(torch.tensor([1.0, -1.0]), (2, 8))


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("vbmf", VBMF()),
        ("stable", StableRank()),
        ("energy:0.9", Energy(0.9)),
        ("threshold:0.01", Threshold(0.01)),
        ("threshold-abs:0.5", Threshold(0.5, relative=False)),
        ("heavy-tail:0.1", HeavyTail(0.1)),
        ("heavy-tail", HeavyTail()),
        ("fixed:32", FixedRank(32)),
        ("fraction:0.5", ParamFraction(0.5)),
        ("  Energy:0.9 , max=64 ", Energy(0.9, max_rank=64)),
        ("vbmf,min=0,max=128", VBMF(min_rank=0, max_rank=128)),
        ("heavy_tail:0.2", HeavyTail(0.2)),
    ],
)
def test_policy_from_string(text, policy):
    parsed = policy_from_string(text)
    assert parsed == policy and type(parsed) is type(policy)
    assert policy_from_string(str(policy)) == policy  # str() writes the form back


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("svd", "unknown rank policy 'svd'; accepted forms: fixed:N"),
        ("", "unknown rank policy"),
        ("energy", r"'energy' needs a value \(energy:F\)"),
        ("vbmf:3", "'vbmf' takes no value"),
        ("fixed:3.5", "expected an int, got '3.5'"),
        ("energy:abc", "expected a number, got 'abc'"),
        ("fixed:0", "rank must be an int >= 1, got 0"),
        ("energy:2", "energy must be a fraction in .*got 2.0"),
        ("energy:0.9,mid=3", "unknown option 'mid=3'"),
        ("vbmf,max=x", "expected an int, got 'x'"),
        (32, "a rank policy must be a string"),
    ],
)
def test_policy_from_string_errors(text, words):
    with pytest.raises(ValueError, match=words) as info:
        policy_from_string(text)
    if "accepted forms" in words or "needs a value" in words:
        assert "vbmf" in str(info.value) and "heavy-tail" in str(info.value)


# ----------------------------------------------------------------------------- allocation


def _params(layer: LayerBudget, rank: int | None) -> int:
    return layer.dense_params if rank is None else layer.fixed_params + rank * layer.params_per_rank


def _dropped(layer: LayerBudget, rank: int | None) -> float:
    return 0.0 if rank is None else math.fsum(layer.scores.tolist()[rank:])


def _choices(layer: LayerBudget) -> list[int | None]:
    return [None, *range(1, layer.max_rank + 1)]


def _brute_force(layers: list[LayerBudget], budget: int) -> float:
    best = math.inf
    for ranks in itertools.product(*(_choices(layer) for layer in layers)):
        if sum(_params(layer, r) for layer, r in zip(layers, ranks)) <= budget:
            best = min(best, sum(_dropped(layer, r) for layer, r in zip(layers, ranks)))
    return best


def _check_allocation(layers: list[LayerBudget], budget: int, ranks: list[int | None]) -> float:
    assert len(ranks) == len(layers)
    for layer, rank in zip(layers, ranks):
        assert rank is None or (isinstance(rank, int) and 1 <= rank <= layer.max_rank)  # break-even holds
    assert sum(_params(layer, r) for layer, r in zip(layers, ranks)) <= budget
    return sum(_dropped(layer, r) for layer, r in zip(layers, ranks))


def test_allocation_by_hand():
    a = LayerBudget(torch.tensor([5.0, 3.0, 1.0]), params_per_rank=10, fixed_params=0, dense_params=40, max_rank=3)
    b = LayerBudget(torch.tensor([4.0, 2.0, 0.5]), params_per_rank=10, fixed_params=0, dense_params=40, max_rank=3)
    assert allocate_ranks([a, b], 20) == [1, 1]
    assert allocate_ranks([a, b], 39) == [2, 1]  # a's 3.0 before b's 2.0; 19 left is not 20
    assert allocate_ranks([a, b], 40) == [2, 2]
    assert allocate_ranks([a, b], 60) == [3, 3]  # rank 3 drops nothing and is cheaper than dense


def test_allocation_non_monotone_scores_use_the_envelope():
    # a's second component is worth little, its third a lot: two more ranks gain 10.1 / 2 per parameter,
    # more than any step of b; a component-by-component greedy would spend the budget on b
    a = LayerBudget(torch.tensor([5.0, 0.1, 10.0]), params_per_rank=1, fixed_params=0, dense_params=100, max_rank=3)
    b = LayerBudget(torch.tensor([5.0, 1.0, 0.5]), params_per_rank=1, fixed_params=0, dense_params=100, max_rank=3)
    assert allocate_ranks([a, b], 4) == [3, 1]


def test_allocation_switches_to_dense():
    # rank 1: 10 params drop 5; rank 2: 20 drop 4; dense: 25 drops nothing (the tail past max_rank)
    layer = LayerBudget(torch.tensor([5.0, 1.0, 4.0]), params_per_rank=10, fixed_params=0, dense_params=25, max_rank=2)
    assert allocate_ranks([layer], 25) == [None]
    assert allocate_ranks([layer], 24) == [2]  # dense does not fit; rank 2 still does
    assert allocate_ranks([layer], 19) == [1]
    # a layer that can only stay dense, and one where dense is the cheaper choice from the start
    only_dense = LayerBudget(torch.tensor([1.0]), params_per_rank=5, fixed_params=0, dense_params=7, max_rank=0)
    cheap_dense = LayerBudget(torch.tensor([1.0, 1.0]), params_per_rank=5, fixed_params=3, dense_params=6, max_rank=2)
    assert allocate_ranks([only_dense, cheap_dense, layer], 23) == [None, None, 1]


def test_allocation_rejects_a_budget_below_the_minimum():
    a = LayerBudget(torch.tensor([5.0, 3.0]), params_per_rank=10, fixed_params=2, dense_params=30, max_rank=2)
    b = LayerBudget(torch.tensor([1.0]), params_per_rank=4, fixed_params=0, dense_params=3, max_rank=1)
    c = LayerBudget(torch.tensor([1.0]), params_per_rank=4, fixed_params=0, dense_params=9, max_rank=0)
    assert minimum_budget([a, b, c]) == 12 + 3 + 9
    assert allocate_ranks([a, b, c], 24) == [1, None, None]
    with pytest.raises(ValueError, match="budget 23 is below the minimum achievable 24"):
        allocate_ranks([a, b, c], 23)
    assert allocate_ranks([], 0) == []


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: LayerBudget(torch.ones(2, 2), 1, 0, 4, 1), "scores must be a 1-D real tensor"),
        (lambda: LayerBudget(torch.tensor([1.0, float("nan")]), 1, 0, 4, 1), "scores must be finite"),
        (lambda: LayerBudget(torch.ones(2), 0, 0, 4, 1), "params_per_rank must be an int >= 1, got 0"),
        (lambda: LayerBudget(torch.ones(2), 1, -1, 4, 1), "fixed_params must be an int >= 0, got -1"),
        (lambda: LayerBudget(torch.ones(2), 1, 0, 4.5, 1), "dense_params must be an int >= 0, got 4.5"),
        (lambda: LayerBudget(torch.ones(2), 1, 0, 4, 3), r"max_rank \(3\) exceeds the number of scores \(2\)"),
        (lambda: allocate_ranks([LayerBudget(torch.ones(2), 1, 0, 4, 1)], -1), "budget must be an int >= 0"),
        (lambda: allocate_ranks([LayerBudget(torch.ones(2), 1, 0, 4, 1)], 2.5), "budget must be an int >= 0"),
        (lambda: allocate_ranks([(torch.ones(2), 1, 0, 4, 1)], 10), "layers must be LayerBudget instances"),
    ],
)
def test_allocation_rejects_bad_input(make, words):
    with pytest.raises(ValueError, match=words):
        make()


@st.composite
def layer_budgets(draw, equal_cost: bool = False):
    count = draw(st.integers(1, 4))
    p = draw(st.integers(1, 5))
    layers = []
    for _ in range(count):
        if equal_cost:
            # decreasing non-negative scores, no tail past max_rank, dense at or past break-even
            max_rank = draw(st.integers(1, 4))
            scores = sorted(draw(st.lists(st.floats(0, 10), min_size=max_rank, max_size=max_rank)), reverse=True)
            fixed = draw(st.integers(0, 3))
            dense = fixed + max_rank * p + draw(st.integers(0, 10))
            layers.append(LayerBudget(torch.tensor(scores, dtype=F64), p, fixed, dense, max_rank))
        else:
            max_rank = draw(st.integers(0, 4))
            length = max_rank + draw(st.integers(0 if max_rank else 1, 2))
            scores = draw(st.lists(st.floats(-2, 10), min_size=length, max_size=length))
            layers.append(
                LayerBudget(
                    torch.tensor(scores, dtype=F64),
                    draw(st.integers(1, 5)),
                    draw(st.integers(0, 3)),
                    draw(st.integers(0, 40)),
                    max_rank,
                )
            )
    low = minimum_budget(layers)
    high = sum(max(_params(layer, r) for r in _choices(layer)) for layer in layers)
    return layers, draw(st.integers(low, high + 3))


@settings(max_examples=300)
@given(layer_budgets())
def test_allocation_respects_budget_and_greedy_bound(instance):
    layers, budget = instance
    ranks = allocate_ranks(layers, budget)
    dropped = _check_allocation(layers, budget, ranks)
    optimum = _brute_force(layers, budget)
    assert dropped >= optimum - 1e-9
    # the greedy bound: at most the gain of one step along a layer's hull, itself at most
    # (dropped at the cheapest choice) - (least dropped) of that layer
    gaps = []
    for layer in layers:
        choices = _choices(layer)
        cheapest = min(_params(layer, r) for r in choices)
        start = min(_dropped(layer, r) for r in choices if _params(layer, r) == cheapest)
        gaps.append(start - min(_dropped(layer, r) for r in choices))
    assert dropped <= optimum + max(gaps) + 1e-9


@settings(max_examples=200)
@given(layer_budgets(equal_cost=True))
def test_allocation_is_optimal_with_equal_costs_and_decreasing_scores(instance):
    layers, budget = instance
    dropped = _check_allocation(layers, budget, allocate_ranks(layers, budget))
    assert dropped == pytest.approx(_brute_force(layers, budget), abs=1e-9)


@settings(max_examples=100)
@given(layer_budgets())
def test_allocation_with_room_for_everything_dense(instance):
    layers, _ = instance
    # with break-even respected (dense costs at least max_rank), a budget that fits every layer dense
    # leaves each layer dense or at a rank that drops no more than anything else could
    layers = [
        LayerBudget(x.scores, x.params_per_rank, x.fixed_params, max(x.dense_params, _params(x, x.max_rank)),
                    x.max_rank)
        for x in layers
    ]
    budget = sum(layer.dense_params for layer in layers)
    ranks = allocate_ranks(layers, budget)
    _check_allocation(layers, budget, ranks)
    for layer, rank in zip(layers, ranks):
        least = min(_dropped(layer, r) for r in _choices(layer))
        assert rank is None or _dropped(layer, rank) == pytest.approx(least, abs=1e-9)
        assert _dropped(layer, rank) == pytest.approx(least, abs=1e-9)


def test_allocation_scales_to_a_model():
    # 150 layers of up to 512 ranks with decaying, noisy scores: the budget is met and every layer valid
    gen = generator(11)
    layers = []
    for index in range(150):
        rows, cols = 256 + 2 * index, 512
        n = min(rows, cols)
        noise = 1 + 0.3 * torch.rand(n, generator=gen, dtype=F64)
        scores = torch.exp(-torch.arange(n, dtype=F64) / (20 + index)) * noise
        layers.append(LayerBudget(scores, rows + cols, rows, rows * cols + rows, rows * cols // (rows + cols)))
    budget = sum(layer.dense_params for layer in layers) // 3
    ranks = allocate_ranks(layers, budget)
    _check_allocation(layers, budget, ranks)
    # scores are positive, so every factorized layer below max_rank would gain from one more rank:
    # what is left of the budget cannot buy it
    left = budget - sum(_params(layer, r) for layer, r in zip(layers, ranks))
    for layer, rank in zip(layers, ranks):
        if rank is not None and rank < layer.max_rank:
            assert left < layer.params_per_rank
