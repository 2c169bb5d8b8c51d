"""Timing and recording helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def alternate(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable, run in turn on every repeat so that all see the same machine load."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def record(title: str, table: str, note: str = "") -> None:
    """Append ``table`` to benchmarks/RESULTS.md under a dated heading with the command that produced it."""
    command = "python " + " ".join(sys.argv)
    header = (
        f"\n## {title}, {datetime.date.today().isoformat()}\n\n"
        f"Command: `{command}` (torch {torch.__version__}, {torch.get_num_threads()} threads). {note}\n\n"
    )
    with RESULTS.open("a") as handle:
        handle.write(header + table + "\n")
