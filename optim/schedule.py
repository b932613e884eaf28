"""Learning-rate schedules: pure functions of the step, so a resumed run needs no scheduler state.

`cosine` is nanoGPT's: linear warmup lr·(step+1)/(warmup_steps+1) for step < warmup_steps (never exactly 0,
so step 0 already moves), then cosine from lr down to min_lr, reached at decay_steps and held after. The
nanoGPT fork the official Sophia code was built on warmed up from 0 as lr·step/warmup_steps
(`warmup_from_zero=True`, the official protocol's); the two differ by one step's worth of lr during warmup.
`constant` is the same warmup then a flat lr, for ablations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
