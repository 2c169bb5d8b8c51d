"""Dense linear-algebra kernels shared by the decompositions.

The helpers work on views wherever they can: a mode product reshapes the
tensor to ``(before, dim, after)`` and multiplies, instead of moving the mode
to the front with a copy as a plain unfolding would.
"""

from __future__ import annotations

import math

import torch

_NORM_BLOCK = 4096


def squared_norm(x: torch.Tensor) -> float:
    """Return ``||x||_F ** 2`` accurately in one pass.

    A single float32 reduction over millions of entries loses about four digits;
    summing squared norms of 4096-entry blocks in float64 keeps them, at the
    cost of one read of the data.
    """
    flat = x.reshape(-1)
    head = flat.numel() - flat.numel() % _NORM_BLOCK
    blocks = torch.linalg.vector_norm(flat[:head].view(-1, _NORM_BLOCK), dim=1).double()
    tail = torch.linalg.vector_norm(flat[head:]).double()
    return float(torch.sum(blocks**2) + tail**2)


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Return the mode-``mode`` unfolding, shape ``(x.shape[mode], -1)``."""
    return torch.movedim(x, mode, 0).reshape(x.shape[mode], -1)


def mode_product(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """Multiply ``x`` along ``mode`` by ``matrix`` of shape ``(new_dim, x.shape[mode])``.

    ``out[..., i, ...] = sum_j matrix[i, j] * x[..., j, ...]`` (tensorly's ``mode_dot``).
    """
    shape = x.shape
    before, dim, after = math.prod(shape[:mode]), shape[mode], math.prod(shape[mode + 1 :])
    new_dim = matrix.shape[0]
    if after == 1:
        out = x.reshape(before, dim) @ matrix.T
    elif before == 1:
        out = matrix @ x.reshape(dim, after)
    elif after >= dim:
        out = torch.matmul(matrix, x.reshape(before, dim, after))
    else:
        # Many thin products are slow: move the mode last and do one GEMM instead.
        moved = x.reshape(before, dim, after).transpose(1, 2).reshape(-1, dim)
        out = (moved @ matrix.T).reshape(before, after, new_dim).transpose(1, 2)
    return out.reshape(*shape[:mode], new_dim, *shape[mode + 1 :])


def mode_gram(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Return ``unfold(x, mode) @ unfold(x, mode).T`` without forming the unfolding."""
    shape = x.shape
    before, dim, after = math.prod(shape[:mode]), shape[mode], math.prod(shape[mode + 1 :])
    if before == 1:
        mat = x.reshape(dim, after)
        return mat @ mat.T
    if after == 1:
        mat = x.reshape(before, dim)
        return mat.T @ mat
    blocks = x.reshape(before, dim, after)
    return torch.einsum("bia,bja->ij", blocks, blocks)


def symmetric_eig_desc(gram: torch.Tensor, *, float64: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix, largest first.

    In float64 by default, as the eigenvalues' tail sums choose ranks; a caller
    that needs only a well-separated leading subspace may keep the Gram
    matrix's own dtype (``float64=False``), about twice as fast.
    Returns the eigenvalues clamped at zero and the eigenvectors.
    """
    evals, evecs = torch.linalg.eigh(gram.to(torch.float64) if float64 else gram)
    return evals.flip(0).clamp_min(0.0), evecs.flip(1)


def rank_for_tol(sq_singular_values: torch.Tensor, total_sq_norm: float, allowed_sq_error: float) -> int:
    """Smallest rank whose discarded energy is at most ``allowed_sq_error``.

    Parameters
    ----------
    sq_singular_values : torch.Tensor
        Squared singular values in decreasing order.
    total_sq_norm : float
        Squared Frobenius norm of the matrix (the sum of all squared singular values).
    allowed_sq_error : float
        The largest squared Frobenius error to accept.

    """
    kept = torch.cumsum(sq_singular_values.to(torch.float64), 0)
    tail = total_sq_norm - kept
    meets = torch.nonzero(tail <= allowed_sq_error)
    rank = int(meets[0]) + 1 if meets.numel() else sq_singular_values.shape[0]
    return max(rank, 1)


def randomized_range(
    mat: torch.Tensor, size: int, n_iter: int, generator: torch.Generator
) -> torch.Tensor:
    """Orthonormal basis of ``size`` columns approximating the range of ``mat``.

    Gaussian range finder with ``n_iter`` power iterations, re-orthonormalised
    after every product (Halko, Martinsson and Tropp 2011, algorithm 4.4).
    """
    omega = torch.randn(mat.shape[1], size, generator=generator, device=mat.device, dtype=mat.dtype)
    basis = torch.linalg.qr(mat @ omega).Q
    for _ in range(n_iter):
        basis = torch.linalg.qr(mat.T @ basis).Q
        basis = torch.linalg.qr(mat @ basis).Q
    return basis


def leading_left_subspace(
    mat: torch.Tensor,
    rank: int,
    *,
    randomized: bool = False,
    n_oversamples: int = 10,
    n_iter: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``rank`` orthonormal columns spanning the leading left singular subspace of ``mat``.

    By default the eigenvectors of the smaller Gram matrix (accumulated in the
    matrix's dtype, decomposed in float64). With ``randomized`` a range finder
    of ``rank + n_oversamples`` columns is compressed to ``rank`` columns
    instead, which is cheaper when ``rank`` is small against both sides.
    """
    rows, cols = mat.shape
    if randomized and rank + n_oversamples < min(rows, cols):
        basis = randomized_range(mat, rank + n_oversamples, n_iter, generator)
        return basis @ leading_left_subspace(basis.T @ mat, rank)
    if rows <= cols:
        _, evecs = symmetric_eig_desc(mat @ mat.T)
        return evecs[:, :rank].to(mat.dtype)
    _, evecs = symmetric_eig_desc(mat.T @ mat)
    return torch.linalg.qr(mat @ evecs[:, :rank].to(mat.dtype)).Q
