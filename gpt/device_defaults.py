"""The settings a config may leave to the framework (`null`), filled in for the device the run is on.

On CUDA: `torch.compile` on, and the largest micro-batches whose estimated peak memory fits the GPU (for
training and, separately, for the curvature pass, whose double backward needs several times more). Off CUDA
(CPU runs, dry runs on a login node): compile off, micro-batches at most the paper's 12. Resolved once, before
the run's config is recorded, so `config.yaml` and the plan show the values used.
"""

from __future__ import annotations

import logging

import torch

from common.errors import UserError
from gpt.config import Settings
from gpt.memory import GiB, choose_micro_batch, device_memory, estimate_memory
from gpt.model import GPT
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


def resolve_device_defaults(settings: Settings, world_size: int, device: torch.device) -> None:
    """Fill `train.compile`, `train.micro_batch_size` and `train.hessian_micro_batch_size` where they are
    None (idempotent), and warn when an explicit micro-batch is estimated not to fit."""
    if settings.train.compile is None:
        settings.train.compile = _compile_available(device)
    resolve_micro_batches(settings, world_size, device_memory(device))


def state_per_parameter(settings: Settings) -> float:
    """fp32 optimizer state elements per parameter, as the optimizer's registry entry declares."""
    with torch.device("meta"):
        model = GPT(settings.model)
    return entry_for(settings.optim).state_numel(model, settings.optim) / model.num_params()


def resolve_micro_batches(settings: Settings, world_size: int, memory: int | None) -> None:
    """The micro-batches left None, for `world_size` GPUs of `memory` bytes each (None: not on CUDA)."""
    t, optim = settings.train, settings.optim
    common = dict(dtype=t.dtype, state_tensors=state_per_parameter(settings),
                  sharded=t.strategy == "fsdp", activation_checkpointing=t.activation_checkpointing)
    if t.micro_batch_size is None:
        # Where the protocol sums the micro-steps' losses (protocol=official, AdamW), their number defines
        # the run: the paper's micro-batch, not one that depends on the GPU's memory.
        sums = optim.get("name") in settings.protocol.summed_accumulation
        t.micro_batch_size = choose_micro_batch(settings.model, batch_size=t.global_batch_size,
                                                world_size=world_size, memory=None if sums else memory,
                                                kind="train", what="train.global_batch_size", **common)
    elif memory is not None:
        _warn_if_too_large(settings, t.micro_batch_size, "train.micro_batch_size", "train", memory,
                           dict(common, world_size=world_size))
    kind = entry_for(optim).curvature
    if kind is None:
        return
    batch_size = optim.get("hessian_batch_size") or t.global_batch_size
    if t.hessian_micro_batch_size is None:  # at most the training micro-batch: today's value where it fits
        t.hessian_micro_batch_size = choose_micro_batch(
            settings.model, batch_size=batch_size, world_size=world_size, memory=memory, kind=kind,
            what="optim.hessian_batch_size", ceiling=t.micro_batch_size, **common)
    else:
        if batch_size % (t.hessian_micro_batch_size * world_size):
            raise UserError(f"the curvature pass's {batch_size} sequences are not divisible by "
                            f"train.hessian_micro_batch_size={t.hessian_micro_batch_size} × world size "
                            f"{world_size}; pick a micro-batch whose product with the world size divides it")
        if memory is not None:
            _warn_if_too_large(settings, t.hessian_micro_batch_size, "train.hessian_micro_batch_size", kind,
                               memory, dict(common, world_size=world_size))


def _warn_if_too_large(settings: Settings, micro: int, key: str, kind: str, memory: int,
                       common: dict[str, object]) -> None:
    need = estimate_memory(settings.model, micro_batch_size=micro, kind=kind, **common).total
    if need > memory:
        log.warning("%s=%d needs ≈ %.1f GiB (estimated) of this GPU's %.0f GiB: expect an out-of-memory "
                    "error; set %s=null to pick one that fits, or train.activation_checkpointing=true",
                    key, micro, need / GiB, memory / GiB, key)


def out_of_memory_advice(settings: Settings) -> str:
    """What to change after an out-of-memory error, with the values this run used."""
    t = settings.train
    return (f"out of GPU memory at train.micro_batch_size={t.micro_batch_size} (curvature pass: "
            f"train.hessian_micro_batch_size={t.hessian_micro_batch_size}): set smaller ones, or null to "
            "have them chosen, or train.activation_checkpointing=true (docs/scaling.md)")

