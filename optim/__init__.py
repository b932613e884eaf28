"""Optimizers, curvature estimators, learning-rate schedules and the registry that builds them from a config.

Importing the package registers every optimizer module in it (listed first: the paper's, in its order), so a
new module in this folder needs no line here. Nothing here imports `gpt/`: the trainer is where the model,
the data and these pieces meet.
"""

import importlib
import pkgutil

from optim import adamw, lion, sophia  # noqa: F401  (register first: the paper's optimizers)
from optim.adahessian import AdaHessian
from optim.adam_mini import AdamMini
from optim.base import BaseOptimizer, optimized_parameters
from optim.lion import Lion
from optim.muon import MuonAdamW
from optim.registry import (
    OPTIMIZERS,
    OptimizerEntry,
    TrainerSettings,
    build_optimizer,
    check_run,
    entry_for,
    evaluation_weights,
    param_groups,
    register,
    trainer_settings,
)
from optim.schedule import SCHEDULES, GroupSchedule, lr_at, schedule_named
from optim.sgd_sai import SGDSaI
from optim.soap import SOAP
from optim.sophia import SophiaG, SophiaH

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "SOAP",
    "AdaHessian",
    "AdamMini",
    "BaseOptimizer",
    "GroupSchedule",
    "Lion",
    "MuonAdamW",
    "OptimizerEntry",
    "SGDSaI",
    "SophiaG",
    "SophiaH",
    "TrainerSettings",
    "build_optimizer",
    "check_run",
    "entry_for",
    "evaluation_weights",
    "lr_at",
    "optimized_parameters",
    "param_groups",
    "register",
    "schedule_named",
    "trainer_settings",
]
