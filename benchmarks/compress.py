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
from lowrank.nn import LowRankLinear, fuse_shared_inputs

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


def linear_share_table(dense: torch.nn.Module, compressed: torch.nn.Module, fused: torch.nn.Module, tokens: int,
                       repeats: int) -> str:
    """Times of the linear layers of block 0, dense and compressed, and of Q/K/V with the first factors fused."""
    names = {"query, key, value": ["attention.self.query", "attention.self.key", "attention.self.value"],
             "attention output": ["attention.output.dense"], "intermediate": ["intermediate.dense"],
             "output": ["output.dense"]}
    prefix = "encoder.layer.0."
    runs, rows = {}, []
    with torch.no_grad():
        for label, layers in names.items():
            width = dense.get_submodule(prefix + layers[0]).in_features
            x = torch.randn(tokens, width)
            runs[f"{label}, dense"] = lambda x=x, ls=layers: [dense.get_submodule(prefix + n)(x) for n in ls]
            runs[f"{label}, low-rank"] = lambda x=x, ls=layers: [compressed.get_submodule(prefix + n)(x) for n in ls]
        x = torch.randn(tokens, dense.get_submodule(prefix + names["query, key, value"][0]).in_features)
        runs["query, key, value, first factors fused"] = lambda: [
            fused.get_submodule(prefix + n)(x) for n in names["query, key, value"]]
        times = alternate(runs, repeats)
    dense_total = sum(times[f"{label}, dense"] for label in names)
    low_total = sum(times[f"{label}, low-rank"] for label in names)
    for label in names:
        rows.append(f"| {label} | {times[f'{label}, dense'] * 1e3:.2f} ms | {times[f'{label}, low-rank'] * 1e3:.2f} ms "
                    f"| {times[f'{label}, dense'] / times[f'{label}, low-rank']:.2f}x |")
    fused_time = times["query, key, value, first factors fused"]
    rows.append(f"| query, key, value, first factors fused | | {fused_time * 1e3:.2f} ms | "
                f"{times['query, key, value, dense'] / fused_time:.2f}x (unfused "
                f"{times['query, key, value, dense'] / times['query, key, value, low-rank']:.2f}x) |")
    rows.append(f"| all linears of the block | {dense_total * 1e3:.2f} ms | {low_total * 1e3:.2f} ms | "
                f"{dense_total / low_total:.2f}x |")
    return "\n".join(["| layers of encoder.layer.0 | dense | low-rank | speed-up |", "|---|---|---|---|", *rows])


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
    fused = copy.deepcopy(compressed)
    fused_groups = fuse_shared_inputs(fused, **tok(texts[:2], padding=True, return_tensors="pt"))
    with torch.no_grad():
        times = alternate({"dense": lambda: dense(**batch), "compressed": lambda: compressed(**batch),
                           "fused": lambda: fused(**batch)}, args.repeats)
        fused_diff = float((fused(**batch).last_hidden_state - compressed(**batch).last_hidden_state).abs().max())
    kept = sum(p.numel() for p in compressed.parameters()) / sum(p.numel() for p in dense.parameters())
    rows = []
    for label, key in ((f"lowrank.compress ratio {args.ratio}, encoder linears", "compressed"),
                       (f"the same + lowrank.nn.fuse_shared_inputs ({len(fused_groups)} Q/K/V groups, outputs "
                        f"within {fused_diff:.0e})", "fused")):
        speedup = times["dense"] / times[key]
        rows.append(f"| {label} | {times[key] * 1e3:.1f} ms | {speedup:.2f}x "
                    f"| >= 1.75x ({'met' if speedup >= 1.75 else 'MISSED'}) | {kept:.1%} |")
    table2 = "\n".join([
        "| model | forward, batch 32 x 128 tokens | speed-up | target | parameters (whole model) |",
        "|---|---|---|---|---|",
        f"| dense MiniLM | {times['dense'] * 1e3:.1f} ms | 1.00x | | 100% |",
        *rows,
    ])
    print("\n" + table2)
    table3 = linear_share_table(dense, compressed, fused, batch["input_ids"].numel(), args.repeats)
    print("\n" + table3)
    n_low_rank = sum(isinstance(m, LowRankLinear) for m in compressed.modules())
    if args.record:
        record("compress: MiniLM compression time", table1,
               "Medians of alternating repeats in one process; errors are relative Frobenius errors over all "
               "compressed weights; 'met' needs the speed-up and an error at most 1% above the loop's.")
        record("compress: MiniLM inference", table2,
               f"Medians of alternating repeats in one process, torch.no_grad(); {n_low_rank} LowRankLinear layers.")
        record("compress: MiniLM inference, the linear layers of one block alone", table3,
               "Each layer's GEMMs on the block's input rows (batch 32 x 128 = 4096 tokens), dense weights of "
               "encoder.layer.0 against its compressed factors, medians of alternating repeats, torch.no_grad(). "
               "'Q/K/V first factors fused': the FusedLowRankLinear layers of lowrank.nn.fuse_shared_inputs called "
               "in turn on one input (one GEMM with the three first factors stacked, then the three second factors).")


if __name__ == "__main__":
    main()
