"""The base of this package's optimizers: the trainer's curvature protocol and torch's closure convention.

An optimizer with `curvature = "gnb"` gets `update_hessian()` after the trainer's GNB pass has left ĝ in
`.grad`; with `"hutchinson"` it gets `update_hessian(estimates)`, one u⊙Hu per parameter in param-group order.
`requires_initial_hessian` asks for a pass before the first step (AdaHessian: its denominator would be 0/0);
`probe` names the Hutchinson probe distribution in `optim.curvature.PROBES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


def optimized_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of `optimizer`, in param-group order: the order `update_hessian(estimates)` expects."""
    return [param for group in optimizer.param_groups for param in group["params"]]


class BaseOptimizer(torch.optim.Optimizer):
    curvature: str | None = None  # None | "gnb" | "hutchinson"
    requires_initial_hessian = False
    probe = "rademacher"  # Hutchinson's u; Sophia-H sets its own per instance

    @staticmethod
    def _loss_of(closure: Callable[[], float] | None) -> float | None:
        """torch.optim's contract: `step(closure)` re-evaluates the loss with gradients enabled."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _stepped(group: dict[str, Any]) -> Iterator[Tensor]:
        """The group's parameters that have a gradient this step (the others are left untouched)."""
        return (param for param in group["params"] if param.grad is not None)
