"""Training with rank regularization: methods attached to the user's optimizer, and loss terms.

- :class:`TRP` (Trained Rank Pruning) truncates dense weights by energy every
  few steps and adds the nuclear-norm subgradient; ``finalize()`` swaps in
  factorized modules at the trained ranks.
- :class:`RankScheduler` masks the least important rank components of a
  factorized model (AdaLoRA's scores) as one budget falls on a cubic
  schedule; ``finalize()`` removes them.
- :class:`DLRT` trains each linear layer as ``U S Vᵀ`` with a rank-adaptive
  integrator (Schotthöfer et al., "Low-rank lottery tickets"): the rank is learnt.
- Loss terms the user adds to the loss: :func:`nuclear_norm`,
  :func:`frobenius_decay`, :func:`group_lasso`; and :func:`rank_dropout`, the
  factorized modules' option that drops whole rank components in training.
- :class:`Ramp` and :func:`cubic_budget`: schedules over training steps.

Each method attaches to the optimizer's step hooks, so the training loop stays
``loss.backward(); optimizer.step(); optimizer.zero_grad()``; each has
``state_dict()`` / ``load_state_dict()`` for resuming.
"""

from lowrank.train.base import TrainingMethod
from lowrank.train.dlrt import DLRT
from lowrank.train.regularizers import frobenius_decay, group_lasso, nuclear_norm, rank_dropout
from lowrank.train.scheduler import RankScheduler
from lowrank.train.schedules import Ramp, cubic_budget
from lowrank.train.trp import TRP

__all__ = [
    "DLRT",
    "TRP",
    "RankScheduler",
    "Ramp",
    "TrainingMethod",
    "cubic_budget",
    "frobenius_decay",
    "group_lasso",
    "nuclear_norm",
    "rank_dropout",
]
