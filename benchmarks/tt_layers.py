"""TT-matrix linear layers: lowrank's TTLinear against tensorly-torch's FactorizedLinear, side by side.

Each case builds a ``TTLinear`` and a ``tltorch.FactorizedLinear(factorization='blocktt',
implementation='factorized')`` (tensorly-torch's TT-matrix; version 0.5 has no ``'tt'``
factorization for linear layers) with the same tensorized shapes and the same ranks, so
the same cores ``(r_k, m_k, n_k, r_{k+1})`` and an equal parameter count, and copies our
cores into theirs so that both compute the same map. The forward passes on a batch of
256 tokens (shape ``(8, 32, in_features)``) run under ``torch.no_grad()``, alternating
with each other and with the dense ``nn.Linear`` of the same weight on every repeat;
the table reports medians and the speed ratio.

tensorly-torch's forward is one ``torch.einsum`` over the input and all cores, whose
``opt_einsum`` path torch recomputes on every call. Where the train costs more
multiply-accumulates than the dense product (the "MACs / dense" column above 1), the
cheapest path contracts the cores into the dense weight first, which TTLinear never does.

    python benchmarks/tt_layers.py            # print the table
    python benchmarks/tt_layers.py --record   # and append it to benchmarks/RESULTS.md
    python benchmarks/tt_layers.py --threads 1   # one thread: steadier where other jobs share the cores
"""

from __future__ import annotations

import argparse
import math
import warnings
from functools import partial

import tltorch
import torch
from _timing import alternate, record

from lowrank.nn.tt import TTLinear

# (in_shape, out_shape, rank): 1024 -> 1024 in five and in three cores, and BERT's 768 -> 3072 FFN layer.
CASES = [
    ((4, 4, 4, 4, 4), (4, 4, 4, 4, 4), 4),
    ((4, 4, 4, 4, 4), (4, 4, 4, 4, 4), 8),
    ((8, 8, 16), (8, 8, 16), 8),
    ((8, 8, 16), (8, 8, 16), 16),
    ((8, 8, 12), (12, 16, 16), 8),
    ((8, 8, 12), (12, 16, 16), 16),
]
TOKENS = (8, 32)


def build(in_shape: tuple[int, ...], out_shape: tuple[int, ...], rank: int) -> tuple[TTLinear, torch.nn.Module]:
    """Our layer with random cores (unit-variance outputs) and tensorly-torch's with the same cores and bias."""
    ours = TTLinear(in_shape, out_shape, rank)
    with torch.no_grad():
        for core in ours.cores:
            core.normal_(0.0, (core.shape[0] * core.shape[2]) ** -0.5)
        ours.bias.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = tltorch.FactorizedLinear(
            in_tensorized_features=in_shape,
            out_tensorized_features=out_shape,
            factorization="blocktt",
            rank=rank,
            implementation="factorized",
        )
    with torch.no_grad():
        for factor, core in zip(theirs.weight.factors, ours.cores, strict=True):
            factor.copy_(core)
        theirs.bias.copy_(ours.bias)
    return ours, theirs


def row(in_shape: tuple[int, ...], out_shape: tuple[int, ...], rank: int, repeats: int) -> str:
    """Time one case and format its table row."""
    ours, theirs = build(in_shape, out_shape, rank)
    dense = ours.to_dense()
    x = torch.randn(*TOKENS, ours.in_features)
    with torch.no_grad():
        reference = dense(x)
        for name, layer in (("TTLinear", ours), ("tltorch", theirs)):
            error = float(torch.linalg.norm(layer(x) - reference) / torch.linalg.norm(reference))
            if error > 1e-4:
                raise RuntimeError(f"{name} disagrees with the dense layer: relative error {error:.2e}")
        runs = {"ours": partial(ours, x), "theirs": partial(theirs, x), "dense": partial(dense, x)}
        times = alternate(runs, repeats, warmup=3)
    tokens = math.prod(TOKENS)
    macs = ours.flops(tuple(x.shape)) / (tokens * ours.in_features * ours.out_features)
    groups, reverse = ours.contraction_order(tokens)
    speedup = times["theirs"] / times["ours"]
    order = " ".join("(" + "".join(str(k + 1) for k in group) + ")" for group in groups)
    return (
        f"| {ours.in_features} -> {ours.out_features} | {in_shape} -> {out_shape} | {rank} | {ours.num_params:,} "
        f"| {sum(p.numel() for p in theirs.parameters()):,} | {times['ours'] * 1e3:.2f} ms "
        f"| {times['theirs'] * 1e3:.2f} ms | {speedup:.2f}x ({'met' if speedup > 1 else 'MISSED'}) "
        f"| {times['dense'] * 1e3:.2f} ms "
        f"| {macs:.2f} | {order}, {'right to left' if reverse else 'left to right'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [
        "| layer | shapes (in -> out) | rank | params TTLinear | params tltorch | TTLinear | tltorch blocktt "
        "| speed-up (target > 1) | dense nn.Linear | TTLinear MACs / dense | TTLinear contraction |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        rows.append(row(*case, args.repeats))
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    if args.record:
        record(
            "tt_layers",
            table,
            f"tensorly-torch {tltorch.__version__}. Forward of {math.prod(TOKENS)} tokens (input {TOKENS} x "
            "in_features) under torch.no_grad(), medians of alternating repeats in one process; speed-up = "
            "tltorch time / TTLinear time; equal ranks give both layers the same cores, hence equal parameter "
            "counts (bias included). 'TTLinear contraction' is the core grouping and sweep direction TTLinear's "
            "forward chose (cores merged within a group, never all of them).",
        )


if __name__ == "__main__":
    main()
