"""Whole-model compression of the bundled MiniLM: compression time and inference speed, side by side.

1. ``lowrank.compress(model, ratio=0.5)`` on MiniLM's 36 encoder linears against a
   naive loop of ``torch.linalg.svd`` over the same layers at the same ranks, in
   the same run: median seconds and the relative weight error of both.
2. Inference of the compressed model against the dense one, batch 32 x 128 tokens.

    python benchmarks/compress.py            # print the tables
    python benchmarks/compress.py --record   # and append them to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from _timing import alternate, record

import lowrank
from lowrank.nn import LowRankLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from minilm_task import checkpoint_dir, retrieval_pairs, tokenizer  # noqa: E402


def naive_svd_loop(model: torch.nn.Module, ranks: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The baseline: full ``torch.linalg.svd`` of each weight, truncated to the same rank."""
    factors = {}
    for name, rank in ranks.items():
        weight = model.get_submodule(name).weight.detach()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        factors[name] = (u[:, :rank] * s[:rank], vh[:rank])
    return factors


def weight_error(dense: torch.nn.Module, approximations: dict[str, torch.Tensor]) -> float:
    """Relative Frobenius error over all approximated weights together."""
    num = den = 0.0
    for name, approx in approximations.items():
        weight = dense.get_submodule(name).weight.detach().double()
        approx = approx.detach()
        num += float(torch.sum((weight - approx.double()) ** 2))
        den += float(torch.sum(weight**2))
    return (num / den) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = lowrank.io.load_pretrained(checkpoint_dir())
    compressed = copy.deepcopy(dense)
    encoder = ["encoder.*"]
    report = lowrank.compress(compressed, ratio=args.ratio, include=encoder, progress=False)
    ranks = {row.name: row.rank for row in report.layers if row.replaced}

    copies = [copy.deepcopy(dense) for _ in range(args.repeats + 1)]
    times = alternate(
        {
            "lowrank.compress": lambda: lowrank.compress(copies.pop(), ratio=args.ratio, include=encoder,
                                                         progress=False),
            "torch.linalg.svd loop": lambda: naive_svd_loop(dense, ranks),
        },
        args.repeats,
    )
    ours = {name: compressed.get_submodule(name).weight for name in ranks}
    baseline = {name: u @ vh for name, (u, vh) in naive_svd_loop(dense, ranks).items()}
    ours_error, base_error = weight_error(dense, ours), weight_error(dense, baseline)
    speedup = times["torch.linalg.svd loop"] / times["lowrank.compress"]
    met = "met" if speedup >= 3 and ours_error <= 1.01 * base_error else "MISSED"
    table1 = "\n".join([
        "| job | lowrank.compress | torch.linalg.svd loop | speed-up | target | lowrank error | loop error |",
        "|---|---|---|---|---|---|---|",
        f"| MiniLM {len(ranks)} encoder linears, ratio {args.ratio} | {times['lowrank.compress'] * 1e3:.1f} ms "
        f"| {times['torch.linalg.svd loop'] * 1e3:.1f} ms | {speedup:.2f}x | >= 3x ({met}) | {ours_error:.5f} "
        f"| {base_error:.5f} |",
    ])
    print(table1, flush=True)

    tok = tokenizer()
    texts = [document for _, document in retrieval_pairs()[:32]]
    batch = tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        times = alternate({"dense": lambda: dense(**batch), "compressed": lambda: compressed(**batch)}, args.repeats)
    speedup = times["dense"] / times["compressed"]
    kept = sum(p.numel() for p in compressed.parameters()) / sum(p.numel() for p in dense.parameters())
    table2 = "\n".join([
        "| model | forward, batch 32 x 128 tokens | speed-up | target | parameters (whole model) |",
        "|---|---|---|---|---|",
        f"| dense MiniLM | {times['dense'] * 1e3:.1f} ms | 1.00x | | 100% |",
        f"| lowrank.compress ratio {args.ratio}, encoder linears | {times['compressed'] * 1e3:.1f} ms | {speedup:.2f}x "
        f"| >= 1.75x ({'met' if speedup >= 1.75 else 'MISSED'}) | {kept:.1%} |",
    ])
    print("\n" + table2)
    n_low_rank = sum(isinstance(m, LowRankLinear) for m in compressed.modules())
    if args.record:
        record("compress: MiniLM compression time", table1,
               "Medians of alternating repeats in one process; errors are relative Frobenius errors over all "
               "compressed weights; 'met' needs the speed-up and an error at most 1% above the loop's.")
        record("compress: MiniLM inference", table2,
               f"Medians of alternating repeats in one process, torch.no_grad(); {n_low_rank} LowRankLinear layers.")


if __name__ == "__main__":
    main()
