"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an interpolated momentum.

c = β1·m + (1−β1)·g; θ ← θ·(1 − lr·wd) − lr·sign(c); m ← β2·m + (1−β2)·g. One state tensor. Every coordinate
moves by exactly lr, so Lion's lr is 3-10× smaller than AdamW's and its weight decay correspondingly larger
(the effective decay is lr·wd). `fused=True` (default) runs each tensor's update as one compiled elementwise
kernel (`optim.fused`); `fused=False` is the eager per-tensor reference loop; both agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from optim.base import BaseOptimizer
from optim.checks import check_hyperparameters
from optim.fused import FusedKernel
from optim.registry import OptimizerEntry, full_size_state, register


def _lion_update_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, lr: float, decay: float, beta1: float,
    one_minus_beta1: float, beta2: float, one_minus_beta2: float,
) -> None:
    direction = (exp_avg * beta1 + grad * one_minus_beta1).sign()
    param.mul_(decay).sub_(direction * lr)
    exp_avg.mul_(beta2).add_(grad * one_minus_beta2)


LION_UPDATE = FusedKernel(_lion_update_)


class Lion(BaseOptimizer):
    """Lion with decoupled weight decay; defaults are the Lion paper's (configs/ sets the Sophia paper's)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        fused: bool = True,
    ) -> None:
        check_hyperparameters(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self._loss_of(closure)
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            update = LION_UPDATE.select(group["fused"])
            for param in self._stepped(group):
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                update(param, param.grad, state["exp_avg"], lr, 1.0 - lr * group["weight_decay"], beta1,
                       1.0 - beta1, beta2, 1.0 - beta2)
        return loss


register(OptimizerEntry("lion", lambda: Lion, full_size_state(1)))
