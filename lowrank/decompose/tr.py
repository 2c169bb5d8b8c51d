"""Tensor-ring decomposition: TR-SVD, refined by alternating least squares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lowrank.checks import check_choice, check_int, check_nonnegative, check_ranks
from lowrank.decompose._inputs import checked_input, make_generator
from lowrank.decompose.factorizations import TR, contract_chain
from lowrank.decompose.svd import truncated_svd

TR_METHODS = ("als", "svd")


def _padded(mat: torch.Tensor, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """``mat`` grown to ``(rows, cols)`` with small Gaussian entries, so that ALS can use them."""
    if mat.shape == (rows, cols):
        return mat
    scale = 1e-3 * float(mat.abs().max()) if mat.numel() else 1e-3
    out = scale * torch.randn(rows, cols, generator=generator, device=mat.device, dtype=mat.dtype)
    out[: mat.shape[0], : mat.shape[1]] = mat
    return out


def _tr_svd(
    work: torch.Tensor, ranks: tuple[int, ...], generator: torch.Generator, regauge: bool = False
) -> list[torch.Tensor]:
    """TR-SVD (Zhao et al. 2016, algorithm 1) at fixed ranks.

    The first unfolding is truncated to ``r_0 * r_1`` and split into the first
    core and the two closing bonds; the rest is a tensor train whose last mode
    carries ``r_0``. Where an unfolding has fewer singular values than the rank
    asked for, the missing slices are small random ones.

    How the ``r_0 * r_1`` leading singular vectors are split between the two
    bonds is arbitrary, and ALS started from some splits stalls in a poor local
    minimum; ``regauge`` rotates them by a random orthogonal matrix first, which
    gives ALS a different start.
    """
    shape, n = work.shape, work.ndim
    r0, r1 = ranks[0], ranks[1 % n]
    mat = work.reshape(shape[0], -1)
    u, s, vh = truncated_svd(mat, min(r0 * r1, *mat.shape))
    u = _padded(u, shape[0], r0 * r1, generator)
    rest = _padded(s[:, None] * vh, r0 * r1, mat.shape[1], generator)
    if regauge:
        rotation = torch.linalg.qr(
            torch.randn(r0 * r1, r0 * r1, generator=generator, device=work.device, dtype=work.dtype)
        ).Q
        u, rest = u @ rotation, rotation.T @ rest
    cores = [u.reshape(shape[0], r0, r1).permute(1, 0, 2)]
    # (r0, r1, n_1 ... n_{N-1}) -> (r1, n_1 ... n_{N-1}, r0)
    remainder = rest.reshape(r0, r1, -1).permute(1, 2, 0)
    r_left = r1
    for k in range(1, n - 1):
        mat = remainder.reshape(r_left * shape[k], -1)
        r_next = ranks[k + 1]
        u, s, vh = truncated_svd(mat, min(r_next, *mat.shape))
        cores.append(_padded(u, mat.shape[0], r_next, generator).reshape(r_left, shape[k], r_next))
        remainder, r_left = _padded(s[:, None] * vh, r_next, mat.shape[1], generator), r_next
    cores.append(remainder.reshape(r_left, shape[-1], r0))
    return cores


def _cyclic_unfolding(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Unfolding with columns ordered ``mode + 1, ..., N - 1, 0, ..., mode - 1``."""
    order = [(mode + i) % x.ndim for i in range(x.ndim)]
    return x.permute(order).reshape(x.shape[mode], -1)


def _tr_als(
    work: torch.Tensor, cores: list[torch.Tensor], sq_norm: float, n_iter_max: int, stop_tol: float
) -> tuple[list[torch.Tensor], float]:
    """Alternating least squares over the cores (Zhao et al. 2016, TR-ALS).

    Core ``k`` solves ``min ||X_<k> - G_k D_k^T||`` where ``D_k`` is the
    contraction of all other cores; the normal equations are solved in float64.
    Returns the cores and the relative error after the last sweep.
    """
    n = work.ndim
    unfoldings = [_cyclic_unfolding(work, k) for k in range(n)]
    previous = math.inf
    for _ in range(n_iter_max):
        for k in range(n):
            others = contract_chain([cores[(k + i) % n] for i in range(1, n)])  # (r_{k+1}, J, r_k)
            r_right, cols, r_left = others.shape
            design = others.permute(1, 2, 0).reshape(cols, r_left * r_right).double()
            gram = design.T @ design
            rhs = unfoldings[k].double() @ design
            ridge = 1e-12 * float(torch.trace(gram)) / gram.shape[0]
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            solution = torch.linalg.solve(gram + ridge * eye, rhs.T).T  # (n_k, r_k * r_{k+1})
            cores[k] = solution.reshape(-1, r_left, r_right).permute(1, 0, 2).to(work.dtype)
        model_sq = float(torch.sum((solution @ gram) * solution))
        sq_error = sq_norm - 2 * float(torch.sum(rhs * solution)) + model_sq
        error = math.sqrt(max(sq_error, 0.0) / sq_norm) if sq_norm > 0 else 0.0
        if abs(previous - error) < stop_tol:
            break
        previous = error
    return cores, error


def tr(
    x: Any,
    rank: int | Sequence[int],
    *,
    method: str = "als",
    n_init: int = 1,
    n_iter_max: int = 20,
    stop_tol: float = 1e-6,
    seed: int | None = 0,
    clip: bool = False,
) -> TR:
    """Tensor-ring decomposition by TR-SVD, refined by ALS.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        A tensor with at least two modes, any real floating dtype, any device.
    rank : int or sequence of int
        Every bond's rank (an int) or the ``N`` ranks ``(r_0, ..., r_{N-1})``;
        core ``k`` has shape ``(r_k, n_k, r_{k+1})`` and the ring closes with
        ``r_N = r_0``. ``r_0`` is at most ``x.shape[0]`` and bond ``k >= 1`` at
        most ``min(prod(shape[:k]), prod(shape[k:]))``.
    method : {"als", "svd"}
        ``"svd"`` returns the TR-SVD; ``"als"`` refines it by alternating least
        squares.
    n_init : int
        Number of ALS starts: the TR-SVD, then TR-SVDs whose first split is
        rotated at random (ALS can stall in a poor local minimum from any one
        start). The result with the lowest error is kept. ``"svd"`` ignores it.
    n_iter_max : int
        Largest number of ALS sweeps.
    stop_tol : float
        ALS stops when the relative error changes by less than this between sweeps.
    seed : int or None
        Seed of the small random slices that fill bonds an unfolding cannot.
    clip : bool
        Lower ranks above their bound to it instead of raising.

    Returns
    -------
    TR
        The ring's cores, in the input's dtype and device.

    """
    x, work, sq_norm, scale = checked_input(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 modes for a tensor ring, got shape {tuple(x.shape)}")
    shape = tuple(x.shape)
    bounds = [min(shape[0], math.prod(shape[1:]))]
    bounds += [min(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))]
    what = [f"bond {k} (at most {b} for shape {shape})" for k, b in enumerate(bounds)]
    ranks = check_ranks(rank, bounds, what=what, clip=clip)
    check_choice(method, TR_METHODS, "method")
    n_init = check_int(n_init, "n_init")
    n_iter_max = check_int(n_iter_max, "n_iter_max")
    stop_tol = check_nonnegative(stop_tol, "stop_tol")

    generator = make_generator(seed, x.device)
    cores = _tr_svd(work, ranks, generator)
    if method == "als" and sq_norm > 0:
        best_error = math.inf
        for start in range(n_init):
            refined, error = _tr_als(work, _tr_svd(work, ranks, generator, regauge=True) if start else cores,
                                     sq_norm, n_iter_max, stop_tol)
            if error < best_error:
                best, best_error = refined, error
        cores = best
    cores[-1] = cores[-1] * scale
    return TR(tuple(c.to(x.dtype) for c in cores))
