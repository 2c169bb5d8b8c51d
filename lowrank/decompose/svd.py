"""Truncated singular value decomposition: exact, Gram/eigh and randomized."""

from __future__ import annotations

from typing import Any

import torch

from lowrank.checks import check_choice, check_int, check_ranks, check_tol
from lowrank.decompose._inputs import check_ndim, checked_input, make_generator
from lowrank.decompose._linalg import leading_left_subspace, rank_for_tol, symmetric_eig_desc
from lowrank.decompose.factorizations import SVD

SVD_METHODS = ("auto", "exact", "gram", "randomized")


def choose_svd_method(shape: tuple[int, int], rank: int | None) -> str:
    """Pick the fastest accurate method for a matrix of ``shape`` truncated to ``rank``.

    Randomized when a known rank is small against a large matrix (its cost grows
    with the rank, the others' with the smaller side cubed); otherwise the Gram
    matrix of the smaller side, which on CPU is several times faster than LAPACK's
    SVD at every shape we measured (``benchmarks/decompose.py``).
    """
    small_side = min(shape)
    if rank is not None and small_side >= 1024 and rank <= small_side // 4:
        return "randomized"
    return "gram"


def _svd_from_left_basis(a: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the projection ``basis @ basis.T @ a`` when ``basis`` holds left singular vectors.

    The rows of ``basis.T @ a`` are orthogonal, so their norms are the singular
    values and the normalised rows the right singular vectors.
    """
    projected = basis.T @ a
    s = torch.linalg.vector_norm(projected, dim=1)
    order = torch.argsort(s, descending=True)
    s, basis, projected = s[order], basis[:, order], projected[order]
    vh = projected / torch.where(s > 0, s, torch.ones_like(s))[:, None]
    return basis, s, vh


def truncated_svd(
    a: torch.Tensor,
    rank: int,
    *,
    allowed_sq_error: float | None = None,
    method: str = "gram",
    n_oversamples: int = 10,
    n_iter: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(u, s, vh)`` of a checked matrix, without argument validation.

    ``rank`` is the rank to keep or, with ``allowed_sq_error``, the largest rank:
    then the smallest rank whose squared Frobenius error is at most
    ``allowed_sq_error`` is kept. ``method`` is ``"exact"``, ``"gram"`` or
    ``"randomized"`` (not with ``allowed_sq_error``).
    """
    if a.shape[0] > a.shape[1]:
        v, s, uh = truncated_svd(
            a.T, rank, allowed_sq_error=allowed_sq_error, method=method,
            n_oversamples=n_oversamples, n_iter=n_iter, generator=generator,
        )
        return uh.T, s, v.T
    if method == "exact":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        if allowed_sq_error is not None:
            total = float(torch.sum(s.double() ** 2))
            rank = min(rank, rank_for_tol(s**2, total, allowed_sq_error))
        return u[:, :rank], s[:rank], vh[:rank]
    if method == "randomized":
        basis = leading_left_subspace(
            a, rank, randomized=True, n_oversamples=n_oversamples, n_iter=n_iter, generator=generator
        )
        return _svd_from_left_basis(a, basis)
    # The leading subspace at a fixed rank needs no more precision than the Gram matrix
    # carries (it is formed in a's dtype); choosing a rank by tol needs accurate tail sums.
    evals, evecs = symmetric_eig_desc(a @ a.T, float64=allowed_sq_error is not None)
    if allowed_sq_error is not None:
        rank = min(rank, rank_for_tol(evals, float(evals.sum()), allowed_sq_error))
    return _svd_from_left_basis(a, evecs[:, :rank].to(a.dtype))


def svd(
    x: Any,
    rank: int | None = None,
    *,
    tol: float | None = None,
    method: str = "auto",
    n_oversamples: int = 10,
    n_iter: int = 4,
    seed: int | None = 0,
    clip: bool = False,
) -> SVD:
    """Truncated SVD of a matrix, by rank or by relative error.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        A matrix of any real floating dtype, on any device.
    rank : int, optional
        The number of singular triplets to keep, ``1 <= rank <= min(x.shape)``.
        With ``tol`` it caps the rank that ``tol`` chooses.
    tol : float, optional
        Keep the smallest rank whose relative Frobenius error
        ``||x - u diag(s) vh|| / ||x||`` is at most ``tol``, in (0, 1).
    method : {"auto", "exact", "gram", "randomized"}
        ``"exact"`` truncates ``torch.linalg.svd``; ``"gram"`` takes the
        eigenvectors of the smaller Gram matrix (``x @ x.T`` or ``x.T @ x``,
        decomposed in float64), fast for every shape and especially tall-skinny
        ones; ``"randomized"`` uses a seeded Gaussian range finder with
        ``n_iter`` power iterations and ``n_oversamples`` extra columns, fastest
        when ``rank`` is small against a large matrix. ``"auto"`` picks
        randomized for ``rank <= min(shape) / 4`` on matrices whose smaller side
        is at least 1024, and gram otherwise. ``tol`` needs the full spectrum,
        so it works with ``"exact"`` and ``"gram"`` only.
    n_oversamples, n_iter : int
        Oversampling and power iterations of the randomized method.
    seed : int or None
        Seed of the randomized method; None draws a fresh one.
    clip : bool
        Lower a ``rank`` above ``min(x.shape)`` to it instead of raising.

    Returns
    -------
    SVD
        ``u`` (m, r), ``s`` (r,), ``vh`` (r, n), in the input's dtype and device.

    Examples
    --------
    >>> import torch, lowrank
    >>> a = torch.randn(100, 20, dtype=torch.float64) @ torch.randn(20, 80, dtype=torch.float64)
    >>> f = lowrank.decompose.svd(a, rank=20)
    >>> f.relative_error(a) < 1e-10
    True

    """
    x, a, sq_norm, scale = checked_input(x)
    check_ndim(x, "x", exact=2)
    check_choice(method, SVD_METHODS, "method")
    tol = check_tol(tol)
    n_iter = check_int(n_iter, "n_iter", minimum=0)
    n_oversamples = check_int(n_oversamples, "n_oversamples", minimum=0)
    max_rank = min(x.shape)
    if rank is None and tol is None:
        raise ValueError("svd needs rank= (an int) or tol= (a relative error in (0, 1))")
    if rank is not None:
        (rank,) = check_ranks(rank, [max_rank], what=[f"a matrix of shape {tuple(x.shape)}"], clip=clip)
    if method == "auto":
        method = choose_svd_method(tuple(x.shape), None if tol is not None else rank)
    if tol is not None and method == "randomized":
        raise ValueError("tol= needs the full spectrum: use method='exact', 'gram' or 'auto', not 'randomized'")

    allowed = None
    if tol is not None:
        allowed = tol**2 * sq_norm
    u, s, vh = truncated_svd(
        a,
        rank if rank is not None else max_rank,
        allowed_sq_error=allowed,
        method=method,
        n_oversamples=n_oversamples,
        n_iter=n_iter,
        generator=make_generator(seed, x.device) if method == "randomized" else None,
    )
    return SVD(u.to(x.dtype), (s * scale).to(x.dtype), vh.to(x.dtype))
