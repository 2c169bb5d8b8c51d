"""The adapter configs: :class:`LoRA` and :class:`FLoRA`, small frozen dataclasses checked once, on creation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lowrank.checks import check_bool, check_choice, check_fraction, check_int, check_positive, is_int

LORA_INITS = ("default", "gaussian", "pissa")


def _check_dropout(value: float, name: str) -> float:
    """A dropout probability in ``[0, 1)``."""
    return check_fraction(value, name, low_closed=True, high_closed=False)


@dataclass(frozen=True)
class LoRA:
    """Low-rank adaptation (Hu et al., 2021): ``W + s · B A`` with ``A`` ``(rank, in)`` and ``B`` ``(out, rank)``.

    Attributes
    ----------
    rank : int
        The rank ``r`` of the update (for a grouped convolution, per group).
        At most the adapted layer's rank (``min(out, in)`` for a matrix).
    alpha : float
        The scale numerator: the update is scaled by ``alpha / rank``
        (``alpha / sqrt(rank)`` with ``rslora``), PEFT's ``lora_alpha``.
    dropout : float
        Dropout probability, in ``[0, 1)``, on the adapter's input (PEFT's
        ``lora_dropout``).
    init : {"default", "gaussian", "pissa"}
        ``"default"``: PEFT's, ``A`` Kaiming-uniform (``a = sqrt(5)``) and
        ``B`` zero (for embeddings ``A`` zero and ``B`` standard normal);
        ``"gaussian"``: ``A`` normal with standard deviation ``1 / rank`` and
        ``B`` zero (embeddings as the default, as in PEFT); ``"pissa"``
        (Meng et al., 2024): ``A`` and ``B`` from the top-``rank`` singular
        triplets of the weight, ``sqrt(S)`` split between them, and the
        residual written into the frozen weight, so the model starts
        unchanged (dense layers only).
    rslora : bool
        Scale by ``alpha / sqrt(rank)`` (rank-stabilized LoRA, Kalajdzievski 2023).

    Examples
    --------
    >>> config = LoRA(rank=8, alpha=16)
    >>> config.scaling, LoRA(rank=16, alpha=8, rslora=True).scaling
    (2.0, 2.0)

    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    init: str = "default"
    rslora: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", check_int(self.rank, "LoRA.rank"))
        object.__setattr__(self, "alpha", check_positive(self.alpha, "LoRA.alpha"))
        object.__setattr__(self, "dropout", _check_dropout(self.dropout, "LoRA.dropout"))
        check_choice(self.init, LORA_INITS, "LoRA.init")
        object.__setattr__(self, "rslora", check_bool(self.rslora, "LoRA.rslora"))

    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with ``rslora``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data, with ``"type": "LoRA"``."""
        return {"type": "LoRA", "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "init": self.init, "rslora": self.rslora}


@dataclass(frozen=True)
class FLoRA:
    """FLoRA (Si et al., 2024): ``W + s · G ×₁ A₁ ×₂ A₂ …``, a Tucker update over the weight's own modes.

    The modes are those of the weight: ``(out, in)`` for a linear layer (a
    ``rank × rank`` core), ``(out, in / groups, k₁, k₂, …)`` for a
    convolution, so a kernel keeps its N-D structure. The core ``G`` starts
    at zero (the model starts unchanged) and the factors ``A_i`` ``(n_i, r_i)``
    with random orthonormal columns (then ``||ΔW|| = s ||G||``).

    Attributes
    ----------
    rank : int or tuple of int
        One rank for every mode (lowered to each mode's size, so that a
        ``3 × 3`` kernel keeps full spatial rank), or one rank per mode of the
        weights adapted (each at most its mode's size; a layer with another
        number of modes is refused).
    alpha : float
        The scale numerator: the update is scaled by ``alpha / rank`` (for
        per-mode ranks, by ``alpha`` over the largest of them).
    dropout : float
        Dropout probability, in ``[0, 1)``, on the adapter's input.

    Examples
    --------
    >>> FLoRA(rank=4).scaling, FLoRA(rank=(8, 4, 3, 3), alpha=16).scaling
    (2.0, 2.0)

    """

    rank: int | tuple[int, ...] = 8
    alpha: float = 8.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        rank = self.rank
        if is_int(rank):
            rank = check_int(rank, "FLoRA.rank")
        elif isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)) and len(rank) >= 2:
            rank = tuple(check_int(r, f"FLoRA.rank[{i}]") for i, r in enumerate(rank))
        else:
            raise ValueError(f"FLoRA.rank must be an int or one int per weight mode (at least 2), got {rank!r}")
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "alpha", check_positive(self.alpha, "FLoRA.alpha"))
        object.__setattr__(self, "dropout", _check_dropout(self.dropout, "FLoRA.dropout"))

    @property
    def scaling(self) -> float:
        """``alpha / rank`` (``alpha / max(rank)`` for per-mode ranks)."""
        return self.alpha / (self.rank if isinstance(self.rank, int) else max(self.rank))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data, with ``"type": "FLoRA"``."""
        rank = self.rank if isinstance(self.rank, int) else list(self.rank)
        return {"type": "FLoRA", "rank": rank, "alpha": self.alpha, "dropout": self.dropout}


AdapterConfig = LoRA | FLoRA
