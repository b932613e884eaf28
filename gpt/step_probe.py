"""The time a CPU run will take, from a probe of the real model on this machine, for the plan.

No CPU has a peak FLOP/s a plan could divide by (it depends on the cores, the vectoriser, the matrix sizes
and what else the machine is running), so the plan times a few forward+backward micro-steps of the model
the run trains, on its micro-batch shape, at start-up, and scales them: a step is `grad_accum_steps`
micro-steps (times the curvature passes' share of the FLOPs), an evaluation a forward over
`train.eval_sequences` sequences (a third of a forward+backward). The probe reads and writes no state the
run keeps: its tokens are zeros, and the gradients it leaves are dropped; every step draws its own seeds.
The optimizer's update and the checkpoints are not timed: the estimate is a little low, more so for an
optimizer with much arithmetic per parameter on a small model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

PROBE_BUDGET_S = 1.0  # timed micro-steps go on until this long has passed (at least 1, at most 3)
# At most this many tokens per timed micro-step: a longer micro-batch (a huge context) is timed on a shorter
# one and scaled by the FLOPs, so that the probe itself never outlasts a stop signal's grace.
PROBE_MAX_TOKENS = 4096
FORWARD_SHARE = 1 / 3  # a forward's share of a forward+backward (2 of 6 FLOPs per parameter and token)


@dataclass(frozen=True)
class CpuEstimate:
    micro_step_s: float  # one forward+backward of one micro-batch, measured
    step_s: float  # one optimizer step
    eval_s: float  # one evaluation
    evaluations: int
    total_s: float


def time_micro_step(model: torch.nn.Module, micro_batch_size: int, block_size: int, device: torch.device,
                    autocast: Callable[[], AbstractContextManager]) -> float:
    """Seconds per forward+backward of one micro-batch: the best of up to 3 timed, after one untimed."""
    tokens = torch.zeros(micro_batch_size, block_size, dtype=torch.long, device=device)
    best, spent = math.inf, 0.0
    for attempt in range(4):
        started = time.perf_counter()
        with autocast():
            _, loss = model(tokens, tokens)
        loss.backward()
        seconds = time.perf_counter() - started
        if attempt:  # the first pays for allocations
            best, spent = min(best, seconds), spent + seconds
            if spent >= PROBE_BUDGET_S:
                break
    model.zero_grad(set_to_none=True)
    return best


def probe_shape(micro_batch_size: int, block_size: int) -> tuple[int, int]:
    """The (sequences, tokens each) timed: the run's micro-batch, or a part of it of PROBE_MAX_TOKENS."""
    length = min(block_size, PROBE_MAX_TOKENS)
    return max(1, min(micro_batch_size, PROBE_MAX_TOKENS // length)), length


def cpu_estimate(micro_step_s: float, *, grad_accum_steps: int, micro_batch_size: int, compute_factor: float,
                 max_steps: int, eval_interval: int, eval_sequences: int) -> CpuEstimate:
    """The wall-clock of a run of `max_steps` steps with the trainer's evaluations (at step 0, every
    `eval_interval` steps and at the end), from one measured micro-step. `compute_factor`: the run's
    FLOPs per token over the model's forward+backward (above 1 for an optimizer with curvature passes)."""
    step_s = micro_step_s * grad_accum_steps * compute_factor
    eval_s = micro_step_s * FORWARD_SHARE * math.ceil(eval_sequences / micro_batch_size)
    evaluations = 1 + max_steps // eval_interval + (max_steps % eval_interval != 0)  # step 0 and the last
    return CpuEstimate(micro_step_s, step_s, eval_s, evaluations, step_s * max_steps + eval_s * evaluations)
