"""Which layers a job changes: a model's layers chosen by name, kind and predicate, output heads set apart.

Compression, rank-regularized training and adapters all choose their layers
here, through one :class:`Targets` config (as PEFT's ``target_modules`` and
torchao's ``filter_fn`` do), so that ``include=``, ``exclude=``, ``kinds=``
and ``filter_fn=`` mean the same everywhere.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from lowrank.nn.base import FactorizedModule
from lowrank.nn.dense import KINDS, layer_kind


def _patterns(value: str | Sequence[str] | None, name: str, none: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Glob patterns as a tuple (one string is one pattern); None gives ``none``."""
    if value is None:
        return none
    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"Targets.{name} must be a glob pattern or a sequence of them, got {value!r}")
    return tuple(patterns)


@dataclass(frozen=True)
class Target:
    """One layer a selection found.

    Attributes
    ----------
    name : str
        Its name in the model (``model.get_submodule(name)``).
    module : nn.Module
        The layer.
    kind : str
        ``"linear"``, ``"conv"``, ``"pointwise"`` or ``"embedding"`` (see
        :func:`lowrank.nn.dense.layer_kind`).
    head : bool
        Whether it is an output head (a linear layer tied to an input
        embedding, or the model's ``get_output_embeddings()``): selected, so
        that a report can say so, but never changed.

    """

    name: str
    module: nn.Module
    kind: str
    head: bool = False


@dataclass(frozen=True)
class Targets:
    """Which layers of a model a job changes.

    A layer is targeted when its kind is in ``kinds``, its name matches one of
    ``include`` (if given) and none of ``exclude``, and ``filter_fn`` (if
    given) is true for it. :meth:`select` finds dense layers (factorized
    modules are never targeted twice); :meth:`select_factorized` finds the
    factorized modules, by the kind of the layer each replaced.

    Attributes
    ----------
    include : tuple of str, optional
        Glob patterns (``fnmatch``, case-sensitive) of module names; only
        matching layers are targeted. A single string is one pattern.
    exclude : tuple of str
        Glob patterns of module names never targeted.
    kinds : tuple of str
        Layer kinds among ``"linear"`` (``nn.Linear``, Hugging Face ``Conv1D``),
        ``"conv"`` (``nn.Conv1d/2d/3d`` with a kernel larger than 1),
        ``"pointwise"`` (1x1 convolutions) and ``"embedding"`` (``nn.Embedding``).
    filter_fn : callable, optional
        ``filter_fn(name, module) -> bool``, anything else.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> [target.name for target in Targets(exclude="2").select(model)]
    ['0']

    """

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("linear", "conv")
    filter_fn: Callable[[str, nn.Module], bool] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _patterns(self.include, "include", None))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude", ()))
        kinds = self.kinds
        if isinstance(kinds, str) or not isinstance(kinds, Sequence) or not set(kinds) <= set(KINDS) or not kinds:
            raise ValueError(f"Targets.kinds must be a sequence of layer kinds among {KINDS}; got {kinds!r}")
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(kinds)))
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError(f"Targets.filter_fn must be a callable (name, module) -> bool, got {self.filter_fn!r}")

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether the layer called ``name`` is targeted (output heads included)."""
        kind = module.kind if isinstance(module, FactorizedModule) else layer_kind(module)
        if kind not in self.kinds:
            return False
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
            return False
        if self.include is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.include):
            return False
        return self.filter_fn is None or bool(self.filter_fn(name, module))

    def select(self, model: nn.Module) -> list[Target]:
        """The targeted layers of ``model``, in the order of ``model.named_modules()``.

        Raises
        ------
        ValueError
            If no layer is targeted: the message says which layers of the
            targeted kinds the model has, so that a pattern can be corrected.

        """
        heads = output_heads(model)
        return self._select(model, lambda module: layer_kind(module) in self.kinds, heads, "layer")

    def select_factorized(self, model: nn.Module) -> list[Target]:
        """The targeted factorized modules of ``model`` (``kind`` that of the layer each replaced).

        Raises
        ------
        ValueError
            If no factorized module is targeted (the message lists those the model has).

        """
        def candidate(module: nn.Module) -> bool:
            return isinstance(module, FactorizedModule) and module.kind in self.kinds

        return self._select(model, candidate, set(), "factorized module")

    def _select(
        self, model: nn.Module, candidate: Callable[[nn.Module], bool], heads: set[int], what: str
    ) -> list[Target]:
        """The targets among the ``candidate`` modules, or a ValueError naming the candidates."""
        targets = [
            Target(name, module, module.kind if isinstance(module, FactorizedModule) else layer_kind(module),
                   id(module) in heads)
            for name, module in model.named_modules()
            if candidate(module) and self.matches(name, module)
        ]
        if not targets:
            candidates = [name for name, module in model.named_modules() if candidate(module)]
            shown = ", ".join(candidates[:8]) + (f" and {len(candidates) - 8} more" if len(candidates) > 8 else "")
            found = f"its {what}s of those kinds are {shown}" if candidates else f"it has no {what} of those kinds"
            raise ValueError(f"no {what} of the {type(model).__name__} matches the targets {self.describe()}; {found}")
        return targets

    def describe(self) -> str:
        """The selection in one line, for messages."""
        parts = [f"kinds={list(self.kinds)}"]
        if self.include is not None:
            parts.append(f"include={list(self.include)}")
        if self.exclude:
            parts.append(f"exclude={list(self.exclude)}")
        if self.filter_fn is not None:
            parts.append(f"filter_fn={getattr(self.filter_fn, '__name__', 'a callable')}")
        return "(" + ", ".join(parts) + ")"

    def to_dict(self) -> dict[str, Any]:
        """The selection as JSON-able data (the filter by its name)."""
        return {
            "include": None if self.include is None else list(self.include),
            "exclude": list(self.exclude),
            "kinds": list(self.kinds),
            "filter_fn": None if self.filter_fn is None else getattr(self.filter_fn, "__name__", "callable"),
        }


# The fields of Targets that every job also takes as keyword arguments.
TARGET_SHORTCUTS = ("include", "exclude", "kinds", "filter_fn")


def targets_from(targets: Targets | None, **shortcuts: Any) -> Targets:
    """``targets`` (default :class:`Targets`) with the keyword shortcuts that are not None applied.

    The shortcuts are ``include``, ``exclude``, ``kinds`` and ``filter_fn``, as
    every job that takes ``targets=`` also accepts them.
    """
    if targets is not None and not isinstance(targets, Targets):
        raise TypeError(f"targets= takes a lowrank.Targets (name globs go to include=), got {type(targets).__name__}")
    unknown = sorted(set(shortcuts) - set(TARGET_SHORTCUTS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; the target shortcuts are "
                        f"{', '.join(TARGET_SHORTCUTS)}")
    return replace(targets or Targets(), **{name: value for name, value in shortcuts.items() if value is not None})


def output_heads(model: nn.Module) -> set[int]:
    """Ids of the modules that are output heads: tied to an input embedding, or the model's output embeddings."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {id(m) for m in model.modules() if layer_kind(m) == "linear" and id(m.weight) in embedding_weights}
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings) and isinstance(head := get_output_embeddings(), nn.Module):
        heads.add(id(head))
    return heads
