"""Calibration: activation and gradient statistics of a model's layers, and the data-aware factors they give.

Three floors, each usable on its own:

- :mod:`~lowrank.calibrate.data` turns texts, data loaders or tensors into
  :class:`CalibrationBatch` lists, checks them and runs a model on them (or
  on a callable);
- the collectors watch layers with hooks and accumulate in float64:
  :mod:`~lowrank.calibrate.inputs` each linear layer's input Gram matrix and
  channel magnitudes (:func:`collect_input_statistics`) and their cross
  moments with a reference model (:func:`collect_paired_statistics`),
  :mod:`~lowrank.calibrate.fisher` the Fisher of its outputs
  (:func:`collect_output_fisher`), :mod:`~lowrank.calibrate.gradients` the
  gradient of a loss with respect to its weight
  (:func:`collect_weight_gradients`); the machinery they share (row
  accumulators, token masks, eval mode, early stops) is in
  :mod:`~lowrank.calibrate.hooks`; :mod:`~lowrank.calibrate.blocks` finds
  a model's repeated blocks and makes batches that run one block from the
  inputs the block before it gave (block-by-block calibration);
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

from lowrank.calibrate.data import (
    Calibration,
    CalibrationBatch,
    calibration_batches,
    check_calibration,
    run_calibration,
)
from lowrank.calibrate.fisher import check_probes, collect_output_fisher, model_output_tensor
from lowrank.calibrate.gradients import collect_weight_gradients
from lowrank.calibrate.hooks import counted_rows, eval_mode
from lowrank.calibrate.inputs import InputStatistics, collect_input_statistics, collect_paired_statistics
from lowrank.calibrate.whitening import (
    asvd_low_rank,
    cholesky_factor,
    refit_second,
    relative_output_error,
    shrunk_to_diagonal,
    whitened_low_rank,
    whitened_spectrum,
)

__all__ = [
    "Calibration",
    "CalibrationBatch",
    "InputStatistics",
    "asvd_low_rank",
    "calibration_batches",
    "check_calibration",
    "cholesky_factor",
    "collect_input_statistics",
    "check_probes",
    "collect_output_fisher",
    "collect_paired_statistics",
    "collect_weight_gradients",
    "counted_rows",
    "eval_mode",
    "model_output_tensor",
    "refit_second",
    "relative_output_error",
    "run_calibration",
    "shrunk_to_diagonal",
    "whitened_low_rank",
    "whitened_spectrum",
]
