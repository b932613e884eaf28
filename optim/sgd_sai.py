"""SGD-SaI (Xu et al., arXiv 2412.11768): SGD with momentum and per-tensor lr scales frozen at the start.

At a tensor's first step with a gradient, g-SNR = ‖g‖₂ / (std(g) + eps) (torch's default, unbiased std) is
computed once and kept in the optimizer state as a Python float, so it survives a checkpoint exactly and a
resumed run does not recompute it from a later gradient. Then buf ← μ·buf + (1−μ)·g (buf = g at the first
step; no buffer at all when μ = 0) and θ ← θ·(1 − lr·wd) − lr·gsnr·buf. Decisions where the reference code
breaks: a 1-element tensor has no standard deviation, so its g-SNR is defined as 1.0 (zero-mean noise has
g-SNR ≈ √numel, which is 1 for one element) instead of the reference's enormous scale; a parameter without a
gradient at step 1 gets its g-SNR at its own first gradient; the closure runs once. A gradient that is all
zeros at that first step gives g-SNR 0 and freezes the tensor, exactly as the formula says.
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


def _sgd_step_(param: Tensor, direction: Tensor, decay: float, step_size: float) -> None:
    param.mul_(decay).sub_(direction * step_size)


def _momentum_sgd_step_(
    param: Tensor, grad: Tensor, buffer: Tensor, decay: float, step_size: float, momentum: float,
    one_minus_momentum: float,
) -> None:
    buffer.mul_(momentum).add_(grad * one_minus_momentum)
    param.mul_(decay).sub_(buffer * step_size)


SGD_STEP = FusedKernel(_sgd_step_)
MOMENTUM_SGD_STEP = FusedKernel(_momentum_sgd_step_)


def gradient_snr(grad: Tensor, eps: float) -> float:
    """‖g‖₂ / (std(g) + eps), the paper's g-SNR; 1.0 for a 1-element tensor, whose std is undefined."""
    if grad.numel() == 1:
        return 1.0
    return float(torch.linalg.vector_norm(grad) / (grad.std() + eps))


class SGDSaI(BaseOptimizer):
    """SGD-SaI. `lr` has no default: the paper tunes it per task and no GPT-2 value is published."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        *,
        fused: bool = True,
    ) -> None:
        check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, fused=fused)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self._loss_of(closure)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            decay = 1.0 - lr * group["weight_decay"]
            sgd_step = SGD_STEP.select(group["fused"])
            momentum_sgd_step = MOMENTUM_SGD_STEP.select(group["fused"])
            for param in self._stepped(group):
                grad, state = param.grad, self.state[param]
                if "gsnr" not in state:
                    state["gsnr"] = gradient_snr(grad, group["eps"])
                step_size = lr * state["gsnr"]
                if momentum == 0:
                    sgd_step(param, grad, decay, step_size)
                elif "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone(memory_format=torch.preserve_format)
                    sgd_step(param, state["momentum_buffer"], decay, step_size)
                else:
                    momentum_sgd_step(param, grad, state["momentum_buffer"], decay, step_size, momentum,
                                      1.0 - momentum)
        return loss


register(OptimizerEntry("sgd_sai", lambda: SGDSaI, full_size_state(1)))  # buf; g-SNR is a float
