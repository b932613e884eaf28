"""Benchmark autocast precisions against float32 on this machine: step time of two workloads per dtype.

- `quickstart`: one full training step of the quick start (gpt2_tiny, 2 micro-batches of 16 × 128 byte
  tokens, global-norm clip, fused AdamW step), as `python train.py experiment=quickstart` runs it;
- `gpt2_small_fwd_bwd`: forward and backward of a GPT-2-small-shaped model (12 × 768, vocab 50304) on a
  short sequence (4 × 128 tokens), where the matmuls dominate.

Weights and optimizer state stay float32 (autocast), as in training; float16 also scales the loss through a
GradScaler. Each repetition runs every dtype once, in alternating order, so noise from other processes hits
all alike; the table reports the median time per dtype and the median over repetitions of each dtype's
ratio to the float32 time of the same repetition.

    python scripts/bench_precision.py [--reps 15] [--dtypes float32,bfloat16] [--threads N]
                                      [--out bench_precision.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from gpt.model import GPT, GPTConfig

QUICKSTART = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256)
GPT2_SMALL = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def autocast(dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, dtype))


class Workload:
    """One model, its optimizer and fixed batches; `step(dtype)` runs the timed work once."""

    def __init__(self, config: GPTConfig, batch: int, seq: int, micro_steps: int, optimizer_step: bool):
        torch.manual_seed(0)
        self.model = GPT(config)
        self.micro_steps, self.optimizer_step = micro_steps, optimizer_step
        self.batches = [torch.randint(0, config.vocab_size, (batch, seq + 1)) for _ in range(micro_steps)]
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.scalers = {}

    def step(self, dtype: str) -> None:
        scaler = self.scalers.setdefault(dtype, torch.amp.GradScaler("cpu", enabled=dtype == "float16"))
        self.optimizer.zero_grad(set_to_none=True)
        for tokens in self.batches:
            with autocast(dtype):
                _, loss = self.model(tokens[:, :-1], tokens[:, 1:])
            scaler.scale(loss / self.micro_steps).backward()
        if self.optimizer_step:
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            scaler.step(self.optimizer)
            scaler.update()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, workload: Workload, dtypes: list[str], reps: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        for dtype in dtypes:
            workload.step(dtype)
    times: dict[str, list[float]] = {dtype: [] for dtype in dtypes}
    for rep in range(reps):
        order = dtypes if rep % 2 == 0 else dtypes[::-1]
        for dtype in order:
            times[dtype].append(timed(lambda d=dtype: workload.step(d)))
    rows = {}
    for dtype in dtypes:
        ratios = [t / base for t, base in zip(times[dtype], times["float32"], strict=True)]
        rows[dtype] = {"median_s": statistics.median(times[dtype]),
                       "ratio_to_float32": statistics.median(ratios), "times_s": times[dtype]}
    return {"workload": name, "reps": reps, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated; float32 is always measured, as the baseline")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="bench_precision.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = ["float32", *(d for d in args.dtypes.split(",") if d != "float32")]

    workloads = {
        "quickstart": lambda: Workload(QUICKSTART, batch=16, seq=128, micro_steps=2, optimizer_step=True),
        "gpt2_small_fwd_bwd": lambda: Workload(GPT2_SMALL, batch=4, seq=128, micro_steps=1,
                                               optimizer_step=False),
    }
    report = {"machine": machine(), "benchmarks": []}
    print(f"{report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"{report['machine']['torch_threads']} torch threads, torch {report['machine']['torch']}")
    print(f"{'workload':<22} {'dtype':<10} {'median step':>12} {'× float32':>10}")
    for name, build in workloads.items():
        result = bench(name, build(), dtypes, args.reps, args.warmup)
        report["benchmarks"].append(result)
        for dtype, row in result["results"].items():
            print(f"{name:<22} {dtype:<10} {row['median_s'] * 1e3:>9.1f} ms {row['ratio_to_float32']:>10.2f}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
