"""What every rank-regularized training method shares: its model, its optimizer hooks, its state and its end.

A method (:class:`~lowrank.train.TRP`, :class:`~lowrank.train.RankScheduler`,
:class:`~lowrank.train.DLRT`) attaches to the user's optimizer with
``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``, so the
training loop stays ``loss.backward(); optimizer.step(); optimizer.zero_grad()``
with no call to forget; ``finalize()`` swaps the trained layers for their
factorized modules and returns a :class:`~lowrank.CompressionReport`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lowrank.adapters.model import adapter_layers
from lowrank.distributed import unwrap
from lowrank.nn.surgery import swap_modules
from lowrank.report import CompressionReport, LayerReport
from lowrank.targets import Targets

Hook = Callable[[torch.optim.Optimizer, tuple[Any, ...], dict[str, Any]], None]


def ranked_modules(model: nn.Module, targets: Targets, user: str, adapters: bool = False) -> dict[str, nn.Module]:
    """The targeted factorized modules of ``model`` that have rank components, by name.

    With ``adapters``, also the targeted adapter layers with rank components
    (LoRA and FLoRA, see :mod:`lowrank.adapters`; targeted by the kind of
    their base layer and their name, ``filter_fn`` called with the adapter
    layer), and no factorized module inside an adapter layer (a frozen base).

    Raises
    ------
    ValueError
        If there is none (tensor-train and tensor-network layers have no
        components); the message names ``user``, the job that needs them.

    """
    model = unwrap(model)
    if not adapters:
        modules = {target.name: target.module for target in targets.select_factorized(model)
                   if target.module.rank_axes()}
    else:
        layers = adapter_layers(model)
        inside = {id(module) for layer in layers.values() for module in layer.modules()}
        unfiltered = replace(targets, filter_fn=None)
        modules = {name: layer for name, layer in layers.items()
                   if layer.rank_axes() and unfiltered.matches(name, layer.base_layer)
                   and (targets.filter_fn is None or targets.filter_fn(name, layer))}
        try:
            factorized = targets.select_factorized(model)
        except ValueError:
            if not layers:
                raise
            factorized = []
        modules.update({target.name: target.module for target in factorized
                        if target.module.rank_axes() and id(target.module) not in inside})
    if not modules:
        raise ValueError(f"{user} found no factorized module with rank components among the targets "
                         f"{targets.describe()} (tensor-train and tensor-network layers have none)"
                         + (", and no LoRA or FLoRA adapter layer" if adapters else ""))
    return modules


class TrainingMethod:
    """Base class of the methods of :mod:`lowrank.train`: the model, the optimizer's hooks, the step count.

    Parameters
    ----------
    model : nn.Module
        The model, or its ``DistributedDataParallel`` wrapper (the method works on the module inside).
    optimizer : torch.optim.Optimizer
        The optimizer that trains it.

    Attributes
    ----------
    model : nn.Module
        The unwrapped model.
    optimizer : torch.optim.Optimizer
    step : int
        Optimizer steps taken since the method was attached (restored by :meth:`load_state_dict`).

    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = unwrap(model)
        self.optimizer = optimizer
        self.step = 0
        self._handles: list[Any] = []
        self._finalized = False

    def _check_optimized(self, parameters: Sequence[tuple[str, nn.Parameter]]) -> None:
        """Raise a ValueError naming the first of ``parameters`` that the optimizer does not hold."""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for name, parameter in parameters:
            if id(parameter) not in held:
                raise ValueError(
                    f"the optimizer does not hold parameter {name!r} (shape {tuple(parameter.shape)}) of a targeted "
                    f"layer: build the optimizer from the model's parameters before attaching {type(self).__name__}"
                )

    def _attach(self, pre: Hook | None = None, post: Hook | None = None) -> None:
        """Register ``pre`` and ``post`` as the optimizer's step hooks."""
        if pre is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(pre))
        if post is not None:
            self._handles.append(self.optimizer.register_step_post_hook(post))

    def remove(self) -> None:
        """Detach from the optimizer: its steps no longer run this method (``finalize`` does it too)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        """Whether the optimizer's steps still run this method."""
        return bool(self._handles)

    def state_dict(self) -> dict[str, Any]:
        """The method's state, for a checkpoint beside the model's and the optimizer's."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output: a resumed run takes the same steps as an uninterrupted one."""
        self.step = int(state["step"])

    def _check_not_finalized(self) -> None:
        """Raise a RuntimeError if :meth:`finalize` ran already (the layers it would swap are gone)."""
        if self._finalized:
            raise RuntimeError(f"this {type(self).__name__} was finalized already")

    def _swap(self, rows: list[LayerReport], replacements: list[tuple[str, nn.Module]],
              settings: dict[str, Any]) -> CompressionReport:
        """Swap ``replacements`` in (all or none), detach from the optimizer and report.

        A ``DistributedDataParallel`` wrapper of the model, and the optimizer,
        still refer to the old parameters afterwards: wrap the model and build
        an optimizer again to train on.
        """
        swap_modules(self.model, replacements)
        self._finalized = True
        self.remove()
        return CompressionReport(rows, {"train": {"method": type(self).__name__, "step": self.step, **settings}})
