"""Factorized layers: modules that replace a dense layer and compute with its factors.

Each is a :class:`FactorizedModule`: built from a dense layer (``from_dense``),
rebuilt empty from its ``config()``, and turned back into a dense layer with
``to_dense()``.
"""

from lowrank.nn.base import (
    FactorizedModule,
    UnsupportedLayerError,
    conv_output_shape,
    dense_flops,
    swap_modules,
    weight_ratio,
)
from lowrank.nn.conv import (
    CPConv,
    SVDConv,
    Tucker2Conv,
    cp_rank_for_ratio,
    svd_rank_for_ratio,
    tucker2_ranks_for_ratio,
)
from lowrank.nn.embedding import LowRankEmbedding
from lowrank.nn.linear import LowRankLinear, is_hf_conv1d, linear_rank_for_ratio, linear_weight
from lowrank.nn.tn import TNLinear, tensorize_weight
from lowrank.nn.tt import TTLinear, tt_rank_for_ratio

MODULES: dict[str, type[FactorizedModule]] = {
    cls.__name__: cls for cls in (LowRankLinear, LowRankEmbedding, Tucker2Conv, CPConv, SVDConv, TTLinear, TNLinear)
}


def module_class(name: str) -> type[FactorizedModule]:
    """The factorized module class called ``name`` (as recorded in a saved plan)."""
    if name not in MODULES:
        raise ValueError(f"unknown factorized module {name!r}; known: {', '.join(MODULES)}")
    return MODULES[name]


__all__ = [
    "MODULES",
    "CPConv",
    "FactorizedModule",
    "LowRankEmbedding",
    "LowRankLinear",
    "SVDConv",
    "TNLinear",
    "TTLinear",
    "Tucker2Conv",
    "UnsupportedLayerError",
    "conv_output_shape",
    "cp_rank_for_ratio",
    "dense_flops",
    "is_hf_conv1d",
    "linear_rank_for_ratio",
    "linear_weight",
    "module_class",
    "svd_rank_for_ratio",
    "swap_modules",
    "tensorize_weight",
    "tt_rank_for_ratio",
    "tucker2_ranks_for_ratio",
    "weight_ratio",
]
