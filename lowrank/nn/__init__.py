"""Factorized layers: modules that replace a dense layer and compute with its factors.

Each is a :class:`FactorizedModule`: built from a dense layer at a rank
(``from_dense``), sized to a parameter budget (``rank_for_budget``), rebuilt
empty from its ``config()``, and turned back into a dense layer with
``to_dense()``. :data:`METHODS` maps method names, per layer kind, to them.

The submodules each hold one idea: ``linear``, ``embedding``, ``conv/``
(``tucker2``, ``cp``, ``svd``), ``tt`` and ``tn`` the modules, ``fused`` low-rank
layers that share their input and run their first factors as one GEMM (``dlrt`` the
rank-adaptive layer that :class:`lowrank.train.DLRT` trains); ``base`` their
interface; ``registry`` the method names; ``dense`` facts about the dense
layers they replace (weights, kinds, costs); ``tensorize`` the tensor view of
a linear weight; ``surgery`` swapping modules and freezing parameters.
"""

from lowrank.nn.base import FactorizedModule, UnsupportedLayerError
from lowrank.nn.conv import CPConv, SVDConv, Tucker2Conv
from lowrank.nn.dlrt import DLRTLinear
from lowrank.nn.embedding import LowRankEmbedding
from lowrank.nn.fused import FusedLowRankLinear, fuse_shared_inputs, link_shared_inputs
from lowrank.nn.linear import LowRankLinear
from lowrank.nn.registry import METHODS, MODULES, Method, module_class, resolve_methods
from lowrank.nn.tn import TNLinear
from lowrank.nn.tt import TTLinear

__all__ = [
    "METHODS",
    "MODULES",
    "CPConv",
    "DLRTLinear",
    "FactorizedModule",
    "FusedLowRankLinear",
    "LowRankEmbedding",
    "LowRankLinear",
    "Method",
    "SVDConv",
    "TNLinear",
    "TTLinear",
    "Tucker2Conv",
    "UnsupportedLayerError",
    "fuse_shared_inputs",
    "link_shared_inputs",
    "module_class",
    "resolve_methods",
]
