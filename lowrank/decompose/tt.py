"""Tensor-train decomposition: TT-SVD, TT-rounding and the TT-matrix format."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lowrank.checks import check_ranks, check_tol
from lowrank.decompose._inputs import checked_input, make_generator
from lowrank.decompose._linalg import leading_left_subspace
from lowrank.decompose.factorizations import TT, TTMatrix
from lowrank.decompose.svd import truncated_svd


def tt_bounds(shape: Sequence[int]) -> list[int]:
    """Largest meaningful rank of each internal bond: the rank of the unfolding it cuts."""
    return [min(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))]


def _check_tt_ranks(
    rank: int | Sequence[int] | None, shape: Sequence[int], clip: bool, tol: float | None
) -> tuple[int, ...]:
    """Internal bond ranks (caps when ``tol`` is given) from an int or a sequence.

    A sequence may list the ``N - 1`` internal ranks or all ``N + 1`` with the
    boundary ones.
    """
    bounds = tt_bounds(shape)
    if rank is None:
        if tol is None:
            raise ValueError("needs rank= (an int or one int per bond) or tol= (a relative error in (0, 1))")
        return tuple(bounds)
    if isinstance(rank, Sequence) and len(rank) == len(shape) + 1:
        if rank[0] != 1 or rank[-1] != 1:
            raise ValueError(
                f"rank's boundary entries must be 1 when all {len(shape) + 1} are given, got {list(rank)!r}"
            )
        rank = rank[1:-1]
    what = [f"bond {k} (at most {b} for shape {tuple(shape)})" for k, b in enumerate(bounds, start=1)]
    return check_ranks(rank, bounds, what=what, clip=clip)


def _tt_svd(
    work: torch.Tensor, ranks: Sequence[int], allowed_sq_error: float | None, generator: torch.Generator
) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011): one truncated SVD per bond, left to right.

    With ``allowed_sq_error`` each bond may discard an equal share of it, which
    bounds the total squared error by it; ``ranks`` then cap the bonds. At fixed
    ranks only each unfolding's leading left subspace is needed, found from its
    Gram matrix or, when the rank is small against both sides, by a randomized
    range finder.
    """
    shape = work.shape
    share = allowed_sq_error / max(len(shape) - 1, 1) if allowed_sq_error is not None else None
    cores, remainder, r_left = [], work, 1
    for k, cap in enumerate(ranks):
        mat = remainder.reshape(r_left * shape[k], -1)
        cap = min(cap, *mat.shape)
        if share is None:
            randomized = 4 * (cap + 10) <= min(mat.shape)
            basis = leading_left_subspace(mat, cap, randomized=randomized, generator=generator)
            remainder = basis.T @ mat
        else:
            basis, s, vh = truncated_svd(mat, cap, allowed_sq_error=share)
            remainder = s[:, None] * vh
        cores.append(basis.reshape(r_left, shape[k], -1))
        r_left = basis.shape[1]
    cores.append(remainder.reshape(r_left, shape[-1], 1))
    return cores


def tt(
    x: Any,
    rank: int | Sequence[int] | None = None,
    *,
    tol: float | None = None,
    seed: int | None = 0,
    clip: bool = False,
) -> TT:
    """Tensor-train decomposition by TT-SVD.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        A tensor with at least two modes, any real floating dtype, any device.
    rank : int or sequence of int, optional
        The rank of every internal bond (an int), of each of the ``N - 1``
        internal bonds, or all ``N + 1`` ranks including the boundary ones.
        Bond ``k`` can be at most ``min(prod(shape[:k]), prod(shape[k:]))``.
        With ``tol`` the ranks are caps.
    tol : float, optional
        Relative error target in (0, 1); each bond discards an equal share of
        ``tol**2 * ||x||**2``, so the error is at most ``tol``.
    seed : int or None
        Seed of the randomized range finder used at fixed ranks where a rank is
        small against its unfolding; None draws a fresh one.
    clip : bool
        Lower ranks above their bound to it instead of raising.

    Returns
    -------
    TT
        Cores ``(r_k, n_k, r_{k+1})`` in the input's dtype and device.

    Examples
    --------
    >>> import torch, lowrank
    >>> x = torch.randn(4, 5, 6, 7)
    >>> lowrank.decompose.tt(x, rank=3).ranks
    (1, 3, 3, 3, 1)

    """
    x, work, sq_norm, scale = checked_input(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 modes for a tensor train, got shape {tuple(x.shape)}")
    tol = check_tol(tol)
    ranks = _check_tt_ranks(rank, x.shape, clip, tol)
    cores = _tt_svd(work, ranks, tol**2 * sq_norm if tol is not None else None, make_generator(seed, x.device))
    cores[-1] = cores[-1] * scale
    return TT(tuple(c.to(x.dtype) for c in cores))


def tt_round(
    train: TT, rank: int | Sequence[int] | None = None, *, tol: float | None = None, clip: bool = False
) -> TT:
    """Round a tensor train to lower ranks (Oseledets 2011, algorithm 2).

    The train is right-orthogonalised by QR, then truncated bond by bond from
    the left. The result's bonds are at most the given ranks and never above
    the input's.

    Parameters
    ----------
    train : TT
        The train to round.
    rank : int or sequence of int, optional
        Largest rank of every internal bond, or of each (as in :func:`tt`).
    tol : float, optional
        Relative error target in (0, 1), measured against the input train.
    clip : bool
        Lower ranks above their bound to it instead of raising.

    Returns
    -------
    TT
        The rounded train, in the input's dtype and device.

    """
    if not isinstance(train, TT):
        raise TypeError(f"train must be a lowrank TT, got {type(train).__name__}")
    tol = check_tol(tol)
    ranks = _check_tt_ranks(rank, train.shape, clip, tol)
    checked = [checked_input(core, f"train core {k}") for k, core in enumerate(train.cores)]
    cores = [c.work for c in checked]
    for k in range(len(cores) - 1, 0, -1):
        r_left, dim, r_right = cores[k].shape
        q, r = torch.linalg.qr(cores[k].reshape(r_left, -1).T)
        cores[k] = q.T.reshape(-1, dim, r_right)
        cores[k - 1] = torch.tensordot(cores[k - 1], r.T, dims=1)
    allowed = None
    if tol is not None:
        share = tol**2 * float(torch.sum(cores[0].double() ** 2)) / max(len(cores) - 1, 1)
        allowed = share
    for k in range(len(cores) - 1):
        r_left, dim, _ = cores[k].shape
        mat = cores[k].reshape(r_left * dim, -1)
        u, s, vh = truncated_svd(mat, min(ranks[k], *mat.shape), allowed_sq_error=allowed)
        cores[k] = u.reshape(r_left, dim, -1)
        cores[k + 1] = torch.tensordot(s[:, None] * vh, cores[k + 1], dims=1)
    cores[-1] = cores[-1] * math.prod(c.scale for c in checked)
    return TT(tuple(c.to(train.dtype) for c in cores))


def tt_matrix(
    matrix: Any,
    row_shape: Sequence[int],
    col_shape: Sequence[int],
    rank: int | Sequence[int] | None = None,
    *,
    tol: float | None = None,
    seed: int | None = 0,
    clip: bool = False,
) -> TTMatrix:
    """Decompose a matrix in the tensor-train matrix (TT-matrix, MPO) format.

    The matrix of shape ``(prod(row_shape), prod(col_shape))`` is viewed as a
    tensor ``(m_1, ..., m_d, n_1, ..., n_d)``, its modes paired as
    ``(m_1 n_1, ..., m_d n_d)`` and decomposed by TT-SVD (Novikov et al. 2015,
    "Tensorizing neural networks").

    Parameters
    ----------
    matrix : torch.Tensor or numpy.ndarray
        A 2-D tensor.
    row_shape, col_shape : sequence of int
        Factorisations of the row and column counts, of equal length ``d >= 2``.
    rank, tol, seed, clip
        As in :func:`tt`, for the ``d - 1`` bonds of the paired tensor.

    Returns
    -------
    TTMatrix
        Cores ``(r_k, m_k, n_k, r_{k+1})``.

    """
    matrix, work, sq_norm, scale = checked_input(matrix, "matrix")
    row_shape, col_shape = tuple(row_shape), tuple(col_shape)
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    if len(row_shape) != len(col_shape) or len(row_shape) < 2:
        raise ValueError(
            f"row_shape {row_shape} and col_shape {col_shape} must have the same length, at least 2"
        )
    if math.prod(row_shape) != matrix.shape[0] or math.prod(col_shape) != matrix.shape[1]:
        raise ValueError(
            f"row_shape {row_shape} and col_shape {col_shape} do not factor the matrix shape {tuple(matrix.shape)}"
        )
    d = len(row_shape)
    paired_shape = [m * n for m, n in zip(row_shape, col_shape)]
    paired = work.reshape(*row_shape, *col_shape)
    paired = paired.permute([i for k in range(d) for i in (k, d + k)]).reshape(paired_shape)
    tol = check_tol(tol)
    ranks = _check_tt_ranks(rank, paired_shape, clip, tol)
    allowed = tol**2 * sq_norm if tol is not None else None
    cores = _tt_svd(paired, ranks, allowed, make_generator(seed, matrix.device))
    cores[-1] = cores[-1] * scale
    cores = [c.reshape(c.shape[0], m, n, c.shape[-1]) for c, m, n in zip(cores, row_shape, col_shape)]
    return TTMatrix(tuple(c.to(matrix.dtype) for c in cores))
