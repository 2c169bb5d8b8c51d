"""Calibrated compression of the bundled MiniLM with 1 and 2 processes (torchrun, gloo): time and equal outputs.

Each run is ``torchrun --standalone --nproc_per_node N -m lowrank.cli compress MINILM -o OUT --ratio R
--calibration calib.txt --quiet`` (the defaults: energy allocation, block by block, no refit) on the 256 pydoc
calibration paragraphs of ``examples/minilm_task.py``, with the machine's cores divided among the processes
(``OMP_NUM_THREADS``), repeated in alternation. The outputs of the two are compared: the ranks chosen and the
embeddings of held-out retrieval documents.

    python benchmarks/processes.py            # print the table
    python benchmarks/processes.py --record   # and append it to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _timing import record

import lowrank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from minilm_task import calibration_texts, checkpoint_dir, embed, retrieval_pairs, tokenizer  # noqa: E402


def compress(processes: int, ratio: float, calibration: Path, output: Path) -> float:
    """Seconds of one ``lowrank compress`` under torchrun with ``processes`` processes."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "lowrank.cli", "compress", str(checkpoint_dir()), "-o", str(output), "--ratio", str(ratio),
               "--calibration", str(calibration), "--quiet", "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                          check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    counts = (1, 2)
    times: dict[int, list[float]] = {count: [] for count in counts}
    with tempfile.TemporaryDirectory() as root:
        calibration = Path(root) / "calib.txt"
        calibration.write_text("\n".join(calibration_texts(256)))
        for repeat in range(args.repeats):
            for count in counts:
                times[count].append(compress(count, args.ratio, calibration, Path(root) / f"out{count}"))
            print(f"repeat {repeat + 1}: " + ", ".join(f"{c} process(es) {times[c][-1]:.1f} s" for c in counts),
                  flush=True)
        plans = {count: lowrank.io.read_plan(Path(root) / f"out{count}") for count in counts}
        ranks = {count: [row["rank"] for row in plans[count]["report"]["layers"]] for count in counts}
        documents = [document for _, document in retrieval_pairs()[:128]]
        embeddings = {count: embed(lowrank.load(Path(root) / f"out{count}"), tokenizer(), documents)
                      for count in counts}
    difference = float((embeddings[2] - embeddings[1]).abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(embeddings[2], embeddings[1]).min())
    median = {count: statistics.median(values) for count, values in times.items()}
    rows = [f"| {count} | {max(1, (os.cpu_count() or 1) // count)} | {median[count]:.1f} s | "
            f"{median[1] / median[count]:.2f}x | " + ("" if count == 1 else
            f"{'same' if ranks[2] == ranks[1] else 'DIFFERENT'} ranks; embeddings: max |diff| {difference:.1e}, "
            f"min cosine {cosine:.6f}") + " |" for count in counts]
    table = "\n".join(["| processes | threads each | median time (CLI, end to end) | speed-up | outputs vs 1 process |",
                       "|---|---|---|---|---|", *rows])
    print(table)
    if args.record:
        note = (f"`torchrun --standalone --nproc_per_node N -m lowrank.cli compress MINILM -o OUT --ratio "
                f"{args.ratio} --calibration calib.txt --quiet` (defaults: energy allocation, block by block, "
                f"no refit; "
                f"256 pydoc paragraphs in 16 batches), gloo, the {os.cpu_count()} cores divided among the processes, "
                f"medians of {args.repeats} alternating runs, each including the interpreter's start and the save. "
                f"Outputs compared on 128 held-out retrieval documents.")
        record("processes: calibrated MiniLM compression with 1 and 2 processes", table, note)


if __name__ == "__main__":
    main()
