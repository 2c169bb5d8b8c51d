"""Calibrated compression under torch.distributed: ``torchrun --nproc_per_node 2`` with gloo against one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_blockwise import model_output, token_batches
from test_streaming import sharded_checkpoint

import lowrank

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import compress_dist  # noqa: E402

SCRIPT = Path(__file__).parent / "distributed" / "compress_dist.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    sharded_checkpoint("llama", root / "src")
    (root / "two").mkdir()
    (root / "one").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               str(root / "src"), str(root / "two")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"root": root, "ranks": [torch.load(root / "two" / f"rank{r}.pt") for r in range(2)],
            "single": compress_dist.run(root / "src", root / "one")}


@pytest.mark.parametrize("path", compress_dist.PATHS)
def test_both_ranks_hold_the_same_compressed_model(runs, path):
    first, second = (ranks[path] for ranks in runs["ranks"])
    assert first["rows"] == second["rows"]
    assert first["state"].keys() == second["state"].keys()
    assert all(torch.equal(value, second["state"][key]) for key, value in first["state"].items())


@pytest.mark.parametrize("path", compress_dist.PATHS)
def test_two_processes_equal_one(runs, path):
    single, distributed = runs["single"][path], runs["ranks"][0][path]
    assert [row[:2] for row in distributed["rows"]] == [row[:2] for row in single["rows"]]
    assert sum(rank is not None for _, rank, _ in single["rows"]) >= 6
    for (_, _, error), (_, _, expected) in zip(distributed["rows"], single["rows"]):
        assert error == expected if expected is None else error == pytest.approx(expected, rel=1e-6, abs=1e-12)
    torch.testing.assert_close(distributed["output"], single["output"], rtol=1e-5, atol=1e-6)
    # each process ran about half the batches (3 and 2 of 5, plus the first batch once to find the layer order)
    assert runs["ranks"][0][path]["passes"] < 0.75 * single["passes"]
    assert runs["ranks"][1][path]["passes"] < runs["ranks"][0][path]["passes"]


def test_a_streamed_run_written_by_rank_zero_equals_one_process(runs):
    root = runs["root"]
    single, distributed = runs["single"]["stream"]["rows"], runs["ranks"][0]["stream"]["rows"]
    assert runs["ranks"][1]["stream"]["rows"] == distributed
    assert [row[:2] for row in distributed] == [row[:2] for row in single]
    assert sum(rank is not None for _, rank, _ in single) >= 6
    assert not [path.name for path in (root / "two").iterdir() if path.name.startswith(".")]  # no staging left
    batch = token_batches(seed=9, count=1)[0]
    torch.testing.assert_close(model_output(lowrank.load(root / "two" / "stream"), batch),
                               model_output(lowrank.load(root / "one" / "stream"), batch), rtol=1e-5, atol=1e-6)


def test_a_callable_calibration_is_refused_under_several_processes_only(runs):
    assert runs["single"]["callable"] == "accepted"
    for ranks in runs["ranks"]:
        assert "a callable calibration runs the model itself, so each of the processes" in ranks["callable"]
