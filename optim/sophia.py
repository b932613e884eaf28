"""Sophia (Liu et al., arXiv 2305.14342): sign momentum clipped by a diagonal curvature estimate.

Both variants share the step: decoupled weight decay, m ← β1·m + (1−β1)·g without bias correction, then
θ ← θ − lr·sign(m)·min(|m|/denominator, 1). They differ in the curvature h and its denominator:
- `SophiaG` follows the official code (Liuhong99/Sophia): h is an EMA of ĝ⊙ĝ, ĝ the gradient of the mean
  cross-entropy against labels sampled from the model's own logits (GNB, `optim.curvature.gnb_loss`). ĝ⊙ĝ is
  1/bs times the Gauss-Newton diagonal of the mean loss, hence the denominator ρ·bs·h + ε, where `bs` is the
  number of predictions ĝ's mean loss covers: the curvature pass's sequences × block_size over all ranks
  (the official code's, and by default here, the tokens of an optimizer step).
- `SophiaH` uses Hutchinson's unbiased estimate u⊙Hu of the Hessian diagonal of the mean loss itself, so
  there is no bs factor; the estimate can be negative and the denominator is max(ρ·h, ε): h ≤ 0 gives a sign
  step. u is Gaussian as in the paper, or Rademacher on request (`probe`).
While h = 0 (before the first estimate) the ratio saturates and the step is lr·sign(m), as in the official
code. The updates are written as the official class writes them (`m.mul_(β1).add_(g, alpha=1−β1)`,
`h.mul_(β2).addcmul_(ĝ, ĝ, value=1−β2)`, `θ.addcmul_(sign(m), ratio, value=−lr)`), each multiply-add rounded
once (`optim.fma`), so that in float32 and float64 on CPU Sophia-G equals the official class bit for bit.
The default `fused=True` path runs a param group's update as one compiled call (`optim.fused`);
`fused=False` is the eager per-tensor reference loop; both give bit-identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from optim.base import BaseOptimizer
from optim.checks import check_hyperparameters
from optim.curvature import PROBES, aligned_estimates
from optim.fma import add_, addcmul_
from optim.fused import MultiTensorKernel
from optim.registry import OptimizerEntry, full_size_state, register


def _denominator(hessian: Tensor, scale: float, eps: float, floor: bool) -> Tensor:
    scaled = hessian * scale
    return scaled.clamp(min=eps) if floor else scaled + eps


def _sophia_step_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, hessian: Tensor, lr: float, decay: float, beta1: float,
    one_minus_beta1: float, scale: float, eps: float, floor: bool,
) -> None:
    # 1 − β1 arrives precomputed in float64: computing it inside the kernel would round β1 to float32 first.
    param.mul_(decay)
    add_(exp_avg.mul_(beta1), grad, one_minus_beta1)
    # The official θ.addcmul_(sign(m), min(|m| / d, 1), value=−lr) as θ + (−lr)·clip(m / d, ±1) rounded once:
    # the same product bit for bit (d > 0 and IEEE division is symmetric in sign), with fewer operations.
    add_(param, (exp_avg / _denominator(hessian, scale, eps, floor)).clamp(-1.0, 1.0), -lr)


def _sophia_g_step_(*args: Any) -> None:
    _sophia_step_(*args, floor=False)


def _sophia_h_step_(*args: Any) -> None:
    _sophia_step_(*args, floor=True)


def _gnb_hessian_ema_(hessian: Tensor, gnb_grad: Tensor, beta2: float, one_minus_beta2: float) -> None:
    addcmul_(hessian.mul_(beta2), gnb_grad, gnb_grad, one_minus_beta2)  # the official update_hessian


def _hutchinson_hessian_ema_(hessian: Tensor, estimate: Tensor, beta2: float, one_minus_beta2: float) -> None:
    add_(hessian.mul_(beta2), estimate, one_minus_beta2)


# One kernel per variant rather than one with a flag: each compiled function has its own recompile budget.
SOPHIA_G_STEP = MultiTensorKernel(_sophia_g_step_)
SOPHIA_H_STEP = MultiTensorKernel(_sophia_h_step_)
SOPHIA_G_HESSIAN_EMA = MultiTensorKernel(_gnb_hessian_ema_)  # h ← β2·h + (1−β2)·ĝ⊙ĝ, a group in one call
SOPHIA_H_HESSIAN_EMA = MultiTensorKernel(_hutchinson_hessian_ema_)  # h ← β2·h + (1−β2)·u⊙Hu


class _Sophia(BaseOptimizer):
    """The step, state and diagnostics shared by both variants; subclasses define the curvature."""

    # requires_initial_hessian is False: the first steps are sign steps until an estimate arrives
    _floor: bool  # denominator max(scale·h, ε) (True) or scale·h + ε (False)
    _step_kernel: MultiTensorKernel

    def _scale(self, group: dict[str, Any], bs: int | None) -> float:
        raise NotImplementedError

    def _state(self, param: Tensor) -> dict[str, Tensor]:
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def _step(self, closure: Callable[[], float] | None, bs: int | None) -> float | None:
        loss = self._loss_of(closure)
        for group in self.param_groups:
            beta1 = group["betas"][0]
            lr = group["lr"]
            params = list(self._stepped(group))
            states = [self._state(param) for param in params]
            tensors = (params, [param.grad for param in params], [state["exp_avg"] for state in states],
                       [state["hessian"] for state in states])
            floats = (lr, 1.0 - lr * group["weight_decay"], beta1, 1.0 - beta1, self._scale(group, bs),
                      group["eps"])
            self._step_kernel.select(group["fused"])(tensors, floats)
        return loss

    @torch.no_grad()
    def win_rate(self) -> float:
        """Fraction of coordinates whose step is not clipped (|m| < denominator), over all stepped params.

        The paper's health signal: tune ρ so it stays in 0.1-0.5 after an early peak. 0.0 before any step.
        """
        wins, total = [], 0
        for group in self.param_groups:
            scale = self._scale(group, None)
            for param in group["params"]:
                state = self.state.get(param)
                if state:
                    denominator = _denominator(state["hessian"], scale, group["eps"], self._floor)
                    wins.append((state["exp_avg"].abs() < denominator).sum())
                    total += param.numel()
        if not total:
            return 0.0
        count = torch.stack(wins).sum()  # one device sync, not one per tensor
        if isinstance(count, DTensor):  # FSDP: each rank counted its own shards
            count = count.full_tensor()
        return float(count) / total

    @torch.no_grad()
    def hessian_norm(self) -> float:
        """Global L2 norm of the curvature EMA h over all params (0.0 before any estimate)."""
        norms = [torch.linalg.vector_norm(state["hessian"]) for state in self.state.values()]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class SophiaG(_Sophia):
    """Sophia-G with the official code's update and API (`step(closure=None, bs=None)`, `update_hessian()`).

    `bs` (keyword-only, required) is the number of predictions the GNB loss averages over, all ranks and
    micro-steps (the official script passes the tokens per optimizer step); it lives in the param groups,
    and a `bs` passed to `step` overrides it for that step, as in the official training script. The
    defaults are the paper's GPT-2 small values.
    """

    curvature = "gnb"
    _floor = False
    _step_kernel = SOPHIA_G_STEP

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.05,
        weight_decay: float = 0.2,
        *,
        bs: int,
        eps: float = 1e-15,
        fused: bool = True,
    ) -> None:
        check_hyperparameters(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps, bs=bs)
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, bs=bs, eps=eps,
                        fused=fused)
        super().__init__(params, defaults)

    def _scale(self, group: dict[str, Any], bs: int | None) -> float:
        return group["rho"] * (group["bs"] if bs is None else bs)

    def step(self, closure: Callable[[], float] | None = None, bs: int | None = None) -> float | None:
        """One Sophia step on the current gradients; `bs` overrides the groups' bs for this step only."""
        return self._step(closure, bs)

    @torch.no_grad()
    def update_hessian(self) -> None:
        """Fold the current `.grad` (the GNB gradient ĝ) into h: h ← β2·h + (1−β2)·ĝ⊙ĝ."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            params = list(self._stepped(group))
            SOPHIA_G_HESSIAN_EMA.select(group["fused"])(
                ([self._state(param)["hessian"] for param in params], [param.grad for param in params]),
                (beta2, 1.0 - beta2))


class SophiaH(_Sophia):
    """Sophia-H: the Sophia step with h an EMA of Hutchinson estimates u⊙Hu.

    The official repository never shipped Sophia-H. Defaults: Sophia-G's lr, betas and weight decay; ρ = 0.01
    and ε = 1e-12 are levanter's γ and ε for its Sophia-H. `probe` is the distribution of the Hutchinson
    probe u the trainer draws: "gaussian" (the paper's and levanter's) or "rademacher" (lower variance).
    `update_hessian(estimates)` takes one tensor per parameter, aligned with
    `[p for g in optimizer.param_groups for p in g["params"]]`.
    """

    curvature = "hutchinson"
    _floor = True
    _step_kernel = SOPHIA_H_STEP

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.01,
        weight_decay: float = 0.2,
        *,
        eps: float = 1e-12,
        fused: bool = True,
        probe: str = "gaussian",
    ) -> None:
        check_hyperparameters(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps)
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps, fused=fused)
        super().__init__(params, defaults)
        self.probe = probe

    def _scale(self, group: dict[str, Any], bs: int | None) -> float:
        return group["rho"]

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        return self._step(closure, None)

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[Tensor]) -> None:
        """h ← β2·h + (1−β2)·estimate for every parameter (estimates aligned with the params, in order)."""
        per_group: dict[int, tuple[dict[str, Any], list[Tensor], list[Tensor]]] = {}
        for group, param, estimate in aligned_estimates(self.param_groups, estimates):
            _, hessians, values = per_group.setdefault(id(group), (group, [], []))
            hessians.append(self._state(param)["hessian"])
            values.append(estimate)
        for group, hessians, values in per_group.values():
            beta2 = group["betas"][1]
            SOPHIA_H_HESSIAN_EMA.select(group["fused"])((hessians, values), (beta2, 1.0 - beta2))


register(OptimizerEntry("sophia_g", lambda: SophiaG, full_size_state(2)))  # m, h
register(OptimizerEntry("sophia_h", lambda: SophiaH, full_size_state(2)))
