"""The one place where a composed config becomes a run's final settings.

`load_settings` types and checks the config (`gpt.config`), fills in what it leaves to the framework for the
device and world size the run will have (`gpt.device_defaults`), resolves the values recorded resolved (the
schedule's length, the official protocol's extra step and summed micro-steps), and returns them frozen with
the batch plan they imply. Nothing downstream changes them: what `config.yaml`, the plan and the checkpoints
record is what the run does, its paths absolute (`gpt.run_paths`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from gpt.config import BatchPlan, Settings, curvature_batch_size, parse_config
from gpt.device_defaults import resolve_train_settings
from gpt.distributed import environment_world_size, planned_device
from gpt.run_paths import absolute_settings, prefer_recorded_data


def load_settings(cfg: DictConfig, *, world_size: int | None = None, device: torch.device | None = None,
                  gpu_memory: int | None = None) -> tuple[Settings, BatchPlan]:
    """The final settings of `cfg` and their batch plan, for `world_size` ranks (default: this job's, read
    before any rendezvous) on `device` (default: the one this process will train on), whose GPUs have
    `gpu_memory` bytes (default: the device's own). A rule broken is a `UserError`, on every rank."""
    parsed = absolute_settings(parse_config(cfg))  # recorded absolute: the run folder reads from anywhere
    if not parsed.train.dry_run:  # a resume from elsewhere reads the data folder the run recorded
        parsed = prefer_recorded_data(parsed, Path(parsed.out_dir))
    world_size = environment_world_size() if world_size is None else world_size
    device = planned_device(parsed.train.device) if device is None else device
    train = resolve_train_settings(parsed, world_size, device, gpu_memory)
    if parsed.protocol.extra_final_step:
        # The official loop steps at iterations 0 through max_iters: one more step, at the final lr. Recorded
        # as the budget trained, so config.yaml, the plan and the metrics all show the steps really taken.
        train = replace(train, max_steps=train.max_steps + 1)
    schedule = parsed.schedule
    if schedule.decay_steps is None and schedule.name != "constant":
        # Recorded resolved, so that a resume with another max_steps, which would reshape the schedule of
        # steps already trained, differs from the run in an experiment-defining key and is refused.
        schedule = replace(schedule, decay_steps=parsed.train.max_steps)
    plan = BatchPlan(train.global_batch_size, train.micro_batch_size, parsed.model.block_size, world_size,
                     hessian_batch_size=curvature_batch_size(parsed),
                     hessian_micro_batch_size=train.hessian_micro_batch_size)
    # Where the protocol sums micro-step losses, their number sets the effective clip threshold: recorded,
    # so a resume with another micro-batch or world size is refused like any other change of experiment.
    sums = parsed.optim["name"] in parsed.protocol.summed_accumulation
    protocol = replace(parsed.protocol, summed_micro_steps=plan.grad_accum_steps if sums else 0)
    return replace(parsed, train=train, schedule=schedule, protocol=protocol), plan
