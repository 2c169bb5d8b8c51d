"""Decomposition speed and error, side by side with tensorly in one process.

Each case runs tensorly (PyTorch backend, its default options) and lowrank on
the same tensor, alternating the two on every repeat so that both see the same
machine load, and reports median times, relative errors and the speed ratio.

    python benchmarks/decompose.py            # print the table
    python benchmarks/decompose.py --record   # and append it to benchmarks/RESULTS.md
    python benchmarks/decompose.py --quick    # smaller tensors, for a smoke run
    python benchmarks/decompose.py --only Tucker --rounds 3   # the Tucker cases, three tables in one run
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import tensorly as tl
import torch
from _timing import alternate, record
from tensorly.decomposition import parafac, partial_tucker, tensor_train
from tensorly.decomposition import tucker as tl_tucker

import lowrank


@dataclass
class Case:
    """One benchmark: two timed callables, the untimed functions that densify their results, the target."""

    name: str
    x: torch.Tensor
    anchor_name: str
    anchor: Callable[[], object]
    anchor_dense: Callable[[object], torch.Tensor]
    ours: Callable[[], object]
    target_speedup: float
    repeats: int

    def ours_dense(self, result: object) -> torch.Tensor:
        """Our results are lowrank containers."""
        return result.to_tensor()


def relative_error(x: torch.Tensor, approx: torch.Tensor) -> float:
    """``||x - approx|| / ||x||`` in float64."""
    return float(torch.linalg.norm((x.double() - approx.double()).flatten()) / torch.linalg.norm(x.double().flatten()))


def planted_tucker(shape: tuple[int, ...], rank: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """A Tucker tensor of multilinear rank ``rank`` plus relative Gaussian noise ``noise``."""
    x = torch.randn((rank,) * len(shape), generator=gen)
    for mode, dim in enumerate(shape):
        factor = torch.linalg.qr(torch.randn(dim, rank, generator=gen)).Q
        x = torch.movedim(torch.tensordot(factor, x, dims=([1], [mode])), 0, mode)
    return add_noise(x, noise, gen).contiguous()


def add_noise(x: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    """``x`` plus Gaussian noise of relative norm ``noise``."""
    e = torch.randn(x.shape, generator=gen)
    return x + noise * torch.linalg.norm(x.flatten()) / torch.linalg.norm(e.flatten()) * e


def cases(quick: bool) -> list[Case]:
    """The benchmark cases of issue 2 (smaller ones with ``quick``)."""
    gen = torch.Generator().manual_seed(0)
    n = 80 if quick else 200
    tucker_x = planted_tucker((n, n, n), 20, 0.01, gen)
    conv = torch.randn(256, 256, 3, 3, generator=gen)
    m = 50 if quick else 100
    cp_factors = [torch.randn(m, 16, generator=gen) for _ in range(3)]
    cp_x = add_noise(torch.einsum("ir,jr,kr->ijk", *cp_factors), 0.01, gen)
    tt_ranks = [1, 8, 16, 16, 8, 1]
    cores = [torch.randn(tt_ranks[k], 16, tt_ranks[k + 1], generator=gen) for k in range(5)]
    tt_x = add_noise(lowrank.TT(tuple(cores)).to_tensor(), 0.01, gen)
    side = 1024 if quick else 4096
    u = torch.linalg.qr(torch.randn(side, side, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(side, side, generator=gen)).Q
    spectrum = 1.0 / torch.arange(1, side + 1, dtype=torch.float32)
    matrix = (u * spectrum) @ v.T
    svd_rank = side // 16

    def partial_dense(result: object) -> torch.Tensor:
        (core, factors), _ = result
        return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])

    def truncated_dense(result: tuple[torch.Tensor, ...]) -> torch.Tensor:
        u_, s_, vh_ = result
        return (u_[:, :svd_rank] * s_[:svd_rank]) @ vh_[:svd_rank]

    tl_cp_error = relative_error(cp_x, tl.cp_to_tensor(parafac(cp_x, 16)))
    return [
        Case(f"Tucker/HOOI {n}^3, rank 20, 1% noise", tucker_x, "tensorly tucker",
             lambda: tl_tucker(tucker_x, rank=[20, 20, 20]), tl.tucker_to_tensor,
             lambda: lowrank.decompose.tucker(tucker_x, 20), 30.0, 5),
        Case("Tucker-2 conv 256x256x3x3, ranks (64, 64)", conv, "tensorly partial_tucker",
             lambda: partial_tucker(conv, rank=[64, 64], modes=[0, 1]), partial_dense,
             lambda: lowrank.decompose.tucker(conv, (64, 64), modes=(0, 1)), 20.0, 5),
        Case("Tucker-2 conv, as above, HOOI stopped after 2 sweeps (n_iter_max=2)", conv, "tensorly partial_tucker",
             lambda: partial_tucker(conv, rank=[64, 64], modes=[0, 1]), partial_dense,
             lambda: lowrank.decompose.tucker(conv, (64, 64), modes=(0, 1), n_iter_max=2), 20.0, 5),
        Case(f"CP-ALS {m}^3, rank 16, to tensorly's 100-iteration error (+1%)", cp_x, "tensorly parafac",
             lambda: parafac(cp_x, 16), tl.cp_to_tensor,
             lambda: lowrank.decompose.cp(cp_x, 16, tol=tl_cp_error * 1.01, n_iter_max=1000), 2.0, 5),
        Case("TT-SVD 16^5, ranks (8, 16, 16, 8), 1% noise", tt_x, "tensorly tensor_train",
             lambda: tensor_train(tt_x, tt_ranks), tl.tt_to_tensor,
             lambda: lowrank.decompose.tt(tt_x, tt_ranks), 5.0, 7),
        Case(f"SVD {side}x{side} rank {svd_rank}, 1/i spectrum: randomized", matrix, "torch.linalg.svd (full)",
             lambda: torch.linalg.svd(matrix, full_matrices=False), truncated_dense,
             lambda: lowrank.decompose.svd(matrix, svd_rank), 5.0, 3),
    ]


def measure(case: Case) -> dict[str, float]:
    """Median seconds of both sides (alternating, after a warm-up) and the relative error of each result.

    Only the decompositions are timed; rebuilding the dense tensors to measure the errors is not.
    """
    times = alternate({"anchor": case.anchor, "ours": case.ours}, case.repeats)
    errors = {side: relative_error(case.x, getattr(case, side + "_dense")(getattr(case, side)())) for side in times}
    return {"anchor_t": times["anchor"], "ours_t": times["ours"], "anchor_e": errors["anchor"],
            "ours_e": errors["ours"], "speedup": times["anchor"] / times["ours"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="smaller tensors (a smoke run, not the targets)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--rounds", type=int, default=1, help="measure the cases this many times, a table each")
    args = parser.parse_args()
    tl.set_backend("pytorch")
    for _ in range(args.rounds):
        table(args)


def table(args: argparse.Namespace) -> None:
    """Measure the selected cases once, print their table, and record it if asked."""
    rows = [
        "| case | anchor | anchor median | lowrank median | speed-up | target | anchor error | lowrank error |"
        " error ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in (c for c in cases(args.quick) if args.only in c.name):
        r = measure(case)
        met = "met" if r["speedup"] >= case.target_speedup and r["ours_e"] <= 1.01 * r["anchor_e"] else "MISSED"
        rows.append(
            f"| {case.name} | {case.anchor_name} | {r['anchor_t'] * 1e3:.1f} ms | {r['ours_t'] * 1e3:.1f} ms "
            f"| {r['speedup']:.1f}x | >= {case.target_speedup:g}x ({met}) | {r['anchor_e']:.5f} "
            f"| {r['ours_e']:.5f} | {r['ours_e'] / r['anchor_e']:.4f} |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(rows)
    print("\n" + text)
    if args.record:
        record("decompose", text, f"tensorly {tl.__version__}. Medians of alternating repeats in one process; "
               "errors are relative Frobenius errors; 'met' needs the speed-up and an error at most 1% above the "
               "anchor's.")


if __name__ == "__main__":
    main()
