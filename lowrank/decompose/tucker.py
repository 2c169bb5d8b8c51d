"""Tucker decomposition: sequentially truncated HOSVD and HOOI, full or partial."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lowrank.checks import check_choice, check_int, check_nonnegative, check_ranks, check_tol
from lowrank.decompose._inputs import checked_input, make_generator
from lowrank.decompose._linalg import (
    mode_gram,
    mode_product,
    rank_for_tol,
    squared_norm,
    symmetric_eig_desc,
    unfold,
)
from lowrank.decompose.factorizations import Tucker

TUCKER_METHODS = ("hooi", "hosvd")
SUBSPACE_METHODS = ("auto", "gram", "randomized")


def check_modes(modes: Sequence[int] | int | None, ndim: int) -> tuple[int, ...]:
    """Return the sorted, non-negative, distinct modes; all modes when ``modes`` is None."""
    if modes is None:
        return tuple(range(ndim))
    if isinstance(modes, int):
        modes = [modes]
    normalised = []
    for mode in modes:
        if isinstance(mode, bool) or not isinstance(mode, int) or not -ndim <= mode < ndim:
            raise ValueError(f"modes must hold ints in [{-ndim}, {ndim - 1}] for a {ndim}-mode tensor, got {mode!r}")
        normalised.append(mode % ndim)
    if len(set(normalised)) != len(normalised) or not normalised:
        raise ValueError(f"modes must be distinct and non-empty, got {list(modes)!r}")
    return tuple(sorted(normalised))


def _gram_factor(core: torch.Tensor, mode: int, rank: int, allowed_sq_error: float | None) -> torch.Tensor:
    """Leading left singular vectors of an unfolding, from its Gram matrix.

    With ``allowed_sq_error`` the smallest rank (at most ``rank``) whose
    discarded energy fits in it.
    """
    evals, evecs = symmetric_eig_desc(mode_gram(core, mode), float64=allowed_sq_error is not None)
    if allowed_sq_error is not None:
        rank = min(rank, rank_for_tol(evals, float(evals.sum()), allowed_sq_error))
    return evecs[:, :rank].to(core.dtype)


def _st_hosvd(
    x: torch.Tensor,
    modes: tuple[int, ...],
    ranks: tuple[int, ...] | None,
    allowed_sq_error: float | None,
    randomized: bool,
    n_oversamples: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], int, torch.Tensor]:
    """Sequentially truncated HOSVD (Vannieuwenhoven, Vandebril and Meerbergen 2012).

    Modes are processed in the order that shrinks the tensor most (first or last
    mode first on ties, as their unfoldings are views), so that later subspaces
    are computed on an already small core. With ``allowed_sq_error``, each mode
    may discard an equal share of it and ``ranks`` (if given) caps each rank.

    With ``randomized``, a mode whose rank is small against its size is first
    projected on a Gaussian sketch of its range (``rank + n_oversamples``
    columns) and its subspace is then found within that small core.

    Returns the core, the factors, the first mode processed and ``x`` multiplied
    along it by its factor's transpose (which HOOI's first sweep reuses).
    """
    shape, last = x.shape, x.ndim - 1
    rank_of = dict(zip(modes, ranks or [shape[m] for m in modes]))
    order = sorted(modes, key=lambda m: (-shape[m] / rank_of[m], m not in (0, last), m))
    core, factors = x, {}
    for mode in order:
        rank, size = rank_of[mode], core.shape[mode]
        sketch_size = rank + n_oversamples
        if randomized and allowed_sq_error is None and 3 * sketch_size <= size:
            gaussian = torch.randn(
                core.numel() // size, sketch_size, generator=generator, device=x.device, dtype=x.dtype
            )
            sketch = torch.linalg.qr(unfold(core, mode) @ gaussian).Q
            core = mode_product(core, sketch.T, mode)
            inner = _gram_factor(core, mode, rank, None)
            factor = sketch @ inner
        else:
            inner = factor = _gram_factor(core, mode, rank, allowed_sq_error / len(modes) if allowed_sq_error else None)
        factors[mode] = factor
        core = mode_product(core, inner.T, mode)
        if mode == order[0]:
            head = core
    return core, factors, order[0], head


def _project_except(x: torch.Tensor, factors: dict[int, torch.Tensor], skip: int | None) -> torch.Tensor:
    """Multiply ``x`` by the transpose of every factor but the one of mode ``skip``.

    Modes are contracted in the order that shrinks the tensor most.
    """
    for mode in sorted((m for m in factors if m != skip), key=lambda m: factors[m].shape[1] / factors[m].shape[0]):
        x = mode_product(x, factors[mode].T, mode)
    return x


def _relative_error(core: torch.Tensor, sq_norm: float) -> float:
    """Relative error of a Tucker model with orthonormal factors: ``sqrt(1 - ||core||² / ||x||²)``."""
    return math.sqrt(max(sq_norm - squared_norm(core), 0.0) / sq_norm)


def _hooi(
    x: torch.Tensor,
    factors: dict[int, torch.Tensor],
    sq_norm: float,
    start_error: float,
    n_iter_max: int,
    stop_tol: float,
    stop_rtol: float,
    pivot: int,
    head: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Higher-order orthogonal iteration from the given factors.

    Each factor is updated by one block power step on its projected unfolding,
    ``orth(Y Yᵀ U)``, which raises the captured energy monotonically and costs
    far less than a fresh eigendecomposition. Every mode but ``pivot`` is
    updated from the ``head``, ``x`` multiplied along ``pivot`` (ST-HOSVD hands
    over the first one), and ``pivot`` last, so a sweep reads the full tensor
    twice whatever the number of modes, and the first sweep once. Stops when the
    relative error changes by less than ``stop_tol`` between sweeps (tensorly's
    criterion) or by less than ``stop_rtol`` times its value (the first sweep is
    compared with ``start_error``), or after ``n_iter_max`` sweeps.
    """
    previous = start_error
    others = sorted(m for m in factors if m != pivot)
    for _ in range(n_iter_max):
        if head is None:
            head = mode_product(x, factors[pivot].T, pivot)
        for mode in others:
            mat = unfold(_project_except(head, {m: factors[m] for m in others}, mode), mode)
            factors[mode] = torch.linalg.qr(mat @ (mat.T @ factors[mode])).Q
        partial = _project_except(x, factors, pivot)
        mat = unfold(partial, pivot)
        factors[pivot] = torch.linalg.qr(mat @ (mat.T @ factors[pivot])).Q
        core = mode_product(partial, factors[pivot].T, pivot)
        head = None
        error = _relative_error(core, sq_norm)
        if abs(previous - error) < max(stop_tol, stop_rtol * error):
            break
        previous = error
    return core, factors


def tucker(
    x: Any,
    rank: int | Sequence[int] | None = None,
    *,
    modes: Sequence[int] | int | None = None,
    tol: float | None = None,
    method: str = "hooi",
    init: str = "svd",
    n_iter_max: int = 100,
    stop_tol: float = 1e-4,
    stop_rtol: float = 1e-3,
    subspace: str = "auto",
    n_oversamples: int = 10,
    seed: int | None = 0,
    clip: bool = False,
) -> Tucker:
    """Tucker decomposition by ST-HOSVD, optionally refined by HOOI.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        A tensor with at least two modes, any real floating dtype, any device.
    rank : int or sequence of int, optional
        Rank of every decomposed mode (an int) or of each mode in ``modes``.
        With ``tol`` it caps the ranks that ``tol`` chooses.
    modes : int or sequence of int, optional
        The modes to decompose; all modes by default. ``modes=(0, 1)`` on a
        conv kernel ``(out, in, kh, kw)`` is the Tucker-2 decomposition.
    tol : float, optional
        Relative error target in (0, 1): ST-HOSVD lets each mode discard an equal
        share of ``tol**2 * ||x||**2``, which guarantees a relative error of at
        most ``tol``; HOOI can only lower it further.
    method : {"hooi", "hosvd"}
        ``"hosvd"`` stops after the sequentially truncated HOSVD; ``"hooi"``
        refines it by higher-order orthogonal iteration.
    init : {"svd", "random"}
        Start of HOOI: the ST-HOSVD factors, or random orthonormal ones.
    n_iter_max : int
        Largest number of HOOI sweeps.
    stop_tol : float
        HOOI stops when the relative error changes by less than this between
        sweeps (tensorly's criterion and default).
    stop_rtol : float
        HOOI also stops when the relative error changes by less than this
        fraction of its value: far from low rank, HOOI creeps on for dozens of
        sweeps that each gain under 0.1% of the error. ``stop_rtol=0`` leaves
        tensorly's criterion alone.
    subspace : {"auto", "gram", "randomized"}
        How ST-HOSVD finds each mode's subspace: eigenvectors of the unfolding's
        Gram matrix, or (for a mode whose rank plus ``n_oversamples`` is at most a
        third of its size) a seeded Gaussian sketch of its range first. ``"auto"``
        sketches only when HOOI refines the result and every decomposed mode has
        at least 1024 entries (there an eigendecomposition of the mode's Gram
        matrix costs more than the sketch); it uses Gram matrices otherwise.
    n_oversamples : int
        Extra columns of the randomized sketch.
    seed : int or None
        Seed of the randomized parts; None draws a fresh one.
    clip : bool
        Lower a rank above its mode's size to that size instead of raising.

    Returns
    -------
    Tucker
        Core and orthonormal factors in the input's dtype and device.

    Examples
    --------
    >>> import torch, lowrank
    >>> x = torch.randn(30, 40, 50)
    >>> f = lowrank.decompose.tucker(x, rank=(5, 6, 7))
    >>> f.core.shape, f.ranks
    (torch.Size([5, 6, 7]), (5, 6, 7))

    """
    x, work, sq_norm, scale = checked_input(x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 modes for a Tucker decomposition, got shape {tuple(x.shape)}")
    modes = check_modes(modes, x.ndim)
    check_choice(method, TUCKER_METHODS, "method")
    check_choice(init, ("svd", "random"), "init")
    check_choice(subspace, SUBSPACE_METHODS, "subspace")
    tol = check_tol(tol)
    n_iter_max = check_int(n_iter_max, "n_iter_max")
    stop_tol = check_nonnegative(stop_tol, "stop_tol")
    stop_rtol = check_nonnegative(stop_rtol, "stop_rtol")
    n_oversamples = check_int(n_oversamples, "n_oversamples", minimum=0)
    if rank is None and tol is None:
        raise ValueError("tucker needs rank= (an int or one int per mode) or tol= (a relative error in (0, 1))")
    ranks = None
    if rank is not None:
        ranks = check_ranks(
            rank, [x.shape[m] for m in modes], what=[f"mode {m} (size {x.shape[m]})" for m in modes], clip=clip
        )
    if tol is not None and init == "random" and method == "hooi":
        raise ValueError("tol= chooses the ranks by ST-HOSVD, so it needs init='svd', not 'random'")
    if tol is not None and subspace == "randomized":
        raise ValueError("tol= needs each mode's full spectrum: use subspace='gram' or 'auto', not 'randomized'")

    # Kept modes first: the decomposed ones are then contiguous at the end and
    # their mode products are single matrix products on views.
    kept = [m for m in range(x.ndim) if m not in modes]
    work = work.permute(*kept, *modes).contiguous()
    inner_modes = tuple(range(len(kept), x.ndim))
    generator = make_generator(seed, x.device)
    min_size = min(x.shape[m] for m in modes)
    if method == "hosvd" or init == "svd":
        randomized = subspace == "randomized" or (subspace == "auto" and method == "hooi" and min_size >= 1024)
        allowed = tol**2 * sq_norm if tol is not None else None
        core, factors, pivot, head = _st_hosvd(work, inner_modes, ranks, allowed, randomized, n_oversamples, generator)
        start_error = _relative_error(core, sq_norm) if sq_norm > 0 else 0.0
    else:
        factors = {
            m: torch.linalg.qr(torch.randn(work.shape[m], r, generator=generator, device=x.device, dtype=work.dtype)).Q
            for m, r in zip(inner_modes, ranks or [work.shape[m] for m in inner_modes])
        }
        core, start_error, pivot, head = _project_except(work, factors, None), math.inf, inner_modes[-1], None
    if method == "hooi" and sq_norm > 0:
        core, factors = _hooi(work, factors, sq_norm, start_error, n_iter_max, stop_tol, stop_rtol, pivot, head)
    core = core.permute(*[(kept + list(modes)).index(m) for m in range(x.ndim)])
    return Tucker((core * scale).to(x.dtype).contiguous(), tuple(factors[m].to(x.dtype) for m in inner_modes), modes)
