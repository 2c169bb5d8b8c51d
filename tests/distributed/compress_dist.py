"""Calibrated compression in one process or under ``torchrun`` with gloo: the batches shared, the sums all-reduced.

``torchrun --standalone --nproc_per_node 2 tests/distributed/compress_dist.py SRC OUT`` compresses a small BERT
in memory (block by block, and through the whole-model path) and streams the sharded Llama checkpoint SRC into
``OUT/stream`` (rank 0 writes); each rank saves what it got to ``OUT/rank{r}.pt``. :func:`run` does the same in one
process. ``tests/test_distributed_compress.py`` compares them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_blockwise import bert, model_output, token_batches  # noqa: E402

import lowrank  # noqa: E402
import lowrank.data_aware  # noqa: E402
from lowrank.distributed import world  # noqa: E402

PATHS = ("block by block", "whole model")
BATCHES = 5  # not a multiple of the process count: the shares differ in size


def compress_in_memory(path: str) -> dict:
    """Compress the seeded BERT with the fisher allocation and the refit (every collective) along ``path``."""
    torch.manual_seed(0)
    model = bert().eval()
    passes = []  # batches run through the embeddings by this process
    model.embeddings.register_forward_hook(lambda *args: passes.append(1))
    original = lowrank.data_aware._blockwise_plan
    if path == "whole model":
        lowrank.data_aware._blockwise_plan = lambda *args: None
    try:
        report = lowrank.compress(model, 0.6, calibration=token_batches(count=BATCHES), allocation="fisher",
                                  refit=True, progress=False)
    finally:
        lowrank.data_aware._blockwise_plan = original
    return {"rows": [(row.name, row.rank, row.output_error) for row in report.layers],
            "state": {key: value.clone() for key, value in model.state_dict().items()},
            "passes": len(passes), "output": model_output(model, token_batches(seed=9, count=1)[0])}


def run(source: Path, output: Path) -> dict:
    """Every job of this script; the streamed checkpoint goes to ``output / "stream"``."""
    results = {path: compress_in_memory(path) for path in PATHS}
    report = lowrank.compress_checkpoint(source, output / "stream", 0.6, calibration=token_batches(count=BATCHES),
                                         progress=False)
    results["stream"] = {"rows": [(row.name, row.rank, row.output_error) for row in report.layers]}
    try:  # a callable calibration cannot be shared among processes
        lowrank.compress(bert(), 0.6, calibration=lambda model: model(**token_batches(count=1)[0]), allocation="energy",
                         progress=False)
        results["callable"] = "accepted"
    except RuntimeError as error:  # compress's "failed; the model is unchanged: ..." around the reason
        results["callable"] = str(error)
    return results


if __name__ == "__main__":
    dist.init_process_group("gloo")
    source, output = Path(sys.argv[1]), Path(sys.argv[2])
    results = run(source, output)
    torch.save(results, output / f"rank{world()[0]}.pt")
    dist.destroy_process_group()
