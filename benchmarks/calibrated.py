"""Calibrated compression time of the bundled MiniLM, as a multiple of one pass of the dense model.

``lowrank.compress(model, ratio, calibration=texts, tokenizer=tok)`` with the
defaults (energy allocation, sequential, whitened, no refit) at ratios 0.8 and 0.5, on the
256 pydoc calibration paragraphs of ``examples/minilm_task.py`` (16 batches of
16, at most 128 tokens), against the anchors measured in the same process on
the same batches: one dense forward pass, and one forward + backward pass (the
Fisher allocation backpropagates once per batch). Two rows per ratio: block by
block (the default wherever the model has repeated blocks) and the whole-model
path (each layer group runs the model up to it), with their ranks and outputs
compared. A breakdown says where the block-by-block time goes.

    python benchmarks/calibrated.py            # print the table
    python benchmarks/calibrated.py --record   # and append it to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from _timing import record

import lowrank
import lowrank.data_aware as data_aware
from lowrank.calibrate import CalibrationBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from minilm_task import calibration_texts, checkpoint_dir, tokenizer  # noqa: E402

# The steps of data-aware compression timed in the breakdown: the functions compress_linears calls.
STEPS = ("collect_input_statistics", "collect_output_fisher", "whitened_spectrum", "collect_paired_statistics",
         "block_inputs", "next_block_inputs", "_plan_layer")


@contextlib.contextmanager
def whole_model_path() -> Iterator[None]:
    """Calibrate through the whole model for each layer group (the path before block-by-block calibration)."""
    original = data_aware._blockwise_plan
    data_aware._blockwise_plan = lambda *args: None
    try:
        yield
    finally:
        data_aware._blockwise_plan = original


@contextlib.contextmanager
def timed_steps(totals: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in each of :data:`STEPS` (outermost calls only) to ``totals``."""
    originals = {name: getattr(data_aware, name) for name in STEPS}
    depth = [0]

    def wrap(name: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    totals[name] += time.perf_counter() - start
        return timed

    for name, function in originals.items():
        setattr(data_aware, name, wrap(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(data_aware, name, function)


def dense_passes(model: torch.nn.Module, batches: list[CalibrationBatch], backward: bool) -> None:
    """One pass of the model over the batches: forward only, or forward + backward of a loss on its outputs."""
    for batch in batches:
        with torch.set_grad_enabled(backward):
            hidden = batch.run(model).last_hidden_state
        if backward:
            hidden.square().mean().backward()
    model.zero_grad(set_to_none=True)


def compressed_output(model: torch.nn.Module, batches: list[CalibrationBatch]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([batch.run(model).last_hidden_state.flatten() for batch in batches[:2]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.5])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each row, alternating")
    parser.add_argument("--texts", type=int, default=256, help="calibration paragraphs")
    args = parser.parse_args()

    base = lowrank.io.load_pretrained(checkpoint_dir()).eval()
    config = lowrank.CalibrationConfig(calibration_texts(args.texts), tokenizer=tokenizer())
    batches = config.data
    tokens = sum(int(batch.token_mask.sum()) for batch in batches)
    times: dict[str, list[float]] = defaultdict(list)
    breakdown: dict[float, dict[str, float]] = {ratio: defaultdict(float) for ratio in args.ratios}
    results = {}
    for repeat in range(args.repeats):
        for backward in (False, True):
            start = time.perf_counter()
            dense_passes(base, batches, backward)
            times["forward + backward" if backward else "forward"].append(time.perf_counter() - start)
        for ratio in args.ratios:
            for path in ("block by block", "whole model"):
                model = copy.deepcopy(base)
                steps: dict[str, float] = defaultdict(float)
                with whole_model_path() if path == "whole model" else contextlib.nullcontext(), timed_steps(steps):
                    start = time.perf_counter()
                    report = lowrank.compress(model, ratio, calibration=config, progress=False)
                    times[ratio, path].append(time.perf_counter() - start)
                if path == "block by block":
                    for name, seconds in steps.items():
                        breakdown[ratio][name] += seconds / args.repeats
                results[ratio, path] = ([row.rank for row in report.layers], compressed_output(model, batches),
                                        report.ratio)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{key}: {values[-1]:.1f} s" for key, values in times.items()), flush=True)

    median = {key: statistics.median(values) for key, values in times.items()}
    forward, both = median["forward"], median["forward + backward"]
    rows = [f"| one dense forward pass (anchor) | {forward:.1f} s | 1.00x | {forward / both:.2f}x | | |",
            f"| one dense forward + backward pass (anchor) | {both:.1f} s | {both / forward:.2f}x | 1.00x | | |"]
    verdicts = []
    for ratio in args.ratios:
        ranks, output, kept = results[ratio, "block by block"]
        whole_ranks, whole_output, _ = results[ratio, "whole model"]
        same = "same ranks" if ranks == whole_ranks else "DIFFERENT ranks"
        difference = (output - whole_output).abs().max().item()
        for path in ("block by block", "whole model"):
            seconds = median[ratio, path]
            goal = ""
            if path == "block by block":
                met = seconds <= 2 * both
                goal = f"<= 2x forward + backward: {'met' if met else 'MISSED'}"
                verdicts.append(f"ratio {ratio}: {seconds / both:.2f}x forward + backward ({goal.split(': ')[1]}); "
                                f"whole-model path {median[ratio, 'whole model'] / both:.2f}x")
            check = f"{same}, max |output diff| {difference:.1e}" if path == "block by block" else ""
            rows.append(f"| compress(ratio={ratio}) calibrated, {path} (kept {kept:.3f}) | {seconds:.1f} s | "
                        f"{seconds / forward:.2f}x | {seconds / both:.2f}x | {goal} | {check} |")
    table = "\n".join([
        "| run | median time | x one forward | x one forward + backward | goal | block by block vs whole model |",
        "|---|---|---|---|---|---|", *rows])
    parts = "\n".join(
        f"| {ratio} | " + " | ".join(f"{breakdown[ratio][name]:.1f} s" for name in STEPS) + " |"
        for ratio in args.ratios)
    parts_table = "\n".join([
        "| ratio (block by block) | " + " | ".join(STEPS) + " |",
        "|---|" + "---|" * len(STEPS), parts])
    print(table + "\n\nWhere the block-by-block time goes (mean over repeats; the rest is rank choice and swaps):\n"
          + parts_table + "\n\n" + "\n".join(verdicts))
    if args.record:
        note = (f"Bundled all-MiniLM-L6-v2 (37 linears targeted), {len(batches)} batches of the {args.texts} pydoc "
                f"calibration paragraphs of examples/minilm_task.py ({tokens:,} real tokens, at most 128 per text), "
                f"defaults of `lowrank.compress(model, ratio, calibration=CalibrationConfig(texts, tokenizer=tok))` "
                f"(energy allocation, sequential, whitened, no refit). Anchors on the same batches in the same "
                f"process: "
                f"the dense model's forward pass, and forward + backward of the mean square of its last hidden "
                f"states. Medians of {args.repeats} alternating repeats. 'Whole model': the path that runs the "
                f"model up to each layer group (what compress did before). Then where the time goes.")
        record("calibrated compression time, block by block vs whole model", table + "\n\n" + parts_table, note)


if __name__ == "__main__":
    main()
