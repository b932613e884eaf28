"""What a run will do, printed before it starts: batch arithmetic, tokens, parameters, FLOPs, optimizer
memory, the protocol, and the wall-clock it should take on a named GPU at a stated MFU, and for a CPU run on
this CPU, from a probe of the model (`gpt.step_probe`).

FLOPs per token are the model's (`GPT.flops_per_token`); a curvature pass adds a forward and backward over
its own batch every `hessian_interval` steps (Hutchinson's double backward is counted as two); an evaluation
is a forward (a third of a training token's FLOPs) over its validation sequences, at step 0, every
`eval_interval` steps and at the end. Peaks are dense bf16 tensor-core numbers from the vendors' data sheets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gpt.config import BatchPlan, Settings
from gpt.protocol import describe_protocol, evaluation_sequences
from gpt.step_probe import CpuEstimate
from optim import entry_for

# Dense (not 2:4-sparse) bf16/fp16 tensor-core peak FLOP/s per GPU, from the vendor's data sheets; fp32 runs
# use TF32 on these GPUs: half of it. A device name matches the longest key it contains, so "H100 PCIe" wins
# over "H100" (the SXM part) and "GH200" over "H200". The first two are the plan's default examples.
GPU_PEAKS = {
    "A100": 312e12,
    "H100": 989e12,  # SXM5 (device names like "NVIDIA H100 80GB HBM3")
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,  # SXM
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "L40S": 362e12,
    "A5000": 111e12,
}


# Forward+backward passes per curvature estimate, by estimator.
CURVATURE_PASSES = {"gnb": 1, "hutchinson": 2}


def training_flops_per_token(model: Any, optim: Mapping[str, Any], global_batch_size: int) -> float:
    """FLOPs per trained token, the optimizer's curvature passes included, so that a Sophia run pays for its
    Hessian estimates in every FLOPs figure (the plan's, and the analysis scripts')."""
    kind = entry_for(optim).curvature
    if kind is None:
        return model.flops_per_token()
    share = (optim.get("hessian_batch_size") or global_batch_size) / global_batch_size
    per_step = share * CURVATURE_PASSES[kind] / (optim.get("hessian_interval") or 1)
    return model.flops_per_token() * (1 + per_step)


def evaluation_count(steps: int, eval_interval: int) -> int:
    """Evaluations in a run of `steps` steps: at step 0, every `eval_interval` steps and after the last."""
    return steps // eval_interval + 1 + (steps % eval_interval != 0)


def _gpu_peak(name: str, dtype: str) -> float | None:
    """The table's peak for a device name containing a known GPU; fp32 runs on TF32 at half of it."""
    for key in sorted(GPU_PEAKS, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAKS[key] if dtype != "float32" else GPU_PEAKS[key] / 2
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


def _tokens(n: float) -> str:
    """A token count in B or M where it is that large: a tiny run is not "0.00 B tokens"."""
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix} tokens"
    return f"{n:,.0f} tokens"


def _bytes(n: float) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def _time(hours: float) -> tuple[str, str, str]:
    """(amount, long unit, short unit) in hours, minutes or seconds, whichever does not print as 0."""
    scale, unit, short = next(
        ((f, u, s) for f, u, s in ((1, "hours", "h"), (60, "minutes", "min")) if hours * f >= 1),
        (3600, "seconds", "s"),
    )
    amount = hours * scale
    return (f"{amount:,.0f}" if amount >= 10 else f"{amount:.2g}"), unit, short


def _gpu_time(gpu_hours: float, count: int) -> str:
    """GPU-hours and the wall-clock on `count` GPUs; minutes or seconds where hours would print as 0."""
    total, unit, _ = _time(gpu_hours)
    if gpu_hours / count >= 1:
        wall = f"{gpu_hours / count:,.1f} h"
    else:
        amount, _, short = _time(gpu_hours / count)
        wall = f"{amount} {short}"
    return f"{total} GPU-{unit} = {wall} on {count} GPUs"


def describe_cpu_time(estimate: CpuEstimate | None) -> str:
    """The plan's line for a CPU run: the probe's estimate, or why there is none."""
    if estimate is None:
        return "  time on this CPU: measured when the run starts (a probe of the model; not in a dry run)"
    total, unit, _ = _time(estimate.total_s / 3600)
    return (f"  time on this CPU (measured at start: {estimate.micro_step_s:.3g} s per micro-step → "
            f"{estimate.step_s:.3g} s per step, {estimate.eval_s:.3g} s per evaluation × "
            f"{estimate.evaluations}): ≈ {total} {unit}")


def describe_plan(settings: Settings, plan: BatchPlan, model: Any, optimizer: Any, runtime: Any,
                  cpu: CpuEstimate | None = None) -> str:
    """The plan as printed at start (and alone by `train.dry_run=true`); `model` may live on the meta
    device, since only its shapes are read. `cpu`: the probe's estimate, for a run on the CPU."""
    t, optim = settings.train, settings.optim
    n_params = model.num_params()
    flops_per_step = training_flops_per_token(model, optim, t.global_batch_size) * plan.tokens_per_step
    curvature = getattr(optimizer, "curvature", None)
    total_flops = flops_per_step * t.max_steps
    evaluations = evaluation_count(t.max_steps, t.eval_interval)
    sequences = evaluation_sequences(settings.protocol, t)
    eval_flops = evaluations * sequences * plan.block_size * model.flops_per_token() / 3  # forward only
    batches = settings.protocol.eval_batches
    drawn = f"{batches} micro-batches of fresh windows" if batches else "a fixed set"
    state_bytes = entry_for(optim).state_numel(model, optim) * 4  # float32, as the entry declares
    sharded = f" ({_bytes(state_bytes / plan.world_size)} per rank)" if runtime.strategy == "fsdp" else ""
    lines = [
        f"plan: {settings.model.name} ({_human(n_params)} parameters) with {optim['name']}"
        f" on {settings.data['name']}",
        f"  model: {settings.model.describe()}",
        f"  world size: {plan.world_size} ({runtime.strategy}, {runtime.device.type}, {t.dtype})",
        f"  batch: micro {plan.micro_batch_size} × accumulation {plan.grad_accum_steps}"
        f" × world {plan.world_size} = {plan.global_batch_size} sequences × {plan.block_size} tokens"
        f" = {plan.tokens_per_step:,} tokens/step",
        f"  steps: {t.max_steps:,} → {_tokens(t.max_steps * plan.tokens_per_step)}",
        f"  compute: {_human(flops_per_step, 'FLOP')} per step, {_human(total_flops, 'FLOP')} in total"
        + (f" (incl. {curvature} curvature passes every {optim.get('hessian_interval')} steps)"
           if curvature else ""),
        f"  evaluation: {evaluations:,} × {sequences:,} validation sequences ({drawn}):"
        f" {_human(eval_flops, 'FLOP')}, {eval_flops / total_flops:.2%} of training",
        f"  memory: weights {_bytes(n_params * 4)} fp32,"
        f" optimizer state ≈ {_bytes(state_bytes)}{sharded}",
    ]
    lines.append(describe_protocol(settings.protocol, optim["name"], plan, t.grad_clip))
    if runtime.device.type == "cpu":
        lines.append(describe_cpu_time(cpu))
    gpus = [t.gpu] if t.gpu in GPU_PEAKS else list(GPU_PEAKS)[:2]
    count = plan.world_size if runtime.device.type == "cuda" else 8
    for gpu in gpus:
        peak = _gpu_peak(gpu, t.dtype)
        gpu_hours = (total_flops + eval_flops) / (peak * t.assumed_mfu) / 3600
        lines.append(f"  time at {t.assumed_mfu:.0%} MFU on {gpu} ({_human(peak, 'FLOP/s')} {t.dtype} peak):"
                     f" {_gpu_time(gpu_hours, count)}")
    return "\n".join(lines)
