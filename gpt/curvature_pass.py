"""The trainer's side of curvature estimation: micro-batching, gradient sync and precision around the
estimators of `optim.curvature`.

GNB (Sophia-G): forward on the loader's Hessian stream, labels sampled from the model's own logits, mean
cross-entropy, backward with accumulation (all-reduced under DDP, reduce-scattered under FSDP, exactly like a
training step), optional global-norm clip, then `optimizer.update_hessian()`. The labels of global micro-batch
g = micro·world + rank are drawn from a generator seeded by g, so 1 rank × 2 micro-steps samples the same
labels as 2 ranks × 1. In float16 the loss is scaled by the training step's GradScaler and the gradient
unscaled before the update. Hutchinson (Sophia-H, AdaHessian): one probe u shared by all ranks (drawn from
the optimizer's `probe` distribution: Gaussian for Sophia-H unless configured, Rademacher for AdaHessian),
u ⊙ Hu summed over micro-batches by double backward through the math attention kernel on the unwrapped model,
averaged over ranks, then `optimizer.update_hessian(estimates)`. The pass has its own micro-batch size
(`train.hessian_micro_batch_size`): double backward through the math kernel keeps B·H·T² attention
probabilities and a second graph, several times a training micro-step's memory; Hutchinson's estimate does
not depend on it (the same probe and sequences, summed in another grouping), GNB's labels do (one draw per
global micro-batch). For both, an estimate that is not finite (an
fp16 overflow, or a diverging model) is skipped rather than folded into h, where it would stay for good.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from data.loader import BatchLoader
from gpt.distributed import Runtime, full_value, gradient_sync, unwrap
from gpt.model import math_attention
from gpt.seeding import derive_seed
from optim.base import optimized_parameters
from optim.curvature import PROBES, gnb_loss, hessian_vector_products

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurvatureSchedule:
    kind: str  # gnb | hutchinson
    interval: int
    batch_size: int  # sequences per pass over all ranks
    grad_clip: float  # 0: no clip of the GNB gradient
    at_start: bool  # the optimizer needs an estimate before its first step
    micro_batch_size: int | None = None  # sequences per forward on one rank; None: the training micro-batch

    def due(self, step: int) -> bool:
        """At the start of step s: the parameters equal those after step s-1, where the official code runs."""
        return step % self.interval == 0 and (step > 0 or self.at_start)


class PhaseTimes:
    """Seconds spent in each phase of curvature passes (forward, sampling, backward, update), summed over
    passes: for benchmarks. Timing a phase waits for the device, which a training run must not do."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._synchronize()
        start = time.perf_counter()
        yield
        self._synchronize()
        self.seconds[phase] += time.perf_counter() - start

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _untimed(phase: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _update_if_finite(update: Callable[[], None], norm: float, step: int) -> None:
    if math.isfinite(norm):
        update()
    else:
        log.warning("curvature estimate at step %d is not finite (norm %s); h keeps its previous value",
                    step, norm)


def run_curvature_pass(
    schedule: CurvatureSchedule,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: BatchLoader,
    step: int,
    seed: int,
    runtime: Runtime,
    autocast: Callable[[], contextlib.AbstractContextManager],
    scaler: torch.amp.GradScaler,
    phases: PhaseTimes | None = None,
) -> float:
    """Refresh the optimizer's curvature estimate; returns the pass's wall-clock seconds. `phases`, when
    given, also accumulates the time of each phase."""
    start = time.perf_counter()
    estimate = _PASSES.get(schedule.kind)
    if estimate is None:
        raise ValueError(f"unknown curvature estimator {schedule.kind!r}")
    optimizer.zero_grad(set_to_none=True)
    estimate(_Pass(schedule, model, optimizer, loader, step, seed, runtime, autocast, scaler,
                   phases or _untimed))
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@dataclass(frozen=True)
class _Pass:
    """What one curvature pass works with."""

    schedule: CurvatureSchedule
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: BatchLoader
    step: int
    seed: int
    runtime: Runtime
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler
    timed: Callable[[str], contextlib.AbstractContextManager]

    @property
    def micro_steps(self) -> int:
        micro = self.schedule.micro_batch_size or self.loader.plan.micro_batch_size
        return self.schedule.batch_size // (micro * self.runtime.world_size)

    def batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loader.hessian_batch(self.step, micro, self.schedule.batch_size,
                                         self.schedule.micro_batch_size)


def _gnb_pass(p: _Pass) -> None:
    """Sophia-G's: the mean cross-entropy against labels sampled from the model's own logits, backward with
    accumulation and gradient sync like a training step, the optional clip, then `update_hessian()`."""
    params, accum, timed, runtime = optimized_parameters(p.optimizer), p.micro_steps, p.timed, p.runtime
    loss_scale = p.scaler.get_scale() if p.scaler.is_enabled() else 1.0
    for micro in range(accum):
        x, _ = p.batch(micro)
        generator = torch.Generator(device=x.device)
        generator.manual_seed(derive_seed(p.seed, "gnb", p.step, micro * runtime.world_size + runtime.rank))
        with gradient_sync(p.model, micro == accum - 1):
            with timed("forward"), p.autocast():
                logits, _ = p.model(x)
            with timed("sampling"):
                loss = gnb_loss(logits, generator)
            with timed("backward"):
                (loss * (loss_scale / accum)).backward()
    with timed("update"):
        if loss_scale != 1.0:
            for param in params:
                if param.grad is not None:
                    param.grad.mul_(1.0 / loss_scale)
        max_norm = p.schedule.grad_clip if p.schedule.grad_clip > 0 else math.inf
        norm = full_value(torch.nn.utils.clip_grad_norm_(params, max_norm)).item()  # equal on all ranks
        _update_if_finite(p.optimizer.update_hessian, norm, p.step)


def _hutchinson_pass(p: _Pass) -> None:
    """Sophia-H's and AdaHessian's: u ⊙ Hu for one probe shared by all ranks, summed over micro-batches by
    double backward through the math attention kernel, averaged over ranks, then `update_hessian(...)`."""
    params, accum, runtime = optimized_parameters(p.optimizer), p.micro_steps, p.runtime
    generator = torch.Generator(device=runtime.device)
    generator.manual_seed(derive_seed(p.seed, "hutchinson", p.step))  # the same probe on every rank
    probes = PROBES[p.optimizer.probe](params, generator)
    estimates = [torch.zeros_like(param) for param in params]
    raw = unwrap(p.model)
    with math_attention():
        for micro in range(accum):
            x, y = p.batch(micro)
            with p.timed("forward"), p.autocast():
                _, loss = raw(x, y)
            with p.timed("backward"):  # the double backward
                products = hessian_vector_products(loss / accum, params, probes)
                torch._foreach_add_(estimates, torch._foreach_mul(products, probes))
    if runtime.distributed:
        flat = torch.cat([e.reshape(-1) for e in estimates])
        runtime.all_reduce(flat, "mean")
        estimates = [e.view_as(param) for e, param in
                     zip(torch.split(flat, [e.numel() for e in estimates]), params, strict=True)]
    norm = torch.nn.utils.get_total_norm(estimates).item()  # equal on all ranks after the mean
    _update_if_finite(lambda: p.optimizer.update_hessian(estimates), norm, p.step)


_PASSES = {"gnb": _gnb_pass, "hutchinson": _hutchinson_pass}
