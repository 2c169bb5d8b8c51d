"""Factorized convolutions: Tucker-2, CP and SVD (channel and spatial) chains of small convolutions.

Each module replaces one ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``, keeps
its hyper-parameters and runs its factors as a chain of small convolutions
(:mod:`lowrank.nn.conv.base` holds what they share):

- :class:`Tucker2Conv` -- 1x1 in, core convolution, 1x1 out (:mod:`~lowrank.nn.conv.tucker2`)
- :class:`CPConv` -- 1x1 in, one depthwise convolution per spatial dimension, 1x1 out (:mod:`~lowrank.nn.conv.cp`)
- :class:`SVDConv` -- two convolutions from a truncated SVD, over channels or over space (:mod:`~lowrank.nn.conv.svd`)
"""

from lowrank.nn.conv.cp import CPConv
from lowrank.nn.conv.svd import SVDConv
from lowrank.nn.conv.tucker2 import Tucker2Conv

__all__ = ["CPConv", "SVDConv", "Tucker2Conv"]
