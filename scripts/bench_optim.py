"""Benchmark every registered optimizer's step on GPT-2-124M parameters against torch's fused AdamW.

The parameters are a real `gpt.model.GPT` at the 124M shape (wte 50304×768 tied to lm_head, wpe 1024×768, 12
blocks) or at the shape `--n-layer/--n-head/--n-embd/--vocab` give, with random gradients. Each optimizer in
the registry is built by `optim.build_optimizer` from `configs/optim/<name>.yaml` exactly as training builds
it (its own param groups), and timed in alternation with a `torch.optim.AdamW(fused=True)` over the same
parameters, so machine noise (other processes, frequency changes) hits both alike; the reported ratio is the
median of per-pair ratios. The first steps are warm-up and include any one-off `torch.compile` of the fused
kernels, reported separately. Achieved bandwidth uses a byte model (`ACCESSES`): the number of
parameter-sized float32 tensors a single-pass implementation must read or write per step, × 4 bytes ×
parameter count ÷ time. It is a lower bound on real traffic, so a multi-pass implementation shows up as low
GB/s. `calls` counts the operator calls one step makes from Python (ATen operators not inside another
operator, plus calls of compiled graphs, from the torch profiler): each is a fixed cost — a dispatch, an
OpenMP region or a GPU kernel launch — that the GPU does not overlap with work.

    python scripts/bench_optim.py [--reps 10] [--only sophia_g,lion] [--threads N] [--out bench_optim.json]
    python scripts/bench_optim.py --n-layer 2 --n-head 2 --n-embd 128 --vocab 512 --only adamw,sophia_g
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from gpt.model import GPT, GPTConfig
from optim import OPTIMIZERS, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
# Parameter-sized tensors read + written per step by a single-pass implementation; absent for optimizers whose
# step is matrix arithmetic (Muon's Newton-Schulz, SOAP's rotations), where bytes say little about speed.
ACCESSES = {
    "adamw": 7,  # read θ g m v, write θ m v
    "lion": 5,  # read θ g m, write θ m
    "sophia_g": 6,  # read θ g m h, write θ m
    "sophia_h": 6,
    "sgd_sai": 5,  # read θ g buf, write θ buf
    "adam_mini": 6,  # read g for the block means, then read θ g m, write θ m
    "adahessian": 6,  # read θ g m v, write θ m
    "adamw_schedulefree": 7,  # read y g z v, write y z v
}
HESSIAN_ACCESSES = 3  # update_hessian: read h and the estimate, write h
TOKENS_PER_STEP = 480 * 1024


def shipped_config(name: str) -> dict[str, Any]:
    """configs/optim/<name>.yaml: each optimizer as `optim=<name>` trains it (GPT-2 small values)."""
    return OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "optim" / f"{name}.yaml"))


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v))


def operator_calls(fn: Callable[[], Any]) -> int:
    """Operator calls `fn` makes from Python: ATen operators outside any other operator or compiled
    region, plus each call of a compiled region (its kernels count as one)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        fn()
    calls = 0
    for event in profiler.events():
        if event.name.startswith("Torch-Compiled Region"):
            calls += 1
        elif event.name.startswith("aten::"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith(("aten::", "Torch-Compiled Region")):
                parent = parent.cpu_parent
            calls += parent is None
    return calls


def bench(name: str, model: GPT, baseline: torch.optim.Optimizer, reps: int, warmup: int) -> dict[str, Any]:
    numel = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(shipped_config(name), model, TOKENS_PER_STEP)
    curvature = OPTIMIZERS[name].curvature
    update_hessian = None
    if curvature == "gnb":
        update_hessian = optimizer.update_hessian  # folds the current .grad in
    elif curvature == "hutchinson":
        estimates = [torch.randn_like(p) for group in optimizer.param_groups for p in group["params"]]

        def update_hessian() -> None:
            optimizer.update_hessian(estimates)

    if getattr(optimizer, "requires_initial_hessian", False):
        update_hessian()
    first = [timed(optimizer.step) for _ in range(warmup)]
    if update_hessian is not None:
        first.append(timed(update_hessian))
    step_times, base_times, hessian_times = [], [], []
    for _ in range(reps):
        step_times.append(timed(optimizer.step))
        base_times.append(timed(baseline.step))
        if update_hessian is not None:
            hessian_times.append(timed(update_hessian))
    step = statistics.median(step_times)
    calls = operator_calls(optimizer.step)
    ratios = [s / b for s, b in zip(step_times, base_times, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4)
    result = {
        "optimizer": name,
        "step_ms": 1e3 * step,
        "adamw_fused_ms": 1e3 * statistics.median(base_times),
        "ratio_vs_fused_adamw": statistics.median(ratios),
        "ratio_quartiles": [quartiles[0], quartiles[2]],  # the spread shows how noisy the machine was
        "state_bytes_per_param": state_bytes(optimizer) / numel,
        "operator_calls_per_step": calls,
        "update_hessian_operator_calls": operator_calls(update_hessian) if update_hessian else None,
        "gb_per_s": ACCESSES[name] * 4 * numel / step / 1e9 if name in ACCESSES else None,
        "warmup_s": sum(first),
        "update_hessian_ms": 1e3 * statistics.median(hessian_times) if hessian_times else None,
        "update_hessian_gb_per_s": (HESSIAN_ACCESSES * 4 * numel / statistics.median(hessian_times) / 1e9
                                    if hessian_times else None),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10, help="alternating optimizer/baseline pairs")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (include compilation)")
    parser.add_argument("--only", default=",".join(OPTIMIZERS), help="comma-separated optimizer names")
    parser.add_argument("--out", default="bench_optim.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = args.only.split(",")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; valid: {', '.join(OPTIMIZERS)}")

    torch.manual_seed(0)
    # default GPT-2 small: 12 layers, 12 heads, 768 wide, vocab 50304, no biases
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          vocab_size=args.vocab))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    baseline = build_optimizer(shipped_config("adamw"), model, TOKENS_PER_STEP)
    for _ in range(args.warmup):
        baseline.step()
    info = machine()
    load_before = os.getloadavg()  # other processes on the machine distort timings: record how busy it was
    print(f"GPT {args.n_layer}/{args.n_head}/{args.n_embd}, vocabulary {args.vocab}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; {info['cpu']}, "
          f"{info['cores']} cores, {info['torch_threads']} torch threads, torch {info['torch']}; "
          f"load average {load_before[0]:.2f}")
    results = []
    header = (f"{'optimizer':<18} {'step ms':>8} {'AdamW ms':>9} {'ratio':>6} {'ratio IQR':>11} "
              f"{'state B/param':>13} {'GB/s':>6} {'warmup s':>9} {'calls':>6} "
              f"{'update_hessian ms (calls)':>26}")
    print(header)
    for name in names:
        r = bench(name, model, baseline, args.reps, args.warmup)
        results.append(r)
        hessian = "" if r["update_hessian_ms"] is None else (
            f"{r['update_hessian_ms']:.1f} ({r['update_hessian_gb_per_s']:.0f} GB/s, "
            f"{r['update_hessian_operator_calls']})")
        low, high = r["ratio_quartiles"]
        gb_per_s = "" if r["gb_per_s"] is None else f"{r['gb_per_s']:.1f}"
        print(f"{name:<18} {r['step_ms']:8.1f} {r['adamw_fused_ms']:9.1f} {r['ratio_vs_fused_adamw']:6.2f} "
              f"{low:5.2f}-{high:<5.2f} {r['state_bytes_per_param']:13.2f} {gb_per_s:>6} "
              f"{r['warmup_s']:9.1f} {r['operator_calls_per_step']:6d} {hessian:>26}")
    with open(args.out, "w") as f:
        json.dump({"machine": info, "load_average": {"before": load_before, "after": os.getloadavg()},
                   "reps": args.reps,
                   "tokens_per_step": TOKENS_PER_STEP,
                   "byte_model_accesses": ACCESSES, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
