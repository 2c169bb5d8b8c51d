"""Train small models with lowrank.train methods, in one process or under ``torchrun`` with DDP and gloo.

``torchrun --standalone --nproc_per_node 2 tests/distributed/train_ddp.py OUT`` writes each rank's final
parameters to ``OUT/rank{r}.pt``; :func:`run` called without a process group trains the same models on the
same global batches in one process. ``tests/test_train_distributed.py`` compares the two.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lowrank
from lowrank.distributed import world
from lowrank.train import DLRT, TRP, RankScheduler

METHODS = ("trp", "scheduler", "dlrt")
STEPS = 12
GLOBAL_BATCH = 16


def _model(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    if method == "scheduler":
        lowrank.compress(model, rank=6, progress=False)
    return model


def _attach(method: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> object:
    if method == "trp":
        return TRP(model, optimizer, energy=0.9, period=3, nuclear_weight=1e-2)
    if method == "dlrt":
        return DLRT(model, optimizer, rank=6, tol=0.2, exclude="5")
    return RankScheduler(model, optimizer, ratio=0.3, total_steps=STEPS, warmup_steps=2, final_steps=2)


def run(method: str) -> tuple[dict[str, torch.Tensor], object]:
    """Train with ``method`` on this process's share of every global batch; the final state dict and ranks.

    TRP and the scheduler are handed the DDP-wrapped model; DLRT replaces parameters, so it is attached
    before the model is wrapped.
    """
    rank, size = world()
    model = _model(method)
    wrap = nn.parallel.DistributedDataParallel if size > 1 else (lambda module: module)
    if method == "dlrt":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        attached = _attach(method, model, optimizer)
        trained = wrap(model)
    else:
        trained = wrap(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
        attached = _attach(method, trained, optimizer)
    generator = torch.Generator().manual_seed(1)
    share = GLOBAL_BATCH // size
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator)
        y = torch.randn(GLOBAL_BATCH, 4, generator=generator)
        part = slice(rank * share, (rank + 1) * share)
        nn.functional.mse_loss(trained(x[part]), y[part]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, attached.ranks


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, _ = world()
    results = {method: run(method) for method in METHODS}
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
