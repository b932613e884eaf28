"""Optimizers, curvature estimators, learning-rate schedules and the registry that builds them from a config.

Nothing here imports `gpt/`: the trainer is where the model, the data and these pieces meet.
"""

from optim.adahessian import AdaHessian
from optim.adam_mini import AdamMini
from optim.base import BaseOptimizer, optimized_parameters
from optim.lion import Lion
from optim.registry import OPTIMIZERS, TrainerSettings, build_optimizer, param_groups, trainer_settings
from optim.schedule import SCHEDULES, lr_at, schedule_named
from optim.sgd_sai import SGDSaI
from optim.sophia import SophiaG, SophiaH

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "AdaHessian",
    "AdamMini",
    "BaseOptimizer",
    "Lion",
    "SGDSaI",
    "SophiaG",
    "SophiaH",
    "TrainerSettings",
    "build_optimizer",
    "lr_at",
    "optimized_parameters",
    "param_groups",
    "schedule_named",
    "trainer_settings",
]
