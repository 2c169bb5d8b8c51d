"""lowrank.train under DDP: ``torchrun --nproc_per_node 2`` with gloo on CPU against one process on the same batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import train_ddp  # noqa: E402

SCRIPT = Path(__file__).parent / "distributed" / "train_ddp.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("method", train_ddp.METHODS)
def test_every_rank_holds_the_same_parameters(ranks: list[dict], method: str) -> None:
    (first, first_ranks), (second, second_ranks) = ranks[0][method], ranks[1][method]
    assert first_ranks == second_ranks
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


@pytest.mark.parametrize("method", train_ddp.METHODS)
def test_two_processes_equal_one_process_on_the_same_global_batches(ranks: list[dict], method: str) -> None:
    single, single_ranks = train_ddp.run(method)
    distributed, distributed_ranks = ranks[0][method]
    assert distributed_ranks == single_ranks
    for name, value in single.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-4, atol=1e-5, msg=name)
