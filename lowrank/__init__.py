"""lowrank: tensor decompositions and low-rank compression for PyTorch.

``lowrank.decompose(x, method, **options)`` decomposes a tensor; the
subpackage :mod:`lowrank.decompose` holds each algorithm and the result
containers.
"""

from lowrank import decompose
from lowrank.decompose import CP, SVD, TR, TT, Factorization, TTMatrix, Tucker

__version__ = "0.1.0"

__all__ = ["CP", "SVD", "TR", "TT", "Factorization", "TTMatrix", "Tucker", "__version__", "decompose"]
