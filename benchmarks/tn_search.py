"""Tensor-network structure search against the best fixed format, in one run (issue 4).

Three tables, all measured in this process:

1. **LIVE images at a parameter budget.** The four LIVE images of ``../shared/data/live/`` (256x256
   reshaped to 4^8, the setup of the structure-search literature) are fitted at each budget (2048, 4096
   and 8192 parameters) by ``lowrank.decompose.tn(x, max_params=budget, time_limit=..., **LIVE_OPTIONS)``
   and by every fixed format at the same budget; the best fixed format is the one with the lowest
   relative error. The target: the search's error is below the best fixed format's, at every budget on
   every image, in under 60 s per image and budget. The search's time limit is 55 s by default: it starts
   no work after it and overruns by at most one candidate fit and one ALS sweep (well under a second).

   Fixed formats, each at the largest rank whose parameter count fits the budget:

   - CP: tensorly ``parafac`` (``n_iter_max=CP_ITERS``), rank ``budget // sum(dims)``; the weights are
     counted as absorbed into the factors (``rank * sum(dims)`` parameters).
   - Tucker: tensorly ``tucker`` at a uniform rank; and non-uniform ranks from
     ``lowrank.decompose.tucker(x, tol=t)`` (ST-HOSVD + HOOI), ``t`` bisected to the smallest tolerance
     that fits the budget, and from ``tucker(x, cap, tol=t)`` with the largest uniform cap that fits for
     each ``t`` on a log grid (:func:`scan_tol`: the ranks a tolerance picks jump, so a tolerance alone
     often leaves much of the budget unused).
   - TT: tensorly ``tensor_train`` at a uniform internal rank (bonds capped by their unfolding's rank);
     and non-uniform ranks from ``lowrank.decompose.tt`` (TT-SVD), chosen the same two ways as Tucker's.
   - TR: a uniform ring rank fitted by ALS here (:func:`ring_als`, up to ``TR_SWEEPS`` sweeps, started
     from lowrank's TR-SVD padded to the uniform rank), because tensorly's TR-SVD needs
     ``r_0 * r_1 <= n_0`` (ring rank 2 on 4^8) and ``lowrank.decompose.tr`` caps ``r_0`` at ``n_0``
     (in a trial on images A and D its clipped ranks (4, 4, r, ..., r, 4) came out 1-13% worse);
     and tensorly ``tensor_ring`` with ranks ``(s, s, r, ..., r, s)``, ``s * s <= n_0``.

   Every candidate's error (in float64) and parameter count are taken from its own result, and the best
   candidate of each format is kept. CP-ALS and ring ALS compute in float32 here (``BUDGET_DTYPE``).

2. **Planted structures.** Four 7^5 tensors with a known structure (random Gaussian factors, normalised):
   a Tucker with ranks (2, 3, 4, 3, 2) (core and factors, 242 parameters); a TT with ranks (2, 3, 6, 5);
   a TR with ranks (2, 3, 4, 5, 5); and a "triangle + chain" network in
   which modes 0, 1, 2 are pairwise connected and modes 3 and 4 hang off mode 2 as a chain (edges
   0-1: 3, 1-2: 4, 0-2: 2, 2-3: 4, 3-4: 3), i.e. cores A (n0, r01, r02), B (r01, n1, r12),
   C (r02, r12, n2, r23), D (r23, n3, r34), E (r34, n4), a structure that neither TT, TR nor Tucker
   holds at its size. For each seed (planted tensor and search seed alike), the search runs with
   ``tol=1e-4``; it succeeds when its error is below 1e-4 with at most the planted network's parameters.
   Against it, each fixed format's ranks are grown (uniform ranks; for TT and Tucker also the
   non-uniform ranks that TT-SVD / ST-HOSVD choose for the tolerance) until its error reaches the
   search's error or 1e-4, whichever is larger (never a stricter target than the search's own), and the
   smallest parameter count that does is reported, or "> N" when none does below the dense size N.
   Once within ``tol`` the search shrinks its network (lowers bonds, splits cores whose matricisation is
   low-rank into internal cores, merges internal cores): that is how it reaches the Tucker tensor's 242
   parameters, which no network of one core per mode holds (the best, a star around the rank-4 mode,
   has 322).

3. **Completion.** Each LIVE image with ``MISSING`` (90%) of its entries hidden (a uniform draw seeded
   with ``MASK_SEED``; the hidden entries are NaN in what the fits see). The search
   ``tn(x, mask=observed, time_limit=..., seed=0)`` (its defaults: bonds scored on a held-out tenth of
   the observed entries, no budget; it stops when the held-out error has not dropped for three steps)
   against TT-ALS and TR-ALS (``tn_als`` on the observed entries, up to ``COMPLETION_SWEEPS`` sweeps) at
   the largest uniform rank whose parameters do not exceed the search's, started from the TT-SVD / padded
   TR-SVD (:func:`ring_start`) of the tensor with the hidden entries set to zero. Errors are relative, on
   the hidden entries. The target: a lower error than both, in under 60 s.

The benchmark runs torch on one thread by default (``--threads``): this machine has two cores and is
shared, and with another process busy on one of them a two-thread search stalled on every small
contraction (in one measurement it grew to 344 parameters in 55 s against over 8,000 on one thread).

Usage::

    python benchmarks/tn_search.py                     # all three tables (about 25 min)
    python benchmarks/tn_search.py --record            # and append them to benchmarks/RESULTS.md
    python benchmarks/tn_search.py --quick             # Image_A at 2048 only, one planted seed: a smoke run
    python benchmarks/tn_search.py --images A C --budgets 4096 --time-limit 30
    python benchmarks/tn_search.py --tables planted --seeds 5
    python benchmarks/tn_search.py --tables completion --images A
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorly as tl
import torch
from _timing import record
from tensorly.decomposition import parafac, tensor_ring, tensor_train
from tensorly.decomposition import tucker as tl_tucker

import lowrank
from lowrank.decompose.factorizations import contract_chain

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "live"
IMAGES = ("Image_A", "Image_B", "Image_C", "Image_D")
BUDGETS = (2048, 4096, 8192)
TOL = 1e-4  # the planted-structure search's tolerance
TARGET_SECONDS = 60  # the time target per image and budget
# The search's options at a budget: ranks grow by half (a bond of rank r by floor(r / 2)) so that 8192
# parameters are reached in about 40 steps, one ALS sweep scores a bond and three refit all cores.
LIVE_OPTIONS = {"growth": 0.5, "candidate_sweeps": 1, "n_sweeps": 3}
MISSING = 0.9  # the fraction of entries hidden in the completion table
MASK_SEED = 1  # not the search's seed 0: the same stream would draw its held-out entries among the hidden ones
COMPLETION_OPTIONS: dict[str, object] = {}  # the completion search runs with tn's defaults
COMPLETION_SWEEPS = 100  # most TT-/TR-ALS sweeps in the completion table (tn_als stops at a 1e-6 relative change)
CP_ITERS = 200  # CP-ALS iterations (tensorly's default is 100, whose LIVE errors are 1-3% higher)
TR_SWEEPS = 50  # most ring-ALS sweeps at a budget (20 leave the LIVE errors 2-6% higher than 80)
SCAN_TOLS = 24  # tolerances tried for non-uniform TT / Tucker ranks at a budget
TR_SWEEPS_PLANTED = 100  # ring ALS sweeps when growing ranks to a small target error
FORMATS = ("CP", "Tucker", "TT", "TR")
# CP-ALS and ring ALS at a budget compute in float32: 7x and 2.5x faster than float64 on the LIVE images
# here, with the same errors to 3 digits. Planted tensors, fitted to 1e-4, stay in float64.
BUDGET_DTYPE = torch.float32


@dataclass
class Fit:
    """One fixed-format fit: its format, how it was obtained, parameters, relative error and seconds."""

    fmt: str
    how: str
    params: int
    error: float
    seconds: float


def relative_error(x: torch.Tensor, approx: torch.Tensor) -> float:
    """``||x - approx|| / ||x||`` in float64."""
    return float(torch.linalg.vector_norm(x.double() - approx.double()) / torch.linalg.vector_norm(x.double()))


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``fn()`` and the seconds it took."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# Parameter counts and the largest rank that fits a budget


def cp_params(shape: Sequence[int], r: int) -> int:
    """CP parameters with the weights absorbed into the factors."""
    return r * sum(shape)


def chain_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of a train/ring with bond ranks ``ranks`` (``N + 1`` of them, core k is (r_k, n_k, r_k+1))."""
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))


def tucker_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Core plus factor parameters of a Tucker decomposition."""
    return math.prod(ranks) + sum(n * r for n, r in zip(shape, ranks))


def tt_bounds(shape: Sequence[int]) -> list[int]:
    """Largest meaningful rank of each internal TT bond: the rank of the unfolding it cuts."""
    return [min(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))]


def tt_uniform(shape: Sequence[int], r: int) -> list[int]:
    """All ``N + 1`` TT ranks for a uniform internal rank ``r``, capped by the unfolding bounds."""
    return [1, *(min(r, b) for b in tt_bounds(shape)), 1]


def tr_tensorly(shape: Sequence[int], r: int) -> list[int]:
    """Ring ranks ``(s, s, r, ..., r, s)`` that tensorly's TR-SVD accepts: ``s * s <= n_0``."""
    s = min(r, math.isqrt(shape[0]))
    return [s, s, *([r] * (len(shape) - 2)), s]


def largest(params_of: Callable[[int], int], budget: int) -> int | None:
    """Largest ``r >= 1`` with ``params_of(r) <= budget`` (``params_of`` nondecreasing), or None."""
    best, r, last = None, 1, -1
    while params_of(r) <= budget:
        best = r
        if params_of(r) == last:  # every rank is capped: growing r changes nothing
            break
        last, r = params_of(r), r + 1
    return best


# ---------------------------------------------------------------------------------------------------------
# Fixed-format fits


def quiet(fn: Callable[[], object]) -> object:
    """``fn()`` without tensorly's warnings (its SVD init pads ranks above a mode's size at random)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def fit_cp(x: torch.Tensor, r: int, dtype: torch.dtype = torch.float64) -> Fit:
    """Tensorly CP-ALS at rank ``r``, computed in ``dtype`` (the error is measured in float64)."""
    work = x.to(dtype)
    cp, seconds = timed(lambda: quiet(lambda: parafac(work, r, n_iter_max=CP_ITERS, init="svd", random_state=0)))
    return Fit("CP", f"tensorly parafac r={r}", r * sum(x.shape), relative_error(x, tl.cp_to_tensor(cp)), seconds)


def fit_tucker_uniform(x: torch.Tensor, r: int) -> Fit:
    """Tensorly Tucker (HOOI) at a uniform rank."""
    ranks = [min(r, n) for n in x.shape]
    tk, seconds = timed(lambda: tl_tucker(x, rank=ranks, random_state=0))
    params = tk.core.numel() + sum(f.numel() for f in tk.factors)
    return Fit("Tucker", f"tensorly tucker r={r}", params, relative_error(x, tl.tucker_to_tensor(tk)), seconds)


def fit_tt_uniform(x: torch.Tensor, r: int) -> Fit:
    """Tensorly TT-SVD at a uniform internal rank (capped by the unfolding bounds)."""
    tt, seconds = timed(lambda: tensor_train(x, tt_uniform(x.shape, r)))
    params = sum(c.numel() for c in tt.factors)
    return Fit("TT", f"tensorly tensor_train r={r}", params, relative_error(x, tl.tt_to_tensor(tt)), seconds)


def fit_tr_tensorly(x: torch.Tensor, r: int) -> Fit:
    """Tensorly TR-SVD at ranks ``(s, s, r, ..., r, s)``."""
    ranks = tr_tensorly(x.shape, r)
    tr, seconds = timed(lambda: tensor_ring(x, ranks))
    params = sum(c.numel() for c in tr.factors)
    return Fit(
        "TR", f"tensorly tensor_ring {tuple(ranks[:-1])}", params, relative_error(x, tl.tr_to_tensor(tr)), seconds
    )


def ring_start(x: torch.Tensor, r: int, seed: int = 0) -> list[torch.Tensor]:
    """Float64 cores of a uniform ring of rank ``r``, the start of a ring ALS.

    lowrank's TR-SVD at the ranks its bounds allow, padded with small random slices (1e-3 of each core's
    largest entry) to the uniform rank.
    """
    gen = torch.Generator().manual_seed(seed)
    cores = []
    for core in lowrank.decompose.tr(x.double(), r, method="svd", clip=True).cores:
        padded = 1e-3 * float(core.abs().max()) * torch.randn(r, core.shape[1], r, generator=gen, dtype=torch.float64)
        padded[: core.shape[0], :, : core.shape[2]] = core
        cores.append(padded)
    return cores


def ring_als(
    x: torch.Tensor, r: int, sweeps: int, target: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[lowrank.TR, int]:
    """A uniform ring of rank ``r`` fitted by ALS; returns the ring and the sweeps it took.

    Starts from lowrank's TR-SVD at the ranks its bounds allow, padded with small random slices to the
    uniform rank. Contractions run in ``dtype``; each core's least-squares problem is solved by the
    normal equations in float64. Stops after ``sweeps``, at ``target`` error (tracked through the normal
    equations, so only meaningful well above ``dtype``'s precision), or when a sweep lowers the error by
    under 0.01%.
    """
    n = x.ndim
    work = x.to(dtype)
    cores = [core.to(dtype) for core in ring_start(x, r, seed)]
    unfoldings = [work.permute([(k + i) % n for i in range(n)]).reshape(x.shape[k], -1) for k in range(n)]
    sq_norm = float(torch.sum(x.double() ** 2))
    previous, done = math.inf, 0
    while done < sweeps:
        done += 1
        for k in range(n):
            others = contract_chain([cores[(k + i) % n] for i in range(1, n)])  # (r_{k+1}, J, r_k)
            r_right, cols, r_left = others.shape
            design = others.permute(1, 2, 0).reshape(cols, r_left * r_right)
            gram, rhs = (design.T @ design).double(), (unfoldings[k] @ design).double()
            ridge = 1e-12 * float(torch.trace(gram)) / gram.shape[0] + 1e-300
            solution = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), rhs.T).T
            cores[k] = solution.reshape(-1, r_left, r_right).permute(1, 0, 2).to(dtype)
        sq_error = sq_norm - 2 * float(torch.sum(rhs * solution)) + float(torch.sum((solution @ gram) * solution))
        error = math.sqrt(max(sq_error, 0.0) / sq_norm)
        if error <= target or previous - error < 1e-4 * previous:
            break
        previous = error
    return lowrank.TR(tuple(c.to(x.dtype) for c in cores)), done


def fit_tr_uniform(
    x: torch.Tensor, r: int, sweeps: int = TR_SWEEPS, target: float = 0.0, dtype: torch.dtype = torch.float64
) -> Fit:
    """Uniform ring rank ``r`` by :func:`ring_als`."""
    (ring, done), seconds = timed(lambda: ring_als(x, r, sweeps, target, dtype=dtype))
    return Fit("TR", f"ring ALS r={r} ({done} sweeps)", ring.num_params, ring.relative_error(x), seconds)


def bisect_tol(x: torch.Tensor, fmt: str, budget: int) -> Fit | None:
    """Non-uniform ranks from ``lowrank.decompose.tt/tucker(x, tol=t)``, ``t`` bisected to fit ``budget``.

    Keeps the lowest-error fit within the budget among all tolerances tried (the parameter count is
    monotone in ``t`` but jumps, so the last one that fits may not be the best).
    """
    decompose = lowrank.decompose.tt if fmt == "TT" else lowrank.decompose.tucker
    name = "lowrank tt (TT-SVD)" if fmt == "TT" else "lowrank tucker (ST-HOSVD+HOOI)"
    lo, hi, best, seconds = math.log(1e-6), math.log(0.999), None, 0.0
    for _ in range(24):
        mid = (lo + hi) / 2
        f, s = timed(lambda mid=mid: decompose(x, tol=math.exp(mid)))
        seconds += s
        if f.num_params <= budget:
            hi = mid
            error = f.relative_error(x)
            if best is None or error < best.error:
                best = Fit(fmt, f"{name} tol={math.exp(mid):.3g}, ranks {f.ranks}", f.num_params, error, 0.0)
        else:
            lo = mid
    if best is not None:
        best.seconds = seconds  # the whole bisection
    return best


def scan_tol(x: torch.Tensor, fmt: str, budget: int) -> Fit | None:
    """Non-uniform ranks from ``lowrank.decompose.tt/tucker(x, cap, tol=t, clip=True)`` within ``budget``.

    The ranks a tolerance chooses jump (a first TT bond going from 3 to 2 shrinks every later one), so a
    tolerance alone often cannot use the budget: for each ``t`` on a log grid, the largest uniform cap on
    the ranks that fits is bisected, and the lowest-error fit of all is kept. ``t`` near zero gives the
    uniform-rank decomposition, a cap at the bounds the pure tolerance one.
    """
    decompose = lowrank.decompose.tt if fmt == "TT" else lowrank.decompose.tucker
    name = "lowrank tt (TT-SVD, capped)" if fmt == "TT" else "lowrank tucker (ST-HOSVD+HOOI, capped)"
    top = max(tt_bounds(x.shape)) if fmt == "TT" else max(x.shape)
    best, seconds = None, 0.0
    for tol in np.geomspace(1e-3, 0.95, SCAN_TOLS):
        lo, hi, fit = 1, top, None
        while lo <= hi:
            cap = (lo + hi) // 2
            f, s = timed(lambda cap=cap, tol=tol: decompose(x, cap, tol=float(tol), clip=True))
            seconds += s
            if f.num_params <= budget:
                fit, lo = f, cap + 1
            else:
                hi = cap - 1
        if fit is not None:
            error = fit.relative_error(x)
            if best is None or error < best.error:
                best = Fit(fmt, f"{name} tol={tol:.3g}, ranks {fit.ranks}", fit.num_params, error, 0.0)
    if best is not None:
        best.seconds = seconds  # the whole scan
    return best


def fixed_at_budget(x: torch.Tensor, budget: int) -> list[Fit]:
    """Every fixed-format candidate at ``budget`` parameters."""
    shape = tuple(x.shape)
    fits = []
    r = largest(lambda r: cp_params(shape, r), budget)
    if r:
        fits.append(fit_cp(x, r, BUDGET_DTYPE))
    r = largest(lambda r: tucker_params(shape, [min(r, n) for n in shape]), budget)
    if r:
        fits.append(fit_tucker_uniform(x, r))
    r = largest(lambda r: chain_params(shape, tt_uniform(shape, r)), budget)
    if r:
        fits.append(fit_tt_uniform(x, r))
    for fmt in ("Tucker", "TT"):
        for fit in (bisect_tol(x, fmt, budget), scan_tol(x, fmt, budget)):
            if fit:
                fits.append(fit)
    r = largest(lambda r: chain_params(shape, [r] * (len(shape) + 1)), budget)
    if r:
        fits.append(fit_tr_uniform(x, r, dtype=BUDGET_DTYPE))
    r = largest(lambda r: chain_params(shape, tr_tensorly(shape, r)), budget)
    if r:
        fits.append(fit_tr_tensorly(x, r))
    over = [f for f in fits if f.params > budget]
    if over:
        raise RuntimeError(f"fixed-format fits over the budget {budget}: {over}")
    return fits


def best_per_format(fits: list[Fit]) -> dict[str, Fit]:
    """The lowest-error fit of each format."""
    best: dict[str, Fit] = {}
    for f in fits:
        if f.fmt not in best or f.error < best[f.fmt].error:
            best[f.fmt] = f
    return best


def grow_to(x: torch.Tensor, target: float, cap: int) -> dict[str, Fit | None]:
    """The fewest-parameter fit of each format with error <= ``target`` and at most ``cap`` parameters.

    Uniform ranks grow one at a time (CP's on a grid growing by about 25%); TT and Tucker also get
    the non-uniform ranks TT-SVD / ST-HOSVD choose for ``tol=target``.
    """
    shape = tuple(x.shape)
    out: dict[str, Fit | None] = {}
    grows: dict[str, tuple[Callable[[int], int], Callable[[int], Fit]]] = {
        "CP": (lambda r: cp_params(shape, r), lambda r: fit_cp(x, r)),
        "Tucker": (lambda r: tucker_params(shape, [min(r, n) for n in shape]), lambda r: fit_tucker_uniform(x, r)),
        "TT": (lambda r: chain_params(shape, tt_uniform(shape, r)), lambda r: fit_tt_uniform(x, r)),
        "TR": (
            lambda r: chain_params(shape, [r] * (len(shape) + 1)),
            lambda r: fit_tr_uniform(x, r, TR_SWEEPS_PLANTED, target),
        ),
    }
    for fmt, (params_of, fit) in grows.items():
        found, r, last = None, 1, -1
        while params_of(r) <= cap and params_of(r) != last:
            f = fit(r)
            if f.error <= target:
                found = f
                break
            last = params_of(r)
            r = max(r + 1, round(r * 1.25)) if fmt == "CP" else r + 1
        out[fmt] = found
    for fmt, decompose, name in (
        ("TT", lowrank.decompose.tt, "TT-SVD tol"),
        ("Tucker", lowrank.decompose.tucker, "ST-HOSVD+HOOI tol"),
    ):
        f, seconds = timed(lambda decompose=decompose: decompose(x, tol=target))
        error = f.relative_error(x)
        if error <= target and f.num_params <= cap and (out[fmt] is None or f.num_params < out[fmt].params):
            out[fmt] = Fit(fmt, f"{name}, ranks {f.ranks}", f.num_params, error, seconds)
    return out


# ---------------------------------------------------------------------------------------------------------
# Planted structures


PLANTED = {
    "Tucker": "Tucker 7^5, ranks (2, 3, 4, 3, 2)",
    "TT": "TT 7^5, ranks (2, 3, 6, 5)",
    "TR": "TR 7^5, ranks (2, 3, 4, 5, 5)",
    "triangle": "triangle 0-1-2 + chain 2-3-4, 7^5, ranks 01:3 12:4 02:2 23:4 34:3",
}


def planted(kind: str, seed: int) -> tuple[torch.Tensor, int]:
    """A planted 7^5 tensor of the given structure (unit norm, float64) and the planted factors' parameter count."""
    gen = torch.Generator().manual_seed(seed)
    n = 7

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if kind == "Tucker":
        ranks = (2, 3, 4, 3, 2)
        cores = (randn(*ranks), *(randn(n, r) for r in ranks))
        x = torch.einsum("abcde,ia,jb,kc,ld,me->ijklm", *cores)
    elif kind in ("TT", "TR"):
        ranks = (1, 2, 3, 6, 5, 1) if kind == "TT" else (2, 3, 4, 5, 5, 2)
        cores = tuple(randn(ranks[k], n, ranks[k + 1]) for k in range(5))
        x = (lowrank.TT(cores) if kind == "TT" else lowrank.TR(cores)).to_tensor()
    elif kind == "triangle":
        r01, r12, r02, r23, r34 = 3, 4, 2, 4, 3
        cores = (randn(n, r01, r02), randn(r01, n, r12), randn(r02, r12, n, r23), randn(r23, n, r34), randn(r34, n))
        x = torch.einsum("iab,ajc,bckd,dle,em->ijklm", *cores)
    else:
        raise ValueError(kind)
    return x / torch.linalg.vector_norm(x), sum(c.numel() for c in cores)


# ---------------------------------------------------------------------------------------------------------
# The search


def run_search(x: torch.Tensor, **options: object) -> tuple[object, float, float]:
    """``lowrank.decompose.tn(x, **options)``: the network, its relative error and the seconds it took."""
    net, seconds = timed(lambda: lowrank.decompose.tn(x, **options))
    return net, net.relative_error(x), seconds


def load_image(name: str) -> torch.Tensor:
    """A LIVE image as a float64 4^8 tensor."""
    return torch.from_numpy(np.load(DATA / f"{name}.npz")["goal"])


def live_table(images: Sequence[str], budgets: Sequence[int], time_limit: float, max_steps: int | None) -> str:
    """Table 1: the search against the best fixed format at each budget."""
    rows = [
        "| image | budget | CP / Tucker / TT / TR error (best of each) | best fixed format | its params | its error "
        "| fixed fits time | search params | search error | search time | search steps | search ranks | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in images:
        x = load_image(name)
        for budget in budgets:
            fits = fixed_at_budget(x, budget)
            per_format = best_per_format(fits)
            best = min(per_format.values(), key=lambda f: f.error)
            errors = " / ".join(f"{per_format[fmt].error:.4f}" if fmt in per_format else "-" for fmt in FORMATS)
            fixed_time = sum(f.seconds for f in fits)
            cells = [
                name,
                f"{budget:,}",
                errors,
                f"{best.fmt}: {best.how}",
                f"{best.params:,}",
                f"{best.error:.4f}",
                f"{fixed_time:.1f} s",
            ]
            options = {"max_params": budget, "time_limit": time_limit, "seed": 0, **LIVE_OPTIONS}
            if max_steps is not None:
                options["max_steps"] = max_steps
            net, error, seconds = run_search(x, **options)
            misses = []
            if error >= best.error:
                misses.append("error")
            if seconds >= TARGET_SECONDS:
                misses.append("time")
            if net.num_params > budget:
                misses.append("over budget")
            met = "met" if not misses else "MISSED (" + ", ".join(misses) + ")"
            steps = str(len(net.log) - 1)
            cells += [f"{net.num_params:,}", f"{error:.4f}", f"{seconds:.1f} s", steps, edge_list(net.ranks), met]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def edge_list(ranks: Sequence[Sequence[int]]) -> str:
    """The edges of a symmetric rank matrix with rank above 1, as ``i-j:r``."""
    edges = [f"{i}-{j}:{ranks[i][j]}" for i in range(len(ranks)) for j in range(i + 1, len(ranks)) if ranks[i][j] > 1]
    return " ".join(edges) if edges else "(none)"


def missing_error(x: torch.Tensor, approx: torch.Tensor, observed: torch.Tensor) -> float:
    """The relative error on the entries that ``observed`` hides, in float64."""
    hidden = ~observed
    return relative_error(x[hidden], approx[hidden])


def chain_completion(x: torch.Tensor, observed: torch.Tensor, fmt: str, budget: int) -> Fit | None:
    """TT- or TR-ALS completion at the largest uniform rank within ``budget``; its error is on the hidden entries.

    ``tn_als`` fits the observed entries only (the hidden ones are NaN in what it sees), from the TT-SVD
    (TT) or the padded TR-SVD (:func:`ring_start`, TR) of the tensor with the hidden entries set to zero.
    """
    shape = tuple(x.shape)
    seen = x.masked_fill(~observed, float("nan"))
    filled = x.masked_fill(~observed, 0.0)
    if fmt == "TT":
        r = largest(lambda r: chain_params(shape, tt_uniform(shape, r)), budget)
        start = None if r is None else lowrank.decompose.tt(filled, r, clip=True)
    else:
        r = largest(lambda r: chain_params(shape, [r] * (len(shape) + 1)), budget)
        start = None if r is None else lowrank.TR(tuple(ring_start(filled, r)))
    if start is None:
        return None
    network = lowrank.decompose.TensorNetwork.from_chain(start)
    fitted, seconds = timed(
        lambda: lowrank.decompose.tn_als(seen, network, mask=observed, n_sweeps=COMPLETION_SWEEPS)
    )
    return Fit(fmt, f"{fmt}-ALS r={r}", fitted.num_params, missing_error(x, fitted.to_tensor(), observed), seconds)


def completion_table(images: Sequence[str], time_limit: float) -> str:
    """Table 3: completion of LIVE images with most entries hidden, the search against TT- and TR-ALS."""
    rows = [
        "| image | observed entries | search params | search error, hidden entries | search error, observed "
        "| search time | search steps | TT-ALS (uniform rank) | its params | its error, hidden | TR-ALS (uniform rank) "
        "| its params | its error, hidden | fixed fits time | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in images:
        x = load_image(name)
        draw = torch.rand(x.shape, generator=torch.Generator().manual_seed(MASK_SEED), dtype=torch.float64)
        observed = draw >= MISSING
        seen = x.masked_fill(~observed, float("nan"))
        options = {"mask": observed, "time_limit": time_limit, "seed": 0, **COMPLETION_OPTIONS}
        net, seconds = timed(lambda seen=seen, options=options: lowrank.decompose.tn(seen, **options))
        approx = net.to_tensor()
        search_error = missing_error(x, approx, observed)
        cells = [
            name,
            f"{int(observed.sum()):,} of {x.numel():,}",
            f"{net.num_params:,}",
            f"{search_error:.4f}",
            f"{relative_error(x[observed], approx[observed]):.4f}",
            f"{seconds:.1f} s",
            str(len(net.log) - 1),
        ]
        fits = [chain_completion(x, observed, fmt, net.num_params) for fmt in ("TT", "TR")]
        for fit in fits:
            cells += ["-", "-", "-"] if fit is None else [fit.how, f"{fit.params:,}", f"{fit.error:.4f}"]
        cells.append(f"{sum(f.seconds for f in fits if f is not None):.1f} s")
        misses = []
        if any(f is not None and search_error >= f.error for f in fits):
            misses.append("error")
        if seconds >= TARGET_SECONDS:
            misses.append("time")
        cells.append("met" if not misses else "MISSED (" + ", ".join(misses) + ")")
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def planted_table(seeds: int, time_limit: float, max_steps: int | None) -> str:
    """Table 2: planted-structure recovery by the search against fixed formats grown to its error."""
    rows = [
        "| planted network | planted params | search success | search params (median) | search error (median) "
        "| search time (median) | search steps (median) | TT params | TR params | Tucker params | CP params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, title in PLANTED.items():
        results, fixed = [], {fmt: [] for fmt in FORMATS}
        for seed in range(seeds):
            x, planted_params = planted(kind, seed)
            options = {"tol": TOL, "time_limit": time_limit, "seed": seed}
            if max_steps is not None:
                options["max_steps"] = max_steps
            net, error, seconds = run_search(x, **options)
            success = error < TOL and net.num_params <= planted_params
            results.append((net.num_params, error, seconds, success, len(net.log) - 1))
            for fmt, fit in grow_to(x, max(error, TOL), x.numel()).items():
                fixed[fmt].append(fit)
        cells = [
            title,
            f"{planted_params:,}",
            f"{sum(r[3] for r in results)}/{seeds}",
            f"{statistics.median(r[0] for r in results):,.0f}",
            f"{statistics.median(r[1] for r in results):.2e}",
            f"{statistics.median(r[2] for r in results):.1f} s",
            f"{statistics.median(r[4] for r in results):g}",
        ]
        cap = x.numel()
        for fmt in ("TT", "TR", "Tucker", "CP"):
            cells.append(median_fit(fixed[fmt], cap))
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def median_fit(fits: list[Fit | None], cap: int) -> str:
    """The median-parameter fit over seeds (a miss counts as above the cap), with how it was found."""
    ordered = sorted(fits, key=lambda f: math.inf if f is None else f.params)
    mid = ordered[(len(ordered) - 1) // 2]
    if mid is None:
        return f"> {cap:,}"
    reached = sum(f is not None for f in fits)
    return f"{mid.params:,} ({mid.how}; {reached}/{len(fits)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="Image_A at budget 2048 and one planted seed (smoke run)")
    parser.add_argument("--images", nargs="+", default=None, help="LIVE images, e.g. A C or Image_B (default: all)")
    parser.add_argument(
        "--budgets", nargs="+", type=int, default=None, help="parameter budgets (default: 2048 4096 8192)"
    )
    parser.add_argument("--time-limit", type=float, default=55.0, help="tn(time_limit=...) in seconds (default 55)")
    parser.add_argument("--max-steps", type=int, default=None, help="tn(max_steps=...) (default: tn's own)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per planted structure (default 3)")
    parser.add_argument(
        "--tables", choices=("live", "planted", "completion", "all"), default="all", help="which tables to run"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the module docstring)")
    args = parser.parse_args()
    tl.set_backend("pytorch")
    torch.set_num_threads(args.threads)
    images = [name if name.startswith("Image_") else f"Image_{name}" for name in args.images or IMAGES]
    unknown = sorted(set(images) - set(IMAGES))
    if unknown:
        parser.error(f"unknown images {unknown}; choose from {', '.join(IMAGES)}")
    budgets = args.budgets or BUDGETS
    seeds = args.seeds
    if args.quick:
        images, budgets, seeds = images[:1] if args.images else ["Image_A"], args.budgets or [2048], 1
    tables = []
    start = time.perf_counter()
    if args.tables in ("live", "all"):
        table = live_table(images, budgets, args.time_limit, args.max_steps)
        print("\n" + table + "\n")
        tables.append(("tn search: LIVE images at a parameter budget", table, live_note(args.time_limit)))
    if args.tables in ("planted", "all"):
        table = planted_table(seeds, args.time_limit, args.max_steps)
        print("\n" + table + "\n")
        tables.append(("tn search: planted structures", table, planted_note(seeds, args.time_limit)))
    if args.tables in ("completion", "all"):
        table = completion_table(images, args.time_limit)
        print("\n" + table + "\n")
        tables.append(("tn search: completion of LIVE images", table, completion_note(args.time_limit)))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.record:
        for title, table, note in tables:
            record(title, table, note)


def options(values: dict[str, object]) -> str:
    """Keyword arguments as Python source: ``a=1, b=2``."""
    return ", ".join(f"{key}={value!r}" for key, value in values.items())


def live_note(time_limit: float) -> str:
    """What the LIVE table measures."""
    return (
        f"tensorly {tl.__version__}. LIVE images as float64 4^8 tensors; relative Frobenius errors. Search: "
        f"`lowrank.decompose.tn(x, max_params=budget, time_limit={time_limit:g}, seed=0, {options(LIVE_OPTIONS)})`. "
        "Fixed formats at the "
        f"largest rank within the budget: tensorly parafac ({CP_ITERS} iterations; weights absorbed), tucker, "
        "tensor_train and tensor_ring, uniform ring ALS (TR-SVD start, up to "
        f"{TR_SWEEPS} sweeps; CP and ring in float32), and "
        "non-uniform TT-SVD / ST-HOSVD+HOOI ranks (tolerance bisected to the budget, or a tolerance grid with "
        "the largest rank cap that fits); the best of each "
        f"format is kept. 'met' needs a lower error than the best fixed format, at most the budget, under "
        f"{TARGET_SECONDS} s."
    )


def planted_note(seeds: int, time_limit: float) -> str:
    """What the planted table measures."""
    return (
        f"tensorly {tl.__version__}. Unit-norm float64 7^5 tensors from random Gaussian factors, seeds "
        f"0..{seeds - 1} (tensor and search seed alike). Search: "
        f"`lowrank.decompose.tn(x, tol={TOL:g}, time_limit={time_limit:g}, seed=seed)`; success = error "
        f"< {TOL:g} with at most the planted parameters. Fixed formats: the fewest parameters reaching the "
        f"search's error or {TOL:g}, whichever is larger, by growing uniform ranks (CP on a 25% grid) or, for "
        "TT and Tucker, TT-SVD / ST-HOSVD at that tolerance; the median over seeds, '>' the dense size when "
        "none does. Within tol the search lowers bonds and splits cores into internal ones (its defaults "
        "prune=True, split=True): the planted Tucker's 242 parameters need its one internal core (a network "
        "of one core per mode needs 322 at best)."
    )


def completion_note(time_limit: float) -> str:
    """What the completion table measures."""
    search = options({"mask": "observed", "time_limit": time_limit, "seed": 0, **COMPLETION_OPTIONS}).replace("'", "")
    return (
        f"LIVE images as float64 4^8 tensors with {MISSING:.0%} of the entries hidden (uniform draw, seed "
        f"{MASK_SEED}); relative errors on the hidden entries. Search: `lowrank.decompose.tn(x, {search})` "
        "(bonds scored on a held-out tenth of the observed entries; it keeps the network of the lowest "
        "held-out error). TT-ALS and TR-ALS: `lowrank.decompose.tn_als(x, TensorNetwork.from_chain(start), "
        f"mask=observed, n_sweeps={COMPLETION_SWEEPS})` at the largest uniform rank within the search's "
        "parameters, started from the TT-SVD / padded TR-SVD of the tensor with the hidden entries set to "
        f"zero. 'met' needs a lower hidden-entry error than both, under {TARGET_SECONDS} s."
    )


if __name__ == "__main__":
    main()
