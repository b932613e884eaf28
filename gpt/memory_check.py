"""Refuse, before any allocation, a plan that cannot fit in the machine's memory.

The figure is a lower bound of what one rank needs: fp32 weights, their gradients and the optimizer's
full-size state (sharded over the ranks under FSDP), plus one micro-batch's logits in the compute dtype.
Activations, temporaries and the allocator's slack come on top, so a plan refused here could never run; a
plan that passes may still run out of memory, which the plan's printout and docs/scaling.md help size. The
capacity is the GPU's total memory per rank, or on CPU the machine's RAM (or its cgroup limit) shared by the
ranks started on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.errors import UserError
from data.loader import BatchPlan
from gpt.config import Settings
from gpt.model import GPT
from optim import entry_for

GIB = 2**30


def lower_bound_bytes(settings: Settings, plan: BatchPlan, strategy: str) -> tuple[int, int]:
    """(bytes one rank needs at least, number of parameters); the model is built on the meta device."""
    with torch.device("meta"):
        model = GPT(settings.model)
    n_params = model.num_params()
    state_numel = entry_for(settings.optim).state_numel(model, settings.optim)  # as the registry declares
    training_state = 4 * (2 * n_params + state_numel) // (plan.world_size if strategy == "fsdp" else 1)
    element = torch.finfo(getattr(torch, settings.train.dtype)).bits // 8
    logits = plan.micro_batch_size * plan.block_size * settings.model.vocab_size * element
    return training_state + logits, n_params


def capacity_bytes(device: torch.device) -> tuple[int, str]:
    """Memory one rank may use, and what it is: the GPU's total, or RAM over the ranks on this machine."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total, f"the GPU ({torch.cuda.get_device_name(device)}) has {total / GIB:,.1f} GiB"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        ram = min(ram, int(limit)) if limit.isdigit() else ram
    except OSError:
        pass
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = f" shared by {ranks_here} ranks: {ram / ranks_here / GIB:,.1f} GiB each" if ranks_here > 1 else ""
    return ram // ranks_here, f"this machine has {ram / GIB:,.1f} GiB of RAM{share}"


def check_memory_fits(settings: Settings, plan: BatchPlan, strategy: str, device: torch.device) -> None:
    need, n_params = lower_bound_bytes(settings, plan, strategy)
    have, what = capacity_bytes(device)
    if need > have:
        raise UserError(
            f"this plan needs at least {need / GIB:,.1f} GiB per rank ({n_params:,} parameters with their "
            f"gradients and {settings.optim['name']} state, and one micro-batch's logits) but {what}; use a "
            "smaller model, micro-batch or block size, or shard it with train.strategy=fsdp over more ranks"
        )
