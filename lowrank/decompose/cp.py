"""CP (CANDECOMP/PARAFAC) decomposition by alternating least squares."""

from __future__ import annotations

import math
from typing import Any

import torch

from lowrank.checks import check_choice, check_int, check_nonnegative, check_ranks, check_tol
from lowrank.decompose._inputs import checked_input, make_generator
from lowrank.decompose._linalg import leading_left_subspace, unfold
from lowrank.decompose.factorizations import CP


def _contract_rest(partial: torch.Tensor, factors: list[torch.Tensor], keep: int) -> torch.Tensor:
    """Contract ``partial`` (modes ``0..len-1`` then a rank axis) with every factor but ``keep``'s.

    Returns ``(dim_keep, rank)``: the matricised-tensor-times-Khatri-Rao product.
    """
    letters = "abcdefghijklmnopq"[: partial.ndim - 1]
    operands, specs = [partial], [letters + "z"]
    for mode, letter in enumerate(letters):
        if mode != keep:
            operands.append(factors[mode])
            specs.append(letter + "z")
    return torch.einsum(",".join(specs) + "->" + letters[keep] + "z", *operands)


def _solve_gram(mttkrp: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Least-squares factor update ``mttkrp @ pinv(gram)``, in float64."""
    pinv = torch.linalg.pinv(gram.double(), hermitian=True)
    return (mttkrp.double() @ pinv).to(mttkrp.dtype)


def _init_factors(x: torch.Tensor, rank: int, init: str, generator: torch.Generator) -> list[torch.Tensor]:
    """Initial factors: leading left singular vectors of each unfolding, or Gaussian."""
    factors = []
    for mode, dim in enumerate(x.shape):
        random = torch.randn(dim, rank, generator=generator, device=x.device, dtype=x.dtype)
        if init == "svd":
            k = min(rank, dim)
            random[:, :k] = leading_left_subspace(unfold(x, mode), k)
        factors.append(random)
    return factors


def cp(
    x: Any,
    rank: int,
    *,
    init: str = "svd",
    n_iter_max: int = 100,
    stop_tol: float = 1e-8,
    tol: float | None = None,
    normalize: bool = False,
    seed: int | None = 0,
) -> CP:
    """CP decomposition by alternating least squares (CP-ALS).

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        A tensor with at least two modes, any real floating dtype, any device.
    rank : int
        Number of rank-one components, at most ``x.numel() // max(x.shape)``.
    init : {"svd", "random"}
        Start from the leading left singular vectors of each unfolding (columns
        beyond a mode's size are Gaussian), or from Gaussian factors.
    n_iter_max : int
        Largest number of ALS sweeps.
    stop_tol : float
        Stop when the relative error changes by less than this between sweeps
        (tensorly's ``parafac`` criterion and default).
    tol : float, optional
        Also stop as soon as the relative error is at most ``tol``, in (0, 1).
    normalize : bool
        Return unit-norm factor columns with the scale in ``weights``; otherwise
        ``weights`` are ones.
    seed : int or None
        Seed of the Gaussian parts of the initialisation; None draws a fresh one.

    Returns
    -------
    CP
        Weights and factors in the input's dtype and device.

    Notes
    -----
    One sweep reads the tensor twice whatever its order: every factor but the
    last is updated from the tensor already contracted with the last factor.
    The error is tracked from the normal equations, without rebuilding the tensor.

    Examples
    --------
    >>> import torch, lowrank
    >>> a, b, c = (torch.randn(n, 3, dtype=torch.float64) for n in (10, 11, 12))
    >>> x = torch.einsum("ir,jr,kr->ijk", a, b, c)
    >>> lowrank.decompose.cp(x, 3, n_iter_max=500).relative_error(x) < 1e-6
    True

    """
    x, work, sq_norm, scale = checked_input(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 modes for a CP decomposition, got shape {tuple(x.shape)}")
    max_rank = x.numel() // max(x.shape)
    (rank,) = check_ranks(rank, [max_rank], what=[f"a tensor of shape {tuple(x.shape)}"])
    check_choice(init, ("svd", "random"), "init")
    n_iter_max = check_int(n_iter_max, "n_iter_max")
    stop_tol = check_nonnegative(stop_tol, "stop_tol")
    tol = check_tol(tol)

    factors = _init_factors(work, rank, init, make_generator(seed, x.device))
    last = x.ndim - 1
    previous = math.inf
    for _ in range(n_iter_max):
        grams = [f.T @ f for f in factors]
        along_last = (work.reshape(-1, x.shape[last]) @ factors[last]).reshape(*x.shape[:last], rank)
        for mode in range(last):
            others = math.prod(grams[m] for m in range(x.ndim) if m != mode)
            factors[mode] = _solve_gram(_contract_rest(along_last, factors, mode), others)
            grams[mode] = factors[mode].T @ factors[mode]
        first = (factors[0].T @ work.reshape(x.shape[0], -1)).reshape(rank, *x.shape[1:]).movedim(0, -1)
        mttkrp = _contract_rest(first, factors[1:], last - 1)
        factors[last] = _solve_gram(mttkrp, math.prod(grams[:last]))
        grams[last] = factors[last].T @ factors[last]
        inner = float(torch.sum(mttkrp * factors[last]))
        model_sq = float(torch.sum(math.prod(grams)))
        error = math.sqrt(max(sq_norm - 2 * inner + model_sq, 0.0) / sq_norm) if sq_norm > 0 else 0.0
        if (tol is not None and error <= tol) or abs(previous - error) < stop_tol:
            break
        previous = error

    weights = torch.full((rank,), scale, dtype=work.dtype, device=x.device)
    if normalize:
        norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
        weights = weights * math.prod(norms)
        factors = [f / torch.where(n > 0, n, torch.ones_like(n)) for f, n in zip(factors, norms)]
    return CP(weights.to(x.dtype), tuple(f.to(x.dtype) for f in factors))
