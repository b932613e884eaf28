"""What a run will do, printed before it starts: batch arithmetic, tokens, parameters, FLOPs, optimizer
memory, the protocol, and the wall-clock it should take on a named GPU at a stated MFU.

FLOPs per token are the model's (`GPT.flops_per_token`); a curvature pass adds a forward and backward over
its own batch every `hessian_interval` steps (Hutchinson's double backward is counted as two). Peaks are
dense bf16 tensor-core numbers from the vendors' data sheets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from data.loader import BatchPlan
from gpt.config import Settings
from gpt.protocol import describe_protocol
from optim import OPTIMIZERS

# Dense bf16/fp16 peak FLOP/s per device (fp32 runs use TF32 on these GPUs: half of it).
GPU_PEAKS = {"A100": 312e12, "H100": 989e12, "A5000": 111e12, "L40S": 362e12}
# Full-size state tensors per parameter (the plan's memory estimate; Adam-mini keeps only m in full).
STATE_TENSORS = {"adamw": 2, "sophia_g": 2, "sophia_h": 2, "lion": 1, "sgd_sai": 1, "adam_mini": 1,
                 "adahessian": 2}


# Forward+backward passes per curvature estimate, by estimator.
CURVATURE_PASSES = {"gnb": 1, "hutchinson": 2}


def training_flops_per_token(model: Any, optim: Mapping[str, Any], global_batch_size: int) -> float:
    """FLOPs per trained token, the optimizer's curvature passes included, so that a Sophia run pays for its
    Hessian estimates in every FLOPs figure (the plan's, and the analysis scripts')."""
    kind = getattr(OPTIMIZERS.get(optim["name"]), "curvature", None)
    if kind is None:
        return model.flops_per_token()
    share = (optim.get("hessian_batch_size") or global_batch_size) / global_batch_size
    per_step = share * CURVATURE_PASSES[kind] / (optim.get("hessian_interval") or 1)
    return model.flops_per_token() * (1 + per_step)


def _gpu_peak(name: str, dtype: str) -> float | None:
    """The table's peak for a device name containing a known GPU; fp32 runs on TF32 at half of it."""
    for key, peak in GPU_PEAKS.items():
        if key.lower() in name.lower():
            return peak if dtype != "float32" else peak / 2
    return None


def peak_flops(device: torch.device, dtype: str, gpu: str = "auto") -> float | None:
    """Peak FLOP/s of this device, or None where no peak is known (CPU): MFU is then reported as null."""
    if device.type != "cuda":
        return None
    return _gpu_peak(gpu if gpu != "auto" else torch.cuda.get_device_name(device), dtype)


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}"


def describe_plan(settings: Settings, plan: BatchPlan, model: Any, optimizer: Any, runtime: Any) -> str:
    """The plan as printed at start (and alone by `train.dry_run=true`); `model` may live on the meta
    device, since only its shapes are read."""
    t, optim = settings.train, settings.optim
    n_params = model.num_params()
    flops_per_step = training_flops_per_token(model, optim, t.global_batch_size) * plan.tokens_per_step
    curvature = getattr(optimizer, "curvature", None)
    total_flops = flops_per_step * t.max_steps
    state_gib = STATE_TENSORS.get(optim["name"], 2) * n_params * 4 / 2**30
    sharded = f" ({state_gib / plan.world_size:.2f} GiB per rank)" if runtime.strategy == "fsdp" else ""
    lines = [
        f"plan: {settings.model.name} ({_human(n_params)} parameters) with {optim['name']}"
        f" on {settings.data['name']}",
        f"  world size: {plan.world_size} ({runtime.strategy}, {runtime.device.type}, {t.dtype})",
        f"  batch: micro {plan.micro_batch_size} × accumulation {plan.grad_accum_steps}"
        f" × world {plan.world_size} = {plan.global_batch_size} sequences × {plan.block_size} tokens"
        f" = {plan.tokens_per_step:,} tokens/step",
        f"  steps: {t.max_steps:,} → {t.max_steps * plan.tokens_per_step / 1e9:.2f} B tokens",
        f"  compute: {_human(flops_per_step, 'FLOP')} per step, {_human(total_flops, 'FLOP')} in total"
        + (f" (incl. {curvature} curvature passes every {optim.get('hessian_interval')} steps)"
           if curvature else ""),
        f"  memory: weights {n_params * 4 / 2**30:.2f} GiB fp32,"
        f" optimizer state ≈ {state_gib:.2f} GiB{sharded}",
    ]
    lines.append(describe_protocol(settings.protocol, optim["name"], plan, t.grad_clip))
    gpus = [t.gpu] if t.gpu in GPU_PEAKS else list(GPU_PEAKS)[:2]
    count = plan.world_size if runtime.device.type == "cuda" else 8
    for gpu in gpus:
        peak = _gpu_peak(gpu, t.dtype)
        gpu_hours = total_flops / (peak * t.assumed_mfu) / 3600
        lines.append(f"  time at {t.assumed_mfu:.0%} MFU on {gpu} ({_human(peak, 'FLOP/s')} {t.dtype} peak):"
                     f" {gpu_hours:,.0f} GPU-hours = {gpu_hours / count:,.1f} h on {count} GPUs")
    return "\n".join(lines)
