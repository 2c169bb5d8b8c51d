"""torch.distributed, where a process group is running: who this process is, and sharing tensors from one rank.

Every job that may run under ``torchrun`` asks here, so that the same code runs
in one process (no process group: rank 0 of 1, nothing sent) and in many.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def owner(index: int) -> int:
    """The rank that computes item ``index`` of a list every rank walks in the same order (round robin)."""
    return index % world()[1]


def broadcast_from(tensors: Sequence[torch.Tensor], source: int) -> None:
    """Overwrite ``tensors`` on every rank with those of rank ``source``, in place (nothing without a group).

    Every rank passes tensors of the same shapes and dtypes, in the same order.
    """
    if world()[1] == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor, src=source)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
