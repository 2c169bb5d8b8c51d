"""lowrank: tensor decompositions and low-rank compression for PyTorch.

``lowrank.decompose(x, method, **options)`` decomposes a tensor (the
subpackage :mod:`lowrank.decompose` holds each algorithm and the result
containers); ``lowrank.compress(model, ratio=0.5)`` replaces a model's layers
by the factorized modules of :mod:`lowrank.nn`, its choices grouped in
:class:`Targets` (which layers), :class:`CalibrationConfig` and
:class:`HealConfig`; ``lowrank.save`` and ``lowrank.load`` write and read
compressed checkpoints; :mod:`lowrank.train` trains with rank regularization and
:mod:`lowrank.adapters` adds LoRA and FLoRA adapters.
"""

__version__ = "0.2.0"

from lowrank import adapters, calibrate, decompose, distributed, nn, rank, sharded, streaming, train  # noqa: E402
from lowrank.compress import compress  # noqa: E402
from lowrank.data_aware import CalibrationConfig  # noqa: E402
from lowrank.decompose import CP, SVD, TR, TT, Factorization, TTMatrix, Tucker  # noqa: E402
from lowrank.heal import HealConfig  # noqa: E402
from lowrank.io import load, save  # noqa: E402
from lowrank.report import CompressionReport, LayerReport  # noqa: E402
from lowrank.streaming import compress_checkpoint  # noqa: E402
from lowrank.targets import Targets  # noqa: E402

__all__ = [
    "CP",
    "SVD",
    "TR",
    "TT",
    "CalibrationConfig",
    "CompressionReport",
    "Factorization",
    "HealConfig",
    "LayerReport",
    "TTMatrix",
    "Targets",
    "Tucker",
    "__version__",
    "adapters",
    "calibrate",
    "compress",
    "compress_checkpoint",
    "decompose",
    "distributed",
    "load",
    "nn",
    "rank",
    "save",
    "sharded",
    "streaming",
    "train",
]
