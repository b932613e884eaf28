"""Learning-rate schedules: pure functions of the step, so a resumed run needs no scheduler state.

`cosine` is nanoGPT's: linear warmup lr·(step+1)/(warmup_steps+1) for step < warmup_steps (never exactly 0,
so step 0 already moves), then cosine from lr down to min_lr, reached at decay_steps and held after. The
nanoGPT fork the official Sophia code was built on warmed up from 0 as lr·step/warmup_steps
(`warmup_from_zero=True`, the official protocol's); the two differ by one step's worth of lr during warmup.
`constant` is the same warmup then a flat lr, for ablations. `GroupSchedule` applies a schedule to an
optimizer as a factor on each param group's own base rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from common.errors import UserError


def _warmup(step: int, lr: float, warmup_steps: int, from_zero: bool) -> float:
    return lr * step / warmup_steps if from_zero else lr * (step + 1) / (warmup_steps + 1)


def cosine(step: int, *, lr: float, warmup_steps: int, decay_steps: int, min_lr: float,
           warmup_from_zero: bool = False) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at decay_steps, min_lr afterwards."""
    if step < warmup_steps:
        return _warmup(step, lr, warmup_steps, warmup_from_zero)
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / (decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def constant(step: int, *, lr: float, warmup_steps: int, decay_steps: int, min_lr: float,
             warmup_from_zero: bool = False) -> float:
    """Linear warmup, then lr for ever (decay_steps and min_lr are accepted so all schedules are alike)."""
    return _warmup(step, lr, warmup_steps, warmup_from_zero) if step < warmup_steps else lr


SCHEDULES: dict[str, Callable[..., float]] = {"cosine": cosine, "constant": constant}


def schedule_named(name: str) -> Callable[..., float]:
    """The schedule called `name` (the trainer asks at start-up, so a misspelt name fails before any work)."""
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def lr_at(
    schedule: str, step: int, *, lr: float, warmup_steps: int, decay_steps: int, min_lr: float,
    warmup_from_zero: bool = False,
) -> float:
    """The learning rate of `schedule` (a name in SCHEDULES) at `step` (0-based optimizer steps)."""
    return schedule_named(schedule)(step, lr=lr, warmup_steps=warmup_steps, decay_steps=decay_steps,
                                    min_lr=min_lr, warmup_from_zero=warmup_from_zero)


class GroupSchedule:
    """The schedule as a factor on each param group's own base rate, so the parts of a hybrid optimizer
    (Muon's matrices and its AdamW rest) keep their own rates. The base rates are the groups' `lr` when the
    optimizer is built, a pure function of the config, so a resumed run needs no state for them.
    `reference_lr` (the config's `optim.lr`) is the rate the schedule's `min_lr` refers to: each group decays
    to the same fraction min_lr / reference_lr of its base. A group whose base equals the reference follows
    `lr_at` exactly, bit for bit."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str, *, reference_lr: float,
                 warmup_steps: int, decay_steps: int | None, min_lr: float, warmup_from_zero: bool = False
                 ) -> None:
        schedule_named(schedule)
        self.optimizer, self.schedule, self.reference_lr = optimizer, schedule, reference_lr
        self.warmup_steps, self.decay_steps, self.min_lr = warmup_steps, decay_steps, min_lr
        self.warmup_from_zero = warmup_from_zero
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def _lr(self, step: int, base: float) -> float:
        ratio = base / self.reference_lr if self.reference_lr else 1.0
        return lr_at(self.schedule, step, lr=base, warmup_steps=self.warmup_steps,
                     decay_steps=self.decay_steps, min_lr=self.min_lr * ratio,
                     warmup_from_zero=self.warmup_from_zero)

    def apply(self, step: int) -> float:
        """Write step `step`'s rate into every group; returns the reference rate (the one logged as `lr`)."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = self._lr(step, base)
        return self._lr(step, self.reference_lr)
