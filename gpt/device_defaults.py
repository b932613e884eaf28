"""The settings a config may leave to the framework (`null`), decided for the device the run is on, and the
refusal of a plan that cannot fit that device at all.

On CUDA: `torch.compile` and background checkpoint writes on, and the largest micro-batches whose estimated
peak memory fits the GPU (for training and, separately, for the curvature pass, whose double backward needs
several times more). Off CUDA (CPU runs, dry runs on a login node): both off (the CPU's cores would both train
and write), micro-batches at most the paper's 12. Decided once, by `gpt.settings.load_settings`, before the
run's config is recorded, so `config.yaml` and the plan show the values used. The figures come from
`gpt.memory`; this module is the only one that decides with them.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from common.errors import UserError
from gpt.config import BatchPlan, Settings, TrainSettings, curvature_batch_size, split_over_ranks
from gpt.memory import (
    GiB,
    choose_micro_batch,
    device_capacity,
    estimate_memory,
    lower_bound_bytes,
    meta_model,
    state_per_parameter,
)
from optim import entry_for

log = logging.getLogger(__name__)


def _compile_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False  # on CPU compilation costs more than it saves on the runs made there
    try:
        import triton  # noqa: F401  (Inductor's CUDA backend)
    except ImportError:
        log.warning("train.compile: triton is not installed, so the model runs eagerly (pip install triton)")
        return False
    return True


def resolve_train_settings(parsed: Settings, world_size: int, device: torch.device,
                           gpu_memory: int | None = None) -> TrainSettings:
    """`parsed.train` with `compile`, `async_checkpoint`, `micro_batch_size` and `hessian_micro_batch_size`
    filled in where None, for `world_size` ranks on `device` (GPUs of `gpu_memory` bytes: by default the
    device's own; off CUDA no fit is computed). Warns when an explicit micro-batch is estimated not to fit."""
    t, optim = parsed.train, parsed.optim
    if gpu_memory is None and device.type == "cuda":
        gpu_memory = device_capacity(device)[0]
    model = meta_model(parsed.model)
    common = dict(dtype=t.dtype, state_tensors=state_per_parameter(model, optim), world_size=world_size,
                  sharded=t.strategy == "fsdp", activation_checkpointing=t.activation_checkpointing)
    micro = t.micro_batch_size
    if micro is None:
        # Where the protocol sums the micro-steps' losses (protocol=official, AdamW), their number defines
        # the run: the paper's micro-batch, not one that depends on the GPU's memory.
        sums = optim["name"] in parsed.protocol.summed_accumulation
        per_rank = split_over_ranks(t.global_batch_size, world_size, "train.global_batch_size")
        micro = choose_micro_batch(model, per_rank=per_rank, memory=None if sums else gpu_memory,
                                   kind="train", what="train.global_batch_size", **common)
    elif gpu_memory is not None:
        _warn_if_too_large(model, micro, "train.micro_batch_size", "train", gpu_memory, common)
    hessian_micro = t.hessian_micro_batch_size
    kind, batch_size = entry_for(optim).curvature, curvature_batch_size(parsed)
    if kind is not None and hessian_micro is None:  # at most the training micro-batch
        per_rank = split_over_ranks(batch_size, world_size, "optim.hessian_batch_size")
        hessian_micro = choose_micro_batch(model, per_rank=per_rank, memory=gpu_memory, kind=kind,
                                           what="optim.hessian_batch_size", ceiling=micro, **common)
    elif kind is not None and gpu_memory is not None:
        _warn_if_too_large(model, hessian_micro, "train.hessian_micro_batch_size", kind, gpu_memory, common)
    on_cuda = device.type == "cuda"
    return replace(t, micro_batch_size=micro, hessian_micro_batch_size=hessian_micro,
                   compile=_compile_available(device) if t.compile is None else t.compile,
                   async_checkpoint=on_cuda if t.async_checkpoint is None else t.async_checkpoint)


def _warn_if_too_large(model: torch.nn.Module, micro: int, key: str, kind: str, memory: int,
                       common: dict[str, object]) -> None:
    need = estimate_memory(model, micro_batch_size=micro, kind=kind, **common).total
    if need > memory:
        log.warning("%s=%d needs ≈ %.1f GiB (estimated) of this GPU's %.0f GiB: expect an out-of-memory "
                    "error; set %s=null to pick one that fits, or train.activation_checkpointing=true",
                    key, micro, need / GiB, memory / GiB, key)


def check_memory_fits(settings: Settings, plan: BatchPlan, device: torch.device) -> None:
    """Refuse, before any allocation, a plan whose lower bound exceeds what one rank has."""
    model = meta_model(settings.model)
    shards = plan.world_size if settings.train.strategy == "fsdp" else 1
    need = lower_bound_bytes(model, settings.optim, micro_batch_size=plan.micro_batch_size,
                             dtype=settings.train.dtype, shards=shards)
    have, what = device_capacity(device)
    if need > have:
        raise UserError(
            f"this plan needs at least {need / GiB:,.1f} GiB per rank ({model.num_params():,} parameters "
            f"with their gradients and {settings.optim['name']} state, and one micro-batch's logits) but "
            f"{what}; use a smaller model, micro-batch or block size, or shard it with train.strategy=fsdp "
            "over more ranks"
        )


def out_of_memory_advice(settings: Settings) -> str:
    """What to change after an out-of-memory error, with the values this run used."""
    t = settings.train
    return (f"out of GPU memory at train.micro_batch_size={t.micro_batch_size} (curvature pass: "
            f"train.hessian_micro_batch_size={t.hessian_micro_batch_size}): set smaller ones, or null to "
            "have them chosen, or train.activation_checkpointing=true (docs/scaling.md)")
