"""Model surgery: swap submodules all or none, and train only some parameters for a while.

Every job that changes a model in place (compression, healing, calibration
with gradients, and later training and adapters) goes through these two, so
that a failure part-way leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn


def swap_modules(model: nn.Module, replacements: Sequence[tuple[str, nn.Module]]) -> None:
    """Set each named submodule of ``model`` to its replacement, all or none.

    Parameters
    ----------
    model : nn.Module
        The model, modified in place.
    replacements : sequence of (str, nn.Module)
        Dotted submodule names (as ``model.named_modules()`` gives them) and
        the modules to put there. If any name cannot be set, the ones already
        set are put back and the error re-raised.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> swap_modules(model, [("1", torch.nn.Tanh())])
    >>> type(model[1]).__name__
    'Tanh'

    """
    done = []
    try:
        for name, new in replacements:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            done.append((parent, child, getattr(parent, child)))
            setattr(parent, child, new)
    except Exception:
        for parent, child, old in reversed(done):
            setattr(parent, child, old)
        raise


@contextmanager
def train_only(modules: nn.Module | Iterable[nn.Module], trainable: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Within the block, only ``trainable`` require gradients, and every gradient starts empty.

    On exit (also on error) every parameter of ``modules`` gets back its own
    ``requires_grad`` flag and its ``grad``, so gradients computed inside the
    block leave no trace.

    Parameters
    ----------
    modules : nn.Module or iterable of nn.Module
        The modules whose parameters are frozen (a parameter shared between
        them counts once).
    trainable : iterable of nn.Parameter
        The parameters that require gradients within the block (none by
        default: nothing records a parameter gradient).

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(3, 2)
    >>> with train_only(layer, [layer.bias]):
    ...     layer.weight.requires_grad, layer.bias.requires_grad
    (False, True)
    >>> layer.weight.requires_grad
    True

    """
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    parameters = {id(p): p for module in modules for p in module.parameters()}
    chosen = {id(p) for p in trainable}
    saved = [(p, p.requires_grad, p.grad) for p in parameters.values()]
    try:
        for p, _, _ in saved:
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
