"""torch.distributed, where a process group is running: who this process is, and sharing tensors from one rank.

Every job that may run under ``torchrun`` asks here, so that the same code runs
in one process (no process group: rank 0 of 1, nothing sent) and in many.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@contextmanager
def process_group_from_environment() -> Iterator[None]:
    """Within the context, a gloo process group when ``torchrun`` started this process with others.

    Nothing is done when one is initialised already or ``WORLD_SIZE`` is absent
    or 1; the group started here is destroyed at the end.
    """
    started = False
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        started = True
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


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


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Replace ``tensors`` on every rank by their sums over the ranks, in place (nothing without a group)."""
    if world()[1] == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def object_from(value: T, source: int = 0) -> T:
    """Rank ``source``'s ``value`` on every rank (a small picklable object, such as an order of names)."""
    if world()[1] == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def barrier() -> None:
    """Wait for every rank (nothing without a group)."""
    if world()[1] > 1:
        dist.barrier()


def local_share(items: Sequence[T]) -> tuple[list[T], list[int]]:
    """The items of ``items`` this rank takes (round robin: item ``i`` to rank ``i % world_size``), and their indices.

    Raises
    ------
    ValueError
        If there are fewer items than ranks (a rank would have none).
    """
    rank, size = world()
    if len(items) < size:
        raise ValueError(f"{len(items)} calibration batches cannot be shared among {size} processes: give at least "
                         "one batch per process")
    indices = list(range(rank, len(items), size))
    return [items[i] for i in indices], indices


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``, ``DataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
