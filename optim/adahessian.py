"""AdaHessian (Yao et al., AAAI 2021): Adam with the squared Hutchinson Hessian diagonal as second moment.

D = |u⊙Hu| (u Rademacher); m ← β1·m + (1−β1)·g and v ← β2·v + (1−β2)·D², each bias-corrected with its own
counter (steps for m, curvature updates for v, so estimates can arrive every k steps); denominator
v̂^(k_h/2) + eps with k_h the Hessian power; θ ← θ·(1 − lr·wd) − lr·m̂/denominator. `update_hessian(estimates)`
takes the raw u⊙Hu like Sophia-H (the absolute value vanishes under the square). Unlike the reference code,
estimates are matched to parameters across several param groups by one running index, and the optimizer
refuses to step before its first estimate (`requires_initial_hessian`: v̂ would be 0/0). The reference's
spatial averaging applies to convolution kernels only and is not implemented: GPT has none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from optim.base import BaseOptimizer
from optim.checks import check_hyperparameters
from optim.curvature import aligned_estimates
from optim.fused import EMA_SQUARE, FusedKernel
from optim.registry import OptimizerEntry, full_size_state, register


def _adahessian_update_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_hessian_diag_sq: Tensor, decay: float, beta1: float,
    one_minus_beta1: float, step_size: float, bias_correction2: float, exponent: float, eps: float,
) -> None:
    param.mul_(decay)
    exp_avg.mul_(beta1).add_(grad * one_minus_beta1)
    denominator = (exp_hessian_diag_sq / bias_correction2).pow(exponent) + eps
    param.sub_(exp_avg / denominator * step_size)


ADAHESSIAN_UPDATE = FusedKernel(_adahessian_update_)


class AdaHessian(BaseOptimizer):
    """AdaHessian with decoupled weight decay; defaults are the AdaHessian paper's."""

    curvature = "hutchinson"
    requires_initial_hessian = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        *,
        fused: bool = True,
    ) -> None:
        check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              hessian_power=hessian_power)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        hessian_power=hessian_power, fused=fused)
        super().__init__(params, defaults)

    def _state(self, param: Tensor) -> dict[str, Any]:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["hessian_step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_hessian_diag_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[Tensor]) -> None:
        """v ← β2·v + (1−β2)·(u⊙Hu)² for every parameter (estimates aligned with the params, in order)."""
        for group, param, estimate in aligned_estimates(self.param_groups, estimates):
            beta2 = group["betas"][1]
            state = self._state(param)
            EMA_SQUARE.select(group["fused"])(state["exp_hessian_diag_sq"], estimate, beta2, 1.0 - beta2)
            state["hessian_step"] += 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self._loss_of(closure)
        stepped = [p for group in self.param_groups for p in self._stepped(group)]
        if any(self._state(p)["hessian_step"] == 0 for p in stepped):  # checked before any tensor changes
            raise RuntimeError("AdaHessian.step() before update_hessian(): it needs a curvature estimate "
                               "first (requires_initial_hessian)")
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            update = ADAHESSIAN_UPDATE.select(group["fused"])
            for param in self._stepped(group):
                state = self.state[param]
                state["step"] += 1
                step_size = lr / (1.0 - beta1 ** state["step"])
                update(param, param.grad, state["exp_avg"], state["exp_hessian_diag_sq"],
                       1.0 - lr * group["weight_decay"], beta1, 1.0 - beta1, step_size,
                       1.0 - beta2 ** state["hessian_step"], group["hessian_power"] / 2, group["eps"])
        return loss


register(OptimizerEntry("adahessian", lambda: AdaHessian, full_size_state(2)))
