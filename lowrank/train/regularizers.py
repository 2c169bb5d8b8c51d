"""Rank-regularizing loss terms: tensors the user adds to the loss, and rank dropout as a module option.

Nothing here hides inside a forward pass: ``loss = task_loss + λ * nuclear_norm(model)``
is written by the user, where it can be logged, scheduled and switched off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank.checks import check_choice
from lowrank.distributed import unwrap
from lowrank.nn import UnsupportedLayerError
from lowrank.nn.components import component_squares
from lowrank.targets import Targets, targets_from
from lowrank.train.base import ranked_modules
from lowrank.train.trp import CONV_SCHEMES, weight_matrix


def _safe_sqrt(squares: torch.Tensor) -> torch.Tensor:
    """``sqrt`` whose gradient at an exact zero is zero instead of infinite (a pruned group stays pruned)."""
    positive = squares > 0
    return torch.where(positive, squares, torch.ones_like(squares)).sqrt() * positive


def nuclear_norm(
    model: nn.Module, *, conv_scheme: str = "channel", targets: Targets | None = None, **shortcuts: Any
) -> torch.Tensor:
    """Sum of the nuclear norms ``||W||_*`` of the targeted dense weights, differentiable.

    Each weight is read as a matrix as :class:`~lowrank.train.TRP` reads it
    (convolutions by ``conv_scheme``). Its gradient is ``U Vᵀ`` per weight,
    through a full SVD on every call: for large models prefer TRP, which adds
    the subgradient only every ``period`` steps.

    Parameters
    ----------
    model : nn.Module
        The model (or its DDP wrapper).
    conv_scheme : {"channel", "spatial"}
        How convolutions read as matrices.
    targets : Targets, optional
        The layers penalised (default ``Targets()``); output heads and grouped convolutions are left out.
    **shortcuts
        ``include``, ``exclude``, ``kinds``, ``filter_fn``.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(3, 3)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.diag(torch.tensor([3.0, -2.0, 1.0])))
    >>> float(nuclear_norm(torch.nn.Sequential(layer)).detach())
    6.0

    """
    check_choice(conv_scheme, CONV_SCHEMES, "conv_scheme")
    terms = []
    for target in targets_from(targets, **shortcuts).select(unwrap(model)):
        try:
            matrix = weight_matrix(target.module, target.kind, conv_scheme)
        except UnsupportedLayerError:
            continue
        if not target.head:  # LAPACK has no half-precision SVD: the norm is taken in float32 at least
            weight = matrix.read(target.module.weight)
            terms.append(torch.linalg.matrix_norm(weight.to(torch.promote_types(weight.dtype, torch.float32)), "nuc"))
    if not terms:
        raise ValueError("nuclear_norm found no dense weight to penalise among the targets")
    return torch.stack(terms).sum()


def frobenius_decay(model: nn.Module, *, targets: Targets | None = None, **shortcuts: Any) -> torch.Tensor:
    """Sum of ``||W||_F^2`` over the targeted factorized modules, ``W`` the product of each one's factors.

    Frobenius decay (Khodak et al. 2021, "Initialization and regularization of
    factorized neural layers") penalises the product instead of each factor:
    use it in place of weight decay on the factors (give them
    ``weight_decay=0``), as ``loss + λ/2 * frobenius_decay(model)``.

    Examples
    --------
    >>> import torch
    >>> from lowrank.nn import LowRankLinear
    >>> layer = LowRankLinear.from_dense(torch.nn.Linear(6, 4), rank=2)
    >>> bool(torch.isclose(frobenius_decay(torch.nn.Sequential(layer)), layer.weight.square().sum()))
    True

    """
    modules = targets_from(targets, **shortcuts).select_factorized(unwrap(model))
    return torch.stack([target.module.weight_norm_sq() for target in modules]).sum()


def group_lasso(
    model: nn.Module, *, hierarchical: bool = True, targets: Targets | None = None, **shortcuts: Any
) -> torch.Tensor:
    """Group lasso over the rank components of the targeted factorized modules.

    Each component (every parameter entry one rank index owns, see
    :mod:`lowrank.nn.components`) is a group. Plain group lasso sums the
    groups' norms; the hierarchical form (Maestro, Horváth et al. 2024) sums,
    for every ``b``, the norm of components ``b, b+1, ...`` together, which
    pushes the trailing components to zero first and keeps the leading ones:
    ranks can then be cut from the end.

    Parameters
    ----------
    model : nn.Module
        The model (or its DDP wrapper).
    hierarchical : bool
        Nested tail groups (True) or one group per component.
    targets : Targets, optional
        The factorized modules penalised (default: every one of the default kinds).
    **shortcuts
        ``include``, ``exclude``, ``kinds``, ``filter_fn``.

    """
    terms = []
    for module in ranked_modules(model, targets_from(targets, **shortcuts), "group_lasso").values():
        for axis in module.rank_axes():
            squares = component_squares(module, axis)
            if hierarchical:
                squares = squares.flip(0).cumsum(0).flip(0)
            terms.append(_safe_sqrt(squares).sum())
    return torch.stack(terms).sum()


def rank_dropout(
    model: nn.Module, p: float, *, ordered: bool = False, targets: Targets | None = None, **shortcuts: Any
) -> list[str]:
    """Turn on dropout of whole rank components in the targeted factorized modules; the names changed.

    Tensor dropout (Kolbeinsson et al.) drops each component with probability
    ``p``; with ``ordered`` (Maestro's ordered dropout) a forward pass keeps
    only the leading ``b`` components, ``b`` uniform, with probability ``p``.
    Only in training mode; ``p=0`` turns it off. See
    :meth:`lowrank.nn.FactorizedModule.set_rank_dropout`.
    """
    modules = ranked_modules(model, targets_from(targets, **shortcuts), "rank_dropout")
    for module in modules.values():
        module.set_rank_dropout(p, ordered)
    return list(modules)
