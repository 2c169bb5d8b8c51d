"""Data-aware low-rank factors of a linear layer's weight: whitening (SVD-LLM), ASVD scaling, refitting.

Pure tensor functions, no hooks: they take a weight ``W`` of shape ``(out, in)``
(``linear_weight(layer)`` for an ``nn.Linear`` or a Hugging Face ``Conv1D``) and
statistics from :mod:`lowrank.calibrate.inputs` and :mod:`lowrank.calibrate.fisher`,
compute in float64, and return the factors ``first (rank, in)`` and ``second (out, rank)`` of
``W' = second @ first`` in the weight's dtype and on its device, ready for
:class:`lowrank.nn.LowRankLinear`.

Conventions: ``X`` is the ``(in, T)`` matrix whose columns are the layer's
input rows, so the layer's output is ``W X`` and the input Gram matrix is
``G = X X^T`` (``InputStatistics.gram``); ``F`` is an ``(out, out)`` output-side
weighting such as the Fisher of :func:`collect_output_fisher`.
"""

from __future__ import annotations

import torch

from lowrank.checks import check_ranks

_F64 = torch.float64


def _check_matrix(x: torch.Tensor, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    expected = 2 if shape is None else len(shape)
    if x.dim() != expected or (shape is not None and tuple(x.shape) != shape):
        want = f"shape {shape}" if shape is not None else "a 2-D matrix"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or Inf")
    return x


def _symmetrised(gram: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``(gram + gram^T) / 2`` in a new float64 matrix, made a block at a time (no other full-size temporary)."""
    g = gram.to(_F64, copy=True)
    n = g.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            mean = (g[i : i + block, j : j + block] + g[j : j + block, i : i + block].T) / 2
            g[i : i + block, j : j + block] = mean
            g[j : j + block, i : i + block] = mean.T
    return g


def shrunk_to_diagonal(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - shrinkage) * gram + shrinkage * diag(gram)``: a Gram matrix pulled towards its diagonal (a new tensor).

    Shrinkage (Ledoit and Wolf's target of the variances alone) keeps each
    channel's scale and weakens the correlations between channels that a
    finite calibration set measures: whitening by the shrunk matrix trusts
    the calibration text's particular correlations less. ``shrinkage=0``
    returns ``gram`` itself; 1 its diagonal alone.

    Examples
    --------
    >>> import torch
    >>> shrunk_to_diagonal(torch.tensor([[4.0, 2.0], [2.0, 1.0]]), 0.5)
    tensor([[4., 1.],
            [1., 1.]])

    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if shrinkage == 0.0:
        return gram
    shrunk = gram * (1.0 - shrinkage)
    shrunk.diagonal().copy_(gram.diagonal())
    return shrunk


def cholesky_factor(gram: torch.Tensor, *, damping: float = 0.0, max_tries: int = 12) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``gram + shift I``, with the smallest shift that succeeds.

    The shift starts at ``eps * trace / n`` (``eps`` of float64, ``n`` the size)
    and grows tenfold until the factorisation succeeds, so that a singular or
    rank-deficient Gram matrix (fewer samples than features, dead channels)
    still factors, perturbed at the level of its rounding errors.

    Parameters
    ----------
    gram : torch.Tensor
        ``(n, n)`` symmetric positive semi-definite matrix (only its symmetric
        part is used).
    damping : float
        An explicit ridge added on top, relative to the mean diagonal entry:
        ``gram + damping * trace / n * I`` (0: none).
    max_tries : int
        Shifts tried, ``eps * trace / n * 10**k`` for ``k < max_tries``.

    Returns
    -------
    torch.Tensor
        ``(n, n)`` lower-triangular float64 ``L`` with ``L @ L.T = gram + shift I``,
        on ``gram``'s device.

    Raises
    ------
    ValueError
        If ``gram`` is not a finite square matrix, has a negative diagonal
        entry, or needs a larger shift than the last one tried (it is not
        positive semi-definite).

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate import cholesky_factor
    >>> x = torch.randn(3, 5, dtype=torch.float64)          # 3 samples, 5 features: rank 3
    >>> factor = cholesky_factor(x.T @ x)
    >>> bool(torch.allclose(factor @ factor.T, x.T @ x, atol=1e-10))
    True

    """
    _check_matrix(gram, "gram")
    n = gram.shape[0]
    if gram.shape[1] != n:
        raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
    if damping < 0 or not max_tries >= 1:
        raise ValueError(f"damping must be >= 0 and max_tries >= 1, got {damping} and {max_tries}")
    g = _symmetrised(gram)
    diagonal = g.diagonal()
    # a product such as A G A^T of a singular G can round a zero diagonal entry to a tiny negative one
    rounding = n * torch.finfo(_F64).eps * float(diagonal.abs().max())
    if (diagonal < -rounding).any():
        index = int(torch.argmin(diagonal))
        raise ValueError(f"gram has a negative diagonal entry ({float(diagonal[index]):.3e} at {index}); "
                         "it is not a Gram matrix")
    scale = float(diagonal.clamp_min(0).mean())
    if scale == 0.0:
        scale = 1.0  # an all-zero Gram matrix: whitening reduces to a plain SVD
    base_diagonal = diagonal + damping * scale  # the shifts go on the diagonal in place: no n x n temporary
    shift = torch.finfo(_F64).eps * scale
    for _ in range(max_tries):
        diagonal.copy_(base_diagonal + shift)
        factor, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            return factor
        shift *= 10
    raise ValueError(
        f"gram is not positive semi-definite: Cholesky failed with diagonal shifts up to {shift / 10:.3e} "
        f"(mean diagonal {scale:.3e})"
    )


def _balanced(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-one component so that its row of ``first`` and column of ``second`` have equal norms."""
    a = torch.linalg.vector_norm(first, dim=1)
    b = torch.linalg.vector_norm(second, dim=0)
    c = torch.where((a > 0) & (b > 0), torch.sqrt(b / torch.where(a > 0, a, 1.0)), torch.ones_like(a))
    return first * c[:, None], second / c


def _weighted(weight: torch.Tensor, gram: torch.Tensor, output_gram: torch.Tensor | None, damping: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(L_F^T W S, S, L_F)`` in float64 (``L_F`` None without ``output_gram``), the inputs checked."""
    _check_matrix(weight, "weight")
    out_features, in_features = weight.shape
    _check_matrix(gram, "gram", (in_features, in_features))
    w = weight.detach().to(_F64)
    s_in = cholesky_factor(gram.detach().to(w.device), damping=damping)
    weighted = w @ s_in
    s_out = None
    if output_gram is not None:
        _check_matrix(output_gram, "output_gram", (out_features, out_features))
        s_out = cholesky_factor(output_gram.detach().to(w.device), damping=damping)
        weighted = s_out.T @ weighted
    return weighted, s_in, s_out


def whitened_spectrum(
    weight: torch.Tensor, gram: torch.Tensor, *, output_gram: torch.Tensor | None = None, damping: float = 0.0
) -> torch.Tensor:
    """The singular values of the whitened weight: ``whitened_low_rank(...)[2]`` without the singular vectors.

    Cheaper than the factors (no singular vectors, no triangular solves); what
    a rank choice reads. Parameters as in :func:`whitened_low_rank`.

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate import whitened_low_rank, whitened_spectrum
    >>> w, x = torch.randn(6, 8, dtype=torch.float64), torch.randn(8, 100, dtype=torch.float64)
    >>> bool(torch.allclose(whitened_spectrum(w, x @ x.T), whitened_low_rank(w, x @ x.T, 1)[2]))
    True

    """
    return torch.linalg.svdvals(_weighted(weight, gram, output_gram, damping)[0])


def whitened_low_rank(
    weight: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    *,
    output_gram: torch.Tensor | None = None,
    damping: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of ``weight`` that best preserve the layer's outputs on the calibration inputs.

    Truncation-aware whitening (SVD-LLM, Wang et al. 2024): with ``S`` the lower
    Cholesky factor of ``gram = X X^T``, ``||(W - W') X||_F = ||(W - W') S||_F``,
    so the best ``W'`` of rank ``r`` is the truncated SVD of ``W S`` mapped back
    by ``S^{-1}``: ``W S = U diag(s) V^T`` gives ``W' = U_r diag(s_r) V_r^T S^{-1}``
    (``V_r^T S^{-1}`` by a triangular solve, never an explicit inverse).

    With ``output_gram = F`` as well (an output-side Fisher), the error is
    weighted on both sides, ``||L_F^T (W - W') S||_F^2 = tr((W - W') G (W - W')^T F)``
    with ``L_F`` the Cholesky factor of ``F``; the SVD is that of ``L_F^T W S``
    and the left factor is mapped back by ``L_F^{-T}``.

    Parameters
    ----------
    weight : torch.Tensor
        ``(out, in)`` weight (any floating dtype).
    gram : torch.Tensor
        ``(in, in)`` input Gram matrix (``InputStatistics.gram``; its scale does
        not matter).
    rank : int
        Rank kept, ``1 <= rank <= min(out, in)``.
    output_gram : torch.Tensor, optional
        ``(out, out)`` output weighting ``F``.
    damping : float
        Ridge added to both Gram matrices, relative to their mean diagonal (see
        :func:`cholesky_factor`); a positive value pulls ``W'`` towards ``W``
        in input directions the calibration data barely visits.

    Returns
    -------
    first : torch.Tensor
        ``(rank, in)``, in ``weight``'s dtype and on its device.
    second : torch.Tensor
        ``(out, rank)``, likewise; ``second @ first = W'``. Each rank-one
        component is split so that its row of ``first`` and column of
        ``second`` have equal norms (well scaled for low precision, whatever
        the Gram matrix's scale).
    spectrum : torch.Tensor
        All ``min(out, in)`` singular values of the weighted matrix ``W S``
        (or ``L_F^T W S``), float64, decreasing: the weighted squared error of
        the result is ``(spectrum[rank:] ** 2).sum()``, which makes it the input
        of a rank policy.

    Examples
    --------
    >>> import torch
    >>> from lowrank.calibrate import whitened_low_rank
    >>> w, x = torch.randn(6, 8, dtype=torch.float64), torch.randn(8, 100, dtype=torch.float64)
    >>> first, second, s = whitened_low_rank(w, x @ x.T, 3)
    >>> error = torch.linalg.matrix_norm((w - second @ first) @ x) ** 2
    >>> bool(torch.isclose(error, (s[3:] ** 2).sum()))
    True

    """
    _check_matrix(weight, "weight")
    out_features, in_features = weight.shape
    bound = min(out_features, in_features)
    (rank,) = check_ranks(
        rank, [bound], name=f"rank (an int in [1, {bound}])", what=[f"a {out_features}x{in_features} weight"]
    )
    weighted, s_in, s_out = _weighted(weight, gram, output_gram, damping)
    u, s, vh = torch.linalg.svd(weighted, full_matrices=False)
    first = torch.linalg.solve_triangular(s_in, vh[:rank], upper=False, left=False)  # V_r^T S^{-1}
    second = u[:, :rank] * s[:rank]
    if s_out is not None:
        second = torch.linalg.solve_triangular(s_out.T, second, upper=True)  # L_F^{-T} U_r diag(s_r)
    first, second = _balanced(first, second)
    return first.to(weight.dtype), second.to(weight.dtype), s


def asvd_low_rank(
    weight: torch.Tensor, abs_mean: torch.Tensor, rank: int, *, alpha: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors by activation-aware SVD (ASVD, Yuan et al. 2023).

    Input channels are scaled by ``d = abs_mean ** alpha`` before the SVD and
    unscaled after: ``W diag(d) = U diag(s) V^T`` gives
    ``W' = U_r diag(s_r) V_r^T diag(d)^{-1}``, so channels that carry large
    activations are approximated more accurately. ``alpha = 0`` is the plain
    truncated SVD.

    Parameters
    ----------
    weight : torch.Tensor
        ``(out, in)`` weight.
    abs_mean : torch.Tensor
        ``(in,)`` mean absolute input per channel (``InputStatistics.abs_mean``).
        Channels at zero are treated as ``sqrt(eps)`` times the largest scale.
    rank : int
        Rank kept, ``1 <= rank <= min(out, in)``.
    alpha : float
        Strength of the scaling, ``>= 0`` (0.5 in the paper).

    Returns
    -------
    first, second, spectrum
        As for :func:`whitened_low_rank`; ``spectrum`` holds the singular values
        of ``W diag(d)``.

    """
    _check_matrix(weight, "weight")
    out_features, in_features = weight.shape
    bound = min(out_features, in_features)
    (rank,) = check_ranks(
        rank, [bound], name=f"rank (an int in [1, {bound}])", what=[f"a {out_features}x{in_features} weight"]
    )
    _check_matrix(abs_mean, "abs_mean", (in_features,))
    if (abs_mean < 0).any():
        raise ValueError("abs_mean must be non-negative (a mean absolute value per input channel)")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    w = weight.detach().to(_F64)
    scale = abs_mean.detach().to(device=w.device, dtype=_F64) ** alpha
    top = float(scale.max())
    scale = scale.clamp_min(top * torch.finfo(_F64).eps ** 0.5) if top > 0 else torch.ones_like(scale)
    u, s, vh = torch.linalg.svd(w * scale, full_matrices=False)
    first, second = _balanced(vh[:rank] / scale, u[:, :rank] * s[:rank])
    return first.to(weight.dtype), second.to(weight.dtype), s


def refit_second(
    weight: torch.Tensor,
    first: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor | None = None,
    *,
    damping: float = 0.0,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """The least-squares ``second`` factor for a fixed ``first``: ``B = W C A^T (A G A^T)^{-1}``.

    Minimises ``||W X_d - B A X_c||_F`` over ``B``, where ``A = first``, ``X_c``
    holds the inputs the compressed layer sees (in a model whose earlier layers
    are already compressed) and ``X_d`` the dense layer's inputs on the same
    calibration tokens; ``G = X_c X_c^T`` and ``C = X_d X_c^T``. With
    ``X_d = X_c`` (``cross`` None, ``C = G``) the refit can only lower the
    layer's output error ``||(W - B A) X||``.

    Parameters
    ----------
    weight : torch.Tensor
        ``(out, in)`` dense weight ``W``.
    first : torch.Tensor
        ``(rank, in)`` fixed first factor ``A``.
    gram : torch.Tensor
        ``(in, in)`` Gram matrix ``G = sum_t x_c x_c^T`` of the compressed path's inputs.
    cross : torch.Tensor, optional
        ``(in, in)`` cross moment ``C = sum_t x_d x_c^T`` (rows: dense path,
        columns: compressed path); ``gram`` by default.
    damping : float
        Ridge on ``A G A^T``, relative to its mean diagonal: ``lam = damping *
        trace(A G A^T) / rank`` is added to its diagonal, which pulls ``B``
        towards ``prior`` (towards zero without one). The solve always adds
        the smallest shift that makes it positive definite (see
        :func:`cholesky_factor`), so a rank-deficient ``A G A^T`` is handled.
    prior : torch.Tensor, optional
        ``(out, rank)`` factor the ridge pulls towards: minimises
        ``||W X_d - B A X_c||^2 + lam ||B - prior||^2``, so ``damping=0`` is the
        full refit and a large ``damping`` keeps ``prior`` (the factor before
        any refit).

    Returns
    -------
    torch.Tensor
        ``(out, rank)`` second factor, in ``weight``'s dtype and on its device.

    """
    _check_matrix(weight, "weight")
    out_features, in_features = weight.shape
    _check_matrix(first, "first")
    if first.shape[1] != in_features:
        raise ValueError(f"first must have shape (rank, {in_features}) for a {out_features}x{in_features} weight, "
                         f"got {tuple(first.shape)}")
    _check_matrix(gram, "gram", (in_features, in_features))
    w = weight.detach().to(_F64)
    a = first.detach().to(device=w.device, dtype=_F64)
    g = gram.detach().to(device=w.device, dtype=_F64)
    if cross is None:
        c = g
    else:
        _check_matrix(cross, "cross", (in_features, in_features))
        c = cross.detach().to(device=w.device, dtype=_F64)
    hessian = a @ g @ a.T
    rhs = w @ c @ a.T  # (out, rank)
    if prior is not None:
        if prior.shape != rhs.shape:
            raise ValueError(f"prior must have shape {tuple(rhs.shape)}, got {tuple(prior.shape)}")
        ridge = damping * (float(hessian.diagonal().clamp_min(0).mean()) or 1.0)  # as cholesky_factor scales it
        rhs = rhs + ridge * prior.detach().to(device=w.device, dtype=_F64)
    factor = cholesky_factor(hessian, damping=damping)
    return torch.cholesky_solve(rhs.T, factor).T.to(weight.dtype)


def relative_output_error(
    weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor, *, output_gram: torch.Tensor | None = None
) -> float:
    """``sqrt(tr(D G D^T F) / tr(W G W^T F))`` with ``D = W - approx``: the relative error of the layer's outputs.

    With ``F`` the identity (``output_gram`` None) this is
    ``||(W - W') X||_F / ||W X||_F`` over the calibration inputs (computed from
    ``G = X X^T`` alone); ``weight`` and ``approx`` are ``(out, in)``.
    """
    _check_matrix(weight, "weight")
    out_features, in_features = weight.shape
    _check_matrix(approx, "approx", (out_features, in_features))
    _check_matrix(gram, "gram", (in_features, in_features))
    w = weight.detach().to(_F64)
    d = w - approx.detach().to(device=w.device, dtype=_F64)
    g = gram.detach().to(device=w.device, dtype=_F64)
    f = None
    if output_gram is not None:
        _check_matrix(output_gram, "output_gram", (out_features, out_features))
        f = output_gram.detach().to(device=w.device, dtype=_F64)

    def weighted(m: torch.Tensor) -> float:
        left = m @ g @ m.T
        return float(torch.trace(left if f is None else left @ f))

    total = weighted(w)
    return (max(weighted(d), 0.0) / total) ** 0.5 if total > 0 else 0.0
