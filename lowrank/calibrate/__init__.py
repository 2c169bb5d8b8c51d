"""Calibration: activation and gradient statistics of a model's layers, and the data-aware factors they give.

Three floors, each usable on its own:

- :mod:`~lowrank.calibrate.data` turns texts, data loaders or tensors into
  :class:`CalibrationBatch` lists and runs a model on them (or on a callable);
- :mod:`~lowrank.calibrate.statistics` collects, with hooks, each linear
  layer's input Gram matrix and channel magnitudes
  (:func:`collect_input_statistics`) and the Fisher of its outputs
  (:func:`collect_output_fisher`), in float64;
- :mod:`~lowrank.calibrate.whitening` turns a weight and those statistics into
  low-rank factors: whitened truncation (SVD-LLM), ASVD scaling, and a
  least-squares refit of the second factor.

Examples
--------
>>> import torch
>>> from lowrank.calibrate import calibration_batches, collect_input_statistics, whitened_low_rank
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
>>> batches = calibration_batches([torch.randn(64, 16) for _ in range(4)])
>>> stats = collect_input_statistics(model, {"0": model[0]}, batches)
>>> first, second, spectrum = whitened_low_rank(model[0].weight, stats["0"].gram, rank=4)
>>> first.shape, second.shape, stats["0"].count
(torch.Size([4, 16]), torch.Size([16, 4]), 256)

"""

from lowrank.calibrate.data import Calibration, CalibrationBatch, calibration_batches, run_calibration
from lowrank.calibrate.statistics import (
    InputStatistics,
    collect_input_statistics,
    collect_output_fisher,
    collect_paired_statistics,
    collect_weight_gradients,
    counted_rows,
    eval_mode,
    model_output_tensor,
)
from lowrank.calibrate.whitening import (
    asvd_low_rank,
    cholesky_factor,
    refit_second,
    relative_output_error,
    whitened_low_rank,
)

__all__ = [
    "Calibration",
    "CalibrationBatch",
    "InputStatistics",
    "asvd_low_rank",
    "calibration_batches",
    "cholesky_factor",
    "collect_input_statistics",
    "collect_output_fisher",
    "collect_paired_statistics",
    "collect_weight_gradients",
    "counted_rows",
    "eval_mode",
    "model_output_tensor",
    "refit_second",
    "relative_output_error",
    "run_calibration",
    "whitened_low_rank",
]
