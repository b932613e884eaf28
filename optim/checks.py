"""Range checks for optimizer hyper-parameters, shared so every optimizer words its errors the same way.

The messages name the keyword exactly as the configs spell it, because the registry turns these `ValueError`s
into `UserError`s that point the user at `optim.<key>`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "rho": (lambda v: v >= 0, ">= 0"),
    "eps": (lambda v: v > 0, "> 0"),
    "hessian_power": (lambda v: v > 0, "> 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "bs": (lambda v: v > 0, "> 0 (predictions per optimizer step)"),
    "n_head": (lambda v: v > 0, "> 0"),
}


def check_hyperparameters(**values: Any) -> None:
    """Raise ValueError for the first value out of its range; `betas` must be two values in [0, 1)."""
    for name, value in values.items():
        if name == "betas":
            if len(value) != 2 or not all(0.0 <= beta < 1.0 for beta in value):
                raise ValueError(f"betas must be two values in [0, 1), got {value}")
            continue
        valid, wording = _RANGES[name]
        if not valid(value):
            raise ValueError(f"{name} must be {wording}, got {value}")
