"""Rank policies: a spectrum (and the matrix shape) in, a rank out.

Every rule exists twice: as a plain function (``energy_rank(s, 0.9)``) that
returns the rule's own answer, and as a small frozen dataclass
(``Energy(0.9)``) that :func:`lowrank.compress` accepts through ``rank=``.
A policy's :meth:`RankPolicy.choose` applies the rule and then clamps the
answer into ``[min_rank, min(max_rank, min(shape))]``.

All functions sort the spectrum themselves, compute in float64, and reject a
spectrum that is not a non-empty 1-D tensor of finite non-negative values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowrank.checks import check_fraction, check_int, check_nonnegative
from lowrank.rank.budget import budget_rank, fraction_budget
from lowrank.rank.vbmf import check_shape, check_spectrum, vbmf_rank

# WeLore's released code maps threshold 0.175 on the min-max normalised spectrum to a 50% overall
# rank reduction of LLaMA-2 7B (their table goes from 0.0225 for 10% to 0.26 for 70%).
DEFAULT_HEAVY_TAIL_THRESHOLD = 0.175


def _check_threshold(threshold: float, relative: bool) -> float:
    """A fraction in ``[0, 1]`` of the largest singular value (``relative``), or an absolute value ``>= 0``."""
    if relative:
        return check_fraction(threshold, "a relative threshold", low_closed=True)
    return check_nonnegative(threshold, "an absolute threshold")


# ----------------------------------------------------------------------------- rules as functions


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least ``energy`` of the total ``sum(s**2)``.

    Parameters
    ----------
    singular_values : torch.Tensor
        Singular values (any order; they are sorted).
    energy : float
        Fraction of the squared Frobenius norm to keep, in (0, 1].

    Returns
    -------
    int
        A rank in ``[1, len(singular_values)]``.

    Examples
    --------
    >>> import torch
    >>> energy_rank(torch.tensor([3.0, 2.0, 1.0]), 0.9)   # 9 + 4 = 13 of 14 is 0.93
    2

    """
    check_fraction(energy, "energy")
    s = check_spectrum(singular_values)
    top = float(s[0])
    if top == 0.0:
        return 1
    # Squared relative to the largest value, so that a huge spectrum does not overflow to inf and a tiny
    # one does not underflow to 0; the ratios, and so the rank, do not depend on the scale.
    kept = torch.cumsum((s / top) ** 2, 0)
    total = float(kept[-1])  # >= 1
    # a relative slack of 1e-12 so that energy=1.0 is met despite rounding in the cumulative sum
    meets = torch.nonzero(kept >= energy * total * (1 - 1e-12))
    return int(meets[0]) + 1


def threshold_rank(singular_values: torch.Tensor, threshold: float, *, relative: bool = True) -> int:
    """Number of singular values strictly above a threshold.

    Parameters
    ----------
    singular_values : torch.Tensor
        Singular values (any order).
    threshold : float
        With ``relative=True`` a fraction of the largest singular value, in
        ``[0, 1]``; otherwise an absolute value ``>= 0``.
    relative : bool
        Whether ``threshold`` is relative to ``max(singular_values)``.

    Returns
    -------
    int
        A rank in ``[0, len(singular_values)]``: 0 when nothing exceeds the
        threshold (an all-zero spectrum, or ``relative`` with threshold 1).

    Examples
    --------
    >>> import torch
    >>> threshold_rank(torch.tensor([10.0, 2.0, 1.0, 0.5]), 0.1)   # above 1.0: 10 and 2
    2
    >>> threshold_rank(torch.tensor([10.0, 2.0, 1.0, 0.5]), 0.75, relative=False)
    3

    """
    threshold = _check_threshold(threshold, relative)
    s = check_spectrum(singular_values)
    if not relative:
        return int((s > threshold).sum())
    top = float(s[0])
    if top == 0.0:
        return 0
    if threshold == 0.0:  # every non-zero value, however small next to the largest (s / top may underflow)
        return int((s > 0).sum())
    # Compared relative to the largest value: ``threshold * top`` would round to the coarse grid of
    # subnormal numbers for a tiny spectrum, and the ratios do not depend on the scale.
    return int((s / top > threshold).sum())


def stable_rank(singular_values: torch.Tensor) -> int:
    """The stable rank ``sum(s**2) / max(s)**2``, rounded up.

    Parameters
    ----------
    singular_values : torch.Tensor
        Singular values (any order).

    Returns
    -------
    int
        A rank in ``[1, len(singular_values)]``, or 0 for an all-zero spectrum.
        A relative slack of ``1e-12`` keeps a ratio that is an integer up to
        rounding from being rounded up past it.

    Examples
    --------
    >>> import torch
    >>> stable_rank(torch.tensor([2.0, 1.0, 1.0]))   # (4 + 1 + 1) / 4 = 1.5
    2

    """
    s = check_spectrum(singular_values)
    top = float(s[0])
    if top == 0.0:
        return 0
    # Divided by the largest value before squaring: ``top ** 2`` underflows to 0 below about 1e-154 and
    # overflows to inf above about 1e154.
    ratio = float(((s / top) ** 2).sum())
    return min(max(math.ceil(ratio * (1 - 1e-12)), 1), s.numel())


def heavy_tail_rank(singular_values: torch.Tensor, threshold: float = DEFAULT_HEAVY_TAIL_THRESHOLD) -> int:
    """WeLore's heavy-tail rule: keep the components whose min-max normalised value reaches ``threshold``.

    WeLore (Jaiswal et al. 2024, "From GaLore to WeLore: how low-rank weights
    non-uniformly emerge from low-rank gradients") normalises each matrix's
    singular values to ``(s - min(s)) / (max(s) - min(s))`` and prunes the
    components whose normalised value is below a threshold shared by all
    layers, so that matrices with a heavy-tailed spectrum lose more rank. As
    in their released code, the rank kept is the number of components with
    normalised value ``>= threshold``; ``min(s)`` is the smallest value
    *given* (pass the full spectrum).

    Parameters
    ----------
    singular_values : torch.Tensor
        Singular values (any order).
    threshold : float
        In ``[0, 1]``; the default 0.175 is the value WeLore's code uses for a
        50% rank reduction of LLaMA-2 7B.

    Returns
    -------
    int
        A rank in ``[1, len(singular_values)]`` (the largest value always
        survives), except: a constant non-zero spectrum keeps everything, an
        all-zero one gives 0.

    Examples
    --------
    >>> import torch
    >>> # normalised: 1, 0.5, 0.125, 0 -> two reach 0.2
    >>> heavy_tail_rank(torch.tensor([9.0, 5.0, 2.0, 1.0]), 0.2)
    2

    """
    threshold = check_fraction(threshold, "threshold", low_closed=True)
    s = check_spectrum(singular_values)
    top, bottom = float(s[0]), float(s[-1])
    if top == bottom:
        return s.numel() if top > 0 else 0
    normalised = (s - bottom) / (top - bottom)
    return int((normalised >= threshold).sum())


def param_fraction_rank(shape: Sequence[int], fraction: float) -> int:
    """Largest rank ``r`` whose factors fit a fraction of the matrix: ``r (rows + cols) <= fraction rows cols``.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)`` of the matrix.
    fraction : float
        Fraction of the ``rows * cols`` parameters the factors may use, in (0, 1].

    Returns
    -------
    int
        A rank in ``[0, min(shape)]``; 0 when not even rank 1 fits. The
        arithmetic is :func:`lowrank.rank.budget.budget_rank`'s, the rounding
        of ``fraction`` forgiven (:func:`lowrank.rank.budget.fraction_budget`).

    Examples
    --------
    >>> param_fraction_rank((64, 32), 0.5)   # r * 96 <= 1024
    10

    """
    fraction = check_fraction(fraction, "fraction")
    rows, cols = check_shape(shape)
    return budget_rank(fraction_budget(fraction, rows * cols), rows + cols, max_rank=min(rows, cols))


# ----------------------------------------------------------------------------- rules as policies


@dataclass(frozen=True)
class RankPolicy:
    """Base of the rank policies: the rule of a subclass, then a clamp.

    Attributes
    ----------
    min_rank : int
        The smallest rank returned (keyword only; default 1). 0 lets a rule
        such as :class:`VBMF` say "nothing worth keeping".
    max_rank : int or None
        The largest rank returned (keyword only); ``min(shape)`` always caps it.
    needs_spectrum : bool
        Class attribute: whether :meth:`choose` reads the singular values
        (``False`` lets a caller skip the SVD and pass ``None``).

    """

    min_rank: int = field(default=1, kw_only=True)
    max_rank: int | None = field(default=None, kw_only=True)

    needs_spectrum: ClassVar[bool] = True
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self._store("min_rank", check_int(self.min_rank, "min_rank", minimum=0))
        if self.max_rank is not None:
            self._store("max_rank", check_int(self.max_rank, "max_rank"))
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise ValueError(f"max_rank ({self.max_rank}) must be >= min_rank ({self.min_rank})")

    def _store(self, name: str, value: object) -> None:
        """Keep a checked field as its plain Python value (a NumPy scalar becomes an int or float)."""
        object.__setattr__(self, name, value)

    def rule(self, singular_values: torch.Tensor | None, shape: tuple[int, int]) -> int:
        """The rule's own rank, before clamping (implemented by each policy)."""
        raise NotImplementedError

    def choose(self, singular_values: torch.Tensor | None, shape: Sequence[int]) -> int:
        """The rank for a matrix of ``shape`` with these singular values.

        Parameters
        ----------
        singular_values : torch.Tensor or None
            The matrix's singular values, any order (``None`` is accepted when
            the policy's ``needs_spectrum`` is False).
        shape : tuple of int
            ``(rows, cols)`` of the matrix (for a Tucker-2 mode, of that mode's
            unfolding).

        Returns
        -------
        int
            The rule's rank clamped to ``[min_rank, min(max_rank, min(shape))]``;
            where ``min_rank`` exceeds the upper end, the upper end wins.

        """
        if singular_values is None and self.needs_spectrum:
            raise ValueError(f"{type(self).__name__} picks a rank from singular values; got None")
        length = None if singular_values is None else torch.as_tensor(singular_values).numel()
        rows, cols = check_shape(shape, length)
        return self.clamp(self.rule(singular_values, (rows, cols)), min(rows, cols))

    def clamp(self, rank: int, upper: int | None = None) -> int:
        """``rank`` clamped to ``[min_rank, min(max_rank, upper)]``; the upper end wins over ``min_rank``.

        Examples
        --------
        >>> Energy(0.9, min_rank=2, max_rank=8).clamp(20), Energy(0.9, min_rank=2).clamp(0), FixedRank(4).clamp(9, 3)
        (8, 2, 3)

        """
        bounds = [bound for bound in (self.max_rank, upper) if bound is not None]
        rank = max(rank, self.min_rank)
        return min(rank, *bounds) if bounds else rank

    def _argument(self) -> str | None:
        """The value after ``name:`` in :meth:`__str__` (None for none)."""
        return None

    def __str__(self) -> str:
        """The policy in the form :func:`policy_from_string` reads, e.g. ``"energy:0.9,max=64"``."""
        text = self.name
        argument = self._argument()
        if argument is not None:
            text += f":{argument}"
        if self.min_rank != 1:
            text += f",min={self.min_rank}"
        if self.max_rank is not None:
            text += f",max={self.max_rank}"
        return text


@dataclass(frozen=True)
class FixedRank(RankPolicy):
    """The same rank for every matrix (capped by its shape and ``max_rank``)."""

    rank: int

    needs_spectrum: ClassVar[bool] = False
    name: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store("rank", check_int(self.rank, "rank"))

    def rule(self, singular_values: torch.Tensor | None, shape: tuple[int, int]) -> int:
        """``rank``."""
        return self.rank

    def _argument(self) -> str:
        return str(self.rank)


@dataclass(frozen=True)
class ParamFraction(RankPolicy):
    """The largest rank whose factors fit ``fraction`` of the dense parameters.

    On a matrix (:meth:`choose`), the matrix's own parameters
    (:func:`param_fraction_rank`); applied to a layer (``compress(rank=...)``,
    :meth:`lowrank.nn.Method.choose_rank`), the layer's, bias included: the
    largest rank whose factorized module, factors and bias, fits ``fraction``
    of the dense layer, which is what ``compress(ratio=fraction)`` gives.
    """

    fraction: float

    needs_spectrum: ClassVar[bool] = False
    name: ClassVar[str] = "fraction"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store("fraction", check_fraction(self.fraction, "fraction"))

    def rule(self, singular_values: torch.Tensor | None, shape: tuple[int, int]) -> int:
        """:func:`param_fraction_rank` of ``shape``."""
        return param_fraction_rank(shape, self.fraction)

    def _argument(self) -> str:
        return repr(self.fraction)


@dataclass(frozen=True)
class Energy(RankPolicy):
    """The smallest rank keeping ``energy`` of ``sum(s**2)`` (:func:`energy_rank`)."""

    energy: float

    name: ClassVar[str] = "energy"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store("energy", check_fraction(self.energy, "energy"))

    def rule(self, singular_values: torch.Tensor | None, shape: tuple[int, int]) -> int:
        """:func:`energy_rank` of the spectrum."""
        return energy_rank(singular_values, self.energy)

    def _argument(self) -> str:
        return repr(self.energy)


@dataclass(frozen=True)
class Threshold(RankPolicy):
    """The number of singular values above ``threshold`` (relative to the largest by default).

    See :func:`threshold_rank`.
    """

    threshold: float
    relative: bool = True

    name: ClassVar[str] = "threshold"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.relative, bool):
            raise ValueError(f"relative must be a bool, got {self.relative!r}")
        self._store("threshold", _check_threshold(self.threshold, self.relative))

    def rule(self, singular_values: torch.Tensor | None, shape: tuple[int, int]) -> int:
        """:func:`threshold_rank` of the spectrum."""
        return threshold_rank(singular_values, self.threshold, relative=self.relative)

    def _argument(self) -> str:
        return repr(self.threshold)

    def __str__(self) -> str:
        """``threshold:T`` (relative) or ``threshold-abs:T`` (absolute), plus any clamps."""
        text = super().__str__()
        return text if self.relative else "threshold-abs" + text.removeprefix("threshold")


@dataclass(frozen=True)
class StableRank(RankPolicy):
    """The stable rank ``ceil(sum(s**2) / max(s)**2)`` (:func:`stable_rank`)."""

    name: ClassVar[str] = "stable"

    def rule(self, singular_values: torch.Tensor | None, shape: tuple[int, int]) -> int:
        """:func:`stable_rank` of the spectrum."""
        return stable_rank(singular_values)


@dataclass(frozen=True)
class VBMF(RankPolicy):
    """The rank empirical variational Bayes matrix factorization keeps (:func:`lowrank.rank.vbmf_rank`).

    VBMF may find nothing but noise (rank 0); ``min_rank`` (default 1) then
    decides. Set ``min_rank=0`` to let the caller skip such a layer.
    """

    name: ClassVar[str] = "vbmf"

    def rule(self, singular_values: torch.Tensor | None, shape: tuple[int, int]) -> int:
        """:func:`lowrank.rank.vbmf_rank` of the spectrum and shape."""
        return vbmf_rank(singular_values, shape)


@dataclass(frozen=True)
class HeavyTail(RankPolicy):
    """WeLore's heavy-tail rule on the min-max normalised spectrum (:func:`heavy_tail_rank`)."""

    threshold: float = DEFAULT_HEAVY_TAIL_THRESHOLD

    name: ClassVar[str] = "heavy-tail"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store("threshold", check_fraction(self.threshold, "threshold", low_closed=True))

    def rule(self, singular_values: torch.Tensor | None, shape: tuple[int, int]) -> int:
        """:func:`heavy_tail_rank` of the spectrum."""
        return heavy_tail_rank(singular_values, self.threshold)

    def _argument(self) -> str:
        return repr(self.threshold)


# ----------------------------------------------------------------------------- from the command line

# name -> (policy class, how the argument reads: None (no argument), "int", "float" or "optional float")
_FORMS: dict[str, tuple[type[RankPolicy], str | None]] = {
    "fixed": (FixedRank, "int"),
    "fraction": (ParamFraction, "float"),
    "energy": (Energy, "float"),
    "threshold": (Threshold, "float"),
    "threshold-abs": (Threshold, "float"),
    "stable": (StableRank, None),
    "vbmf": (VBMF, None),
    "heavy-tail": (HeavyTail, "optional float"),
}
ACCEPTED_FORMS = (
    "fixed:N, fraction:F, energy:F, threshold:F (relative to the largest singular value), threshold-abs:T, "
    "stable, vbmf, heavy-tail or heavy-tail:F; optionally followed by ,min=N and/or ,max=N"
)


def policy_from_string(text: str) -> RankPolicy:
    """Parse a rank policy written as on the command line.

    Parameters
    ----------
    text : str
        ``NAME[:VALUE][,min=N][,max=N]`` with NAME one of ``fixed`` (VALUE an
        int), ``fraction``, ``energy``, ``threshold``, ``threshold-abs``
        (VALUE a float), ``stable``, ``vbmf`` (no VALUE) or ``heavy-tail``
        (optional VALUE). Case and surrounding spaces are ignored, and ``_``
        may stand for ``-``. ``str(policy)`` writes this form back.

    Returns
    -------
    RankPolicy
        The policy.

    Raises
    ------
    ValueError
        If the text is not one of the accepted forms (the message lists
        them), or a value is out of range.

    Examples
    --------
    >>> policy_from_string("energy:0.9")
    Energy(min_rank=1, max_rank=None, energy=0.9)
    >>> policy_from_string("vbmf,min=0,max=128")
    VBMF(min_rank=0, max_rank=128)

    """
    if not isinstance(text, str):
        raise ValueError(f"a rank policy must be a string of the form {ACCEPTED_FORMS}; got {text!r}")
    head, *options = [part.strip() for part in text.strip().lower().replace("_", "-").split(",")]
    name, _, argument = (part.strip() for part in head.partition(":"))
    if name not in _FORMS:
        raise ValueError(f"unknown rank policy {text!r}; accepted forms: {ACCEPTED_FORMS}")
    cls, kind = _FORMS[name]
    if (kind is None and argument) or (kind in ("int", "float") and not argument):
        wanted = "takes no value" if kind is None else f"needs a value ({name}:{'N' if kind == 'int' else 'F'})"
        raise ValueError(f"rank policy {name!r} {wanted}; got {text!r}; accepted forms: {ACCEPTED_FORMS}")
    kwargs: dict[str, object] = {}
    for option in options:
        key, _, value = (part.strip() for part in option.partition("="))
        if key not in ("min", "max") or not value:
            raise ValueError(f"unknown option {option!r} in rank policy {text!r}; accepted forms: {ACCEPTED_FORMS}")
        kwargs[f"{key}_rank"] = _parse_number(value, int, text)
    args: list[object] = []
    if argument:
        args.append(_parse_number(argument, int if kind == "int" else float, text))
    if name == "threshold-abs":
        kwargs["relative"] = False
    return cls(*args, **kwargs)


def _parse_number(value: str, kind: type, text: str) -> int | float:
    try:
        return kind(value)
    except ValueError:
        what = "an int" if kind is int else "a number"
        raise ValueError(f"expected {what}, got {value!r} in rank policy {text!r}") from None

