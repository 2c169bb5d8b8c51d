"""Tensor decompositions on torch tensors.

Every function takes a torch tensor (or numpy array) of any real floating
dtype on any device and returns a small container (:mod:`.factorizations`) on
the same device and in the same dtype. This subpackage imports nothing from the
rest of ``lowrank``.

The module itself is callable: ``lowrank.decompose(x, "tucker", rank=8)`` is
:func:`decompose`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

from lowrank.decompose.cp import cp
from lowrank.decompose.factorizations import (
    CP,
    SVD,
    TR,
    TT,
    Factorization,
    SearchStep,
    TensorNetwork,
    TTMatrix,
    Tucker,
)
from lowrank.decompose.svd import svd
from lowrank.decompose.tn_fit import tn_adam, tn_als
from lowrank.decompose.tn_search import tn
from lowrank.decompose.tr import tr
from lowrank.decompose.tt import tt, tt_matrix, tt_round
from lowrank.decompose.tucker import tucker

METHODS: dict[str, Callable[..., Factorization]] = {
    "svd": svd,
    "tucker": tucker,
    "cp": cp,
    "tt": tt,
    "tt_matrix": tt_matrix,
    "tr": tr,
    "tn": tn,
}


def decompose(x: Any, method: str, /, *args: Any, **options: Any) -> Factorization:
    """Decompose ``x`` with the named method.

    Parameters
    ----------
    x : torch.Tensor or numpy.ndarray
        The tensor (a matrix for ``"svd"`` and ``"tt_matrix"``).
    method : {"svd", "tucker", "cp", "tt", "tt_matrix", "tr", "tn"}
        The decomposition; see :func:`svd`, :func:`tucker`, :func:`cp`,
        :func:`tt`, :func:`tt_matrix`, :func:`tr` and :func:`tn` (structure
        search) for the options of each.
    *args, **options
        Passed on to that function (``rank=``, ``tol=``, ...). ``x`` and
        ``method`` are positional-only, so a method's own ``method=`` option
        (for example ``decompose(x, "svd", rank=8, method="randomized")``) is
        passed on too.

    Returns
    -------
    Factorization
        The method's container.

    Examples
    --------
    >>> import torch, lowrank
    >>> f = lowrank.decompose(torch.randn(20, 20, 20), "tucker", rank=(4, 5, 6))
    >>> f.ranks
    (4, 5, 6)

    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    return METHODS[method](x, *args, **options)


class _CallableModule(types.ModuleType):
    """Lets ``lowrank.decompose`` be both this subpackage and the :func:`decompose` function."""

    def __call__(self, x: Any, method: str, /, *args: Any, **options: Any) -> Factorization:
        return decompose(x, method, *args, **options)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "CP",
    "METHODS",
    "SVD",
    "TR",
    "TT",
    "Factorization",
    "SearchStep",
    "TTMatrix",
    "TensorNetwork",
    "Tucker",
    "cp",
    "decompose",
    "svd",
    "tn",
    "tn_adam",
    "tn_als",
    "tr",
    "tt",
    "tt_matrix",
    "tt_round",
    "tucker",
]
