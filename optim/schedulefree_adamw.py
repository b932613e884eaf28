"""Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled", arXiv 2405.15682), the winner of
AlgoPerf's self-tuning track, from Meta's `schedulefree` package (an optional extra:
`pip install '.[schedulefree]'`).

It keeps two sequences: z, the Adam-like base iterate, and x, a running average of z; gradients are taken at
y, an interpolation of the two. The model's parameters hold y while training but x is the model to evaluate,
so the optimizer switches them: `optimizer.eval()` before every evaluation and checkpoint, `optimizer.train()`
after (the entry's `evaluation_weights`). A checkpoint therefore stores x with z, and resuming switches back
to y exactly as the straight run did after the same save. The averaging replaces a decaying schedule: only
the constant schedule (with its linear warm-up) is accepted. The warm-up is the trainer's, so the package's
own `warmup_steps` is fixed at 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from optim.registry import OptimizerEntry, full_size_state, optional_class, register


def _switch(optimizer: torch.optim.Optimizer, evaluation: bool) -> None:
    """The package's eval() or train(), minus the empty state entries its loop leaves for parameters it has
    not stepped: torch.distributed.checkpoint takes an optimizer with any state entry for an initialised one,
    and would then load no state into a fresh one."""
    (optimizer.eval if evaluation else optimizer.train)()
    for param in [param for param, state in optimizer.state.items() if not state]:
        del optimizer.state[param]


@contextlib.contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The parameters hold x (the average) inside, y (where gradients are taken) again after. A fresh
    optimizer has nothing to switch (x = y) and stays in train mode, the mode a checkpoint is loaded into
    (sharded loading runs one step with lr 0 to lay out the state); the loaded groups then say "eval mode",
    as they were saved, and leaving switches the loaded x back to y."""
    if optimizer.state:
        _switch(optimizer, evaluation=True)
    try:
        yield
    finally:
        _switch(optimizer, evaluation=False)


def _in_train_mode(cls: type[torch.optim.Optimizer], groups: list[dict[str, Any]], kwargs: dict[str, Any]
                   ) -> torch.optim.Optimizer:
    optimizer = cls(groups, **kwargs, warmup_steps=0)
    _switch(optimizer, evaluation=False)  # the package starts in eval mode and refuses to step there
    return optimizer


register(OptimizerEntry(
    "adamw_schedulefree", optional_class("schedulefree", "AdamWScheduleFree", "schedulefree"),
    full_size_state(2),  # z and the second moment; x is the parameter itself
    schedules=("constant",),
    schedule_reason="its iterate average replaces a decaying schedule; schedule.warmup_steps still warms up",
    reserved={"warmup_steps": "the trainer's: schedule.warmup_steps warms up the constant schedule"},
    build=_in_train_mode, evaluation_weights=averaged_weights,
))
