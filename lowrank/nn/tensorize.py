"""Tensorised linear weights: an ``(out, in)`` matrix viewed as a tensor with paired output and input modes.

A tensor-train or tensor-network layer factors ``out_features = m_1 ... m_d``
and ``in_features = n_1 ... n_d`` and holds the weight as a ``d``-way tensor
whose mode ``k`` has size ``m_k * n_k``; this module chooses and checks those
factorisations and rearranges the weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lowrank.checks import check_int


def balanced_factorization(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` integer factors that are as equal as possible.

    Among all ways of writing ``n`` as a product of ``d`` positive integers,
    the one with the smallest largest factor is returned (ties broken by the
    second largest, and so on), sorted in increasing order. A prime ``n`` can
    only be split as ``(1, ..., 1, n)``.

    Parameters
    ----------
    n : int
        The number to factor, at least 1.
    d : int
        The number of factors, at least 1.

    Returns
    -------
    tuple of int
        ``d`` factors in increasing order whose product is ``n``.

    Examples
    --------
    >>> balanced_factorization(1024, 5)
    (4, 4, 4, 4, 4)
    >>> balanced_factorization(768, 3), balanced_factorization(3072, 3)
    ((8, 8, 12), (12, 16, 16))

    """
    check_int(n, "n")
    check_int(d, "d")
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    divisors = sorted(set(small + [n // k for k in small]))
    best: tuple[int, ...] | None = None

    def search(rest: int, count: int, low: int, prefix: tuple[int, ...]) -> None:
        # Non-decreasing factors only, so that each split is visited once.
        nonlocal best
        if count == 1:
            candidate = (*prefix, rest)
            if rest >= low and (best is None or candidate[::-1] < best[::-1]):
                best = candidate
            return
        for factor in divisors:
            if factor**count > rest:
                break
            if factor >= low and rest % factor == 0:
                search(rest // factor, count - 1, factor, (*prefix, factor))

    search(n, d, 1, ())
    return best


def factor_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    """A tuple of at least two positive ints, or a ``ValueError`` naming ``name`` and the value."""
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, Sequence)
        or len(shape) < 2
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)
    ):
        raise ValueError(f"{name} must be a sequence of at least 2 integers >= 1, got {shape!r}")
    return tuple(shape)


def tensorized_shapes(
    weight_shape: tuple[int, int], out_shape: Sequence[int] | None, in_shape: Sequence[int] | None, d: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``(out_shape, in_shape)`` of a ``(out_features, in_features)`` weight, balanced where not given.

    A missing shape is :func:`balanced_factorization` of the features into
    ``d`` factors (``d`` defaults to the given shape's length, else 3).
    """
    given = [len(shape) for shape in (out_shape, in_shape) if shape is not None]
    if d is None:
        d = given[0] if given else 3
    if any(length != d for length in given):
        raise ValueError(f"out_shape {out_shape} and in_shape {in_shape} must both have d={d} factors")
    shapes = []
    for name, shape, features in zip(("out_shape", "in_shape"), (out_shape, in_shape), weight_shape):
        shape = balanced_factorization(features, d) if shape is None else factor_shape(shape, name)
        if math.prod(shape) != features:
            raise ValueError(
                f"{name} {shape} multiplies to {math.prod(shape)}, not to the layer's "
                f"{name.removesuffix('_shape')}_features={features}"
            )
        shapes.append(shape)
    return shapes[0], shapes[1]


def paired_sizes(out_shape: Sequence[int], in_shape: Sequence[int]) -> list[int]:
    """The mode sizes ``m_k * n_k`` of a weight tensorised with ``out_shape`` and ``in_shape``."""
    return [m * n for m, n in zip(out_shape, in_shape)]


def tensorize_weight(weight: torch.Tensor, out_shape: Sequence[int], in_shape: Sequence[int]) -> torch.Tensor:
    """An ``(out, in)`` weight as a ``d``-way tensor whose mode ``k`` pairs ``out_shape[k]`` with ``in_shape[k]``.

    Mode ``k`` has size ``out_shape[k] * in_shape[k]`` and its index is
    ``o_k * in_shape[k] + i_k`` (the layout of a TT-matrix core).
    """
    d = len(out_shape)
    tensor = weight.reshape(*out_shape, *in_shape)
    tensor = tensor.permute([p for k in range(d) for p in (k, d + k)])
    return tensor.reshape(paired_sizes(out_shape, in_shape))
