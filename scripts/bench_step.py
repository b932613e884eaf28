"""Benchmark whole training steps per optimizer on one model in one process: where does the time go?

Every variant trains its own copy of the same initial model on the same synthetic token stream, with the
training step the trainer runs (autocast micro-steps, clip, step) and the real curvature pass
(`gpt.curvature_pass.run_curvature_pass`, its phases timed). Steps run in blocks of `--block` steps (10 = one
curvature pass at k = 10), the variants taking turns block by block in a rotating order, so that machine
noise hits all alike; a variant's ms/step is the median over blocks, and its ratio to AdamW the median of
the per-round ratios. The breakdown splits a step into forward+backward, optimizer step (clip included) and
curvature pass (forward, sampling, backward, update), each phase's ms per step the median over blocks.
Throughput is training tokens per second (curvature sequences are not training tokens); MFU divides the
model's training FLOPs per token (6N plus attention) × tokens/s by a matmul peak measured in the same
process (the best of a few square sizes in the run's dtype, on CPU in fp32 too; measured again after every
round, the best kept), so the figure means the same on any machine.

    python scripts/bench_step.py [--rounds 4] [--only adamw,sophia_g,sophia_h] [--out bench_step.json]
    python scripts/bench_step.py --micro-batch 4 --only adamw,sophia_g,sophia_g@half

A variant is an optimizer name, optionally `@half` (curvature pass on half the batch:
`optim.hessian_batch_size`). Defaults: the 4-layer, 256-wide, context-256 model with GPT-2's vocabulary, 8
sequences per step, bfloat16 autocast and `torch.compile`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_optim import machine, shipped_config

from data.loader import BatchLayout, BatchLoader, TokenData
from data.prepare import FORMAT_VERSION
from gpt.curvature_pass import CurvatureSchedule, PhaseTimes, run_curvature_pass
from gpt.distributed import Runtime, autocast_factory
from gpt.model import GPT, GPTConfig
from optim import OPTIMIZERS, build_optimizer, trainer_settings

GPT2_VOCAB, GPT2_EOT = 50257, 50256
PHASES = ("fwd_bwd", "optimizer_step", "curvature")
CURVATURE_PHASES = ("forward", "sampling", "backward", "update")


def synthetic_data(folder: Path, tokens: int, seed: int = 0) -> TokenData:
    """Uniformly random GPT-2 token ids in the prepared-data format: the step's cost does not depend on
    the text, and the benchmark needs no corpus."""
    rng = np.random.default_rng(seed)
    splits = {"train": tokens, "val": max(tokens // 10, 4096)}
    for name, count in splits.items():
        rng.integers(0, GPT2_VOCAB, size=count, dtype=np.uint16).tofile(folder / f"{name}.bin")
    meta = {"format_version": FORMAT_VERSION, "tokenizer": "gpt2", "vocab_size": GPT2_VOCAB,
            "eot_id": GPT2_EOT, "dtype": "uint16",
            "splits": {name: {"tokens": count, "documents": 1} for name, count in splits.items()}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return TokenData(folder)


def matmul_peak(device: torch.device, dtypes: tuple[torch.dtype, ...], sizes: tuple[int, ...],
                reps: int = 3) -> dict:
    """The best FLOP/s of square matmuls over `dtypes` × `sizes` (best of `reps` each, after one warm-up)."""
    best: dict[str, Any] = {"flops": 0.0, "size": None, "dtype": None, "per_size": {}}
    for dtype in dtypes:
        for n in sizes:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            torch.mm(a, b)
            times = []
            for _ in range(reps):
                sync(device)
                start = time.perf_counter()
                torch.mm(a, b)
                sync(device)
                times.append(time.perf_counter() - start)
            flops = 2 * n ** 3 / min(times)
            best["per_size"][f"{str(dtype).removeprefix('torch.')}@{n}"] = flops
            if flops > best["flops"]:
                best.update(flops=flops, size=n, dtype=str(dtype).removeprefix("torch."))
    return best


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One optimizer on its own copy of the model, with its curvature schedule and accumulated timings."""

    def __init__(self, name: str, args: argparse.Namespace, loader: BatchLoader, state: dict,
                 runtime: Runtime) -> None:
        self.name = name
        optimizer_name, _, option = name.partition("@")
        cfg = shipped_config(optimizer_name)
        if option == "half":
            cfg["hessian_batch_size"] = args.batch // 2
        elif option:
            raise SystemExit(f"error: unknown variant option {option!r} in {name!r}; only @half exists")
        if "hessian_interval" in cfg:
            cfg["hessian_interval"] = args.interval
        kind = getattr(OPTIMIZERS[optimizer_name], "curvature", None)
        self.model = GPT(model_config(args)).to(runtime.device)
        self.model.load_state_dict(state)
        self.forward = torch.compile(self.model) if args.compile else self.model
        # Hutchinson's double backward cannot run through a compiled graph: its pass gets the plain model.
        self.curvature_model = self.model if kind == "hutchinson" else self.forward
        self.optimizer = build_optimizer(cfg, self.model, args.batch * args.block_size)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.schedule = None
        if kind is not None:
            interval, batch_size, clip = trainer_settings(cfg)
            self.schedule = CurvatureSchedule(kind, interval, batch_size or args.batch, 1.0 if clip else 0.0,
                                              getattr(self.optimizer, "requires_initial_hessian", False))
        self.loader, self.runtime, self.args = loader, runtime, args
        self.autocast = autocast_factory(runtime.device, args.dtype)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=False)
        self.step_index = 0
        self.block_seconds: list[float] = []
        self.block_breakdowns: list[dict[str, float]] = []  # per timed block: seconds per step in each phase
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.phases = PhaseTimes(runtime.device)
        self.losses: list[float] = []

    def run_block(self, steps: int, record: bool) -> float:
        """Train `steps` steps; returns their wall-clock seconds. `record` adds them to the breakdown."""
        device, accum = self.runtime.device, self.args.batch // self.args.micro_batch
        phases = self.phases if record else PhaseTimes(device)
        before = {**self.seconds, **{f"curvature_{k}": v for k, v in self.phases.seconds.items()}}
        sync(device)
        block_start = time.perf_counter()
        for _ in range(steps):
            step = self.step_index
            curvature = 0.0
            if self.schedule is not None and self.schedule.due(step):
                sync(device)
                curvature = run_curvature_pass(self.schedule, self.curvature_model, self.optimizer,
                                               self.loader, step, self.args.seed, self.runtime,
                                               self.autocast, self.scaler, phases)
                sync(device)
            t1 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = self.loader.train_batch(step, micro)
                with self.autocast():
                    _, loss = self.forward(x, y)
                (loss / accum).backward()
                loss_sum += loss.detach()
            sync(device)
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.losses.append((loss_sum / accum).item())  # also waits for the step
            t3 = time.perf_counter()
            if record:
                self.seconds["curvature"] += curvature
                self.seconds["fwd_bwd"] += t2 - t1
                self.seconds["optimizer_step"] += t3 - t2
            self.step_index += 1
        elapsed = time.perf_counter() - block_start
        if record:
            self.block_seconds.append(elapsed)
            after = {**self.seconds, **{f"curvature_{k}": v for k, v in self.phases.seconds.items()}}
            self.block_breakdowns.append({key: (after[key] - before.get(key, 0.0)) / steps for key in after})
        return elapsed


def model_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                     vocab_size=50304)


def pass_floor(variant: Variant, baseline: Variant | None, args: argparse.Namespace) -> float | None:
    """The step ratio to AdamW that a Gauss-Newton-Bartlett pass cannot go below: every k steps, one forward
    and backward over its sequences at the cost of AdamW's training forward and backward over as many, and
    nothing else (no sampling, no update, an optimizer step as cheap as AdamW's). None without a GNB pass."""
    if baseline is None or variant.schedule is None or variant.schedule.kind != "gnb":
        return None
    fwd_bwd = statistics.median(block["fwd_bwd"] for block in baseline.block_breakdowns)
    step = statistics.median(baseline.block_seconds) / args.block
    share = variant.schedule.batch_size / args.batch
    return 1 + share * fwd_bwd / (variant.schedule.interval * step)


def summarize(variant: Variant, baseline: Variant | None, args: argparse.Namespace, peak: float,
              flops_per_token: float) -> dict[str, Any]:
    ms_per_step = 1e3 * statistics.median(variant.block_seconds) / args.block
    ratios = ([v / b for v, b in zip(variant.block_seconds, baseline.block_seconds, strict=True)]
              if baseline is not None else [])
    tokens_per_s = args.batch * args.block_size / (ms_per_step / 1e3)
    def median_ms(key: str) -> float:  # over blocks: one disturbed block does not skew the breakdown
        return 1e3 * statistics.median(block.get(key, 0.0) for block in variant.block_breakdowns)

    ratio = statistics.median(ratios) if ratios else None
    floor = pass_floor(variant, baseline, args)
    return {
        "variant": variant.name,
        "ms_per_step": ms_per_step,
        "ratio_vs_adamw": ratio,
        "floor_vs_adamw": floor,
        "ratio_over_floor": ratio / floor if ratio is not None and floor is not None else None,
        "ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "ratios_per_round": ratios,
        "breakdown_ms_per_step": {phase: median_ms(phase) for phase in PHASES},
        "curvature_ms_per_step": {phase: median_ms(f"curvature_{phase}") for phase in CURVATURE_PHASES},
        "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / peak,
        "final_loss": variant.losses[-1],
        "steps": variant.step_index,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="adamw,sophia_g,sophia_h,adam_mini",
                        help="comma-separated variants; the first AdamW is the baseline")
    parser.add_argument("--rounds", type=int, default=4, help="timed blocks per variant")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed blocks first (compilation)")
    parser.add_argument("--block", type=int, default=10, help="steps per block")
    parser.add_argument("--interval", type=int, default=10, help="curvature pass every k steps")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-step")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_step.json")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = args.only.split(",")
    unknown = [n for n in names if n.partition("@")[0] not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; valid: {', '.join(OPTIMIZERS)}")
    halves = any(n.endswith("@half") for n in names)
    if args.batch % args.micro_batch or (halves and (args.batch // 2) % args.micro_batch):
        parser.error(f"--batch {args.batch} (and half of it, for @half variants) must be a multiple of "
                     f"--micro-batch {args.micro_batch}: e.g. --micro-batch {args.batch // 2}")
    if args.dtype == "float16":
        parser.error("float16 needs the trainer's loss scaling; use bfloat16 or float32")
    device = torch.device(args.device)
    runtime = Runtime(rank=0, local_rank=0, world_size=1, device=device, strategy="single")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    info = machine()
    # A CPU without bf16 units multiplies bf16 slower than fp32 (a 3072-wide bf16 matmul takes over a minute),
    # and CPU autocast leaves many ops in fp32: there the peak is the faster of the two, on small sizes.
    if device.type == "cuda":
        sizes, peak_dtypes = (2048, 4096, 8192), (getattr(torch, args.dtype),)
    else:
        sizes, peak_dtypes = (512, 1024), tuple(dict.fromkeys((getattr(torch, args.dtype), torch.float32)))
    peak = matmul_peak(device, peak_dtypes, sizes)
    torch.manual_seed(args.seed)
    state = GPT(model_config(args)).state_dict()
    flops_per_token = GPT(model_config(args)).flops_per_token()
    load_before = os.getloadavg()
    print(f"{args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, context {args.block_size}, "
          f"{args.batch} sequences/step ({args.micro_batch} per micro-step), {args.dtype}, "
          f"compile={args.compile}, {device}; {info['cpu']}, {info['cores']} cores, "
          f"{info['torch_threads']} torch threads; {args.dtype} matmul peak "
          f"{peak['flops'] / 1e9:.0f} GFLOP/s (n={peak['size']}); load average {load_before[0]:.2f}",
          flush=True)

    with tempfile.TemporaryDirectory() as folder:
        data = synthetic_data(Path(folder), tokens=2_000_000, seed=args.seed)
        loader = BatchLoader(data, BatchLayout(args.batch, args.micro_batch, args.block_size), seed=args.seed,
                             device=device)
        variants = [Variant(name, args, loader, state, runtime) for name in names]
        signal.signal(signal.SIGTERM, _interrupt)  # e.g. `timeout`: summarise the rounds completed so far
        try:
            for round_index in range(args.warmup_rounds + args.rounds):
                record = round_index >= args.warmup_rounds
                shift = round_index % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    seconds = variant.run_block(args.block, record)
                    print(f"  round {round_index}{'' if record else ' (warm-up)'}: {variant.name} "
                          f"{1e3 * seconds / args.block:.0f} ms/step", flush=True)
                again = matmul_peak(device, peak_dtypes, sizes)  # the load varies: the best
                if again["flops"] > peak["flops"]:
                    peak = again
        except KeyboardInterrupt:
            print("interrupted: summarising the complete rounds", flush=True)
    rounds = min(len(v.block_seconds) for v in variants)
    if rounds == 0:
        sys.exit("error: no timed round completed")
    for variant in variants:
        variant.block_seconds = variant.block_seconds[:rounds]
        variant.block_breakdowns = variant.block_breakdowns[:rounds]

    baseline = next((v for v in variants if v.name == "adamw"), None)
    results = [summarize(v, baseline, args, peak["flops"], flops_per_token) for v in variants]
    header = (f"{'variant':<14} {'ms/step':>8} {'× AdamW':>8} {'floor':>6} {'fwd+bwd':>8} {'opt step':>9} "
              f"{'curv fwd':>9} {'sampling':>9} {'curv bwd':>9} {'curv upd':>9} {'tok/s':>7} {'MFU':>6}")
    print(header)
    for r in results:
        b, c = r["breakdown_ms_per_step"], r["curvature_ms_per_step"]
        ratio = f"{r['ratio_vs_adamw']:.3f}" if r["ratio_vs_adamw"] is not None else "-"
        floor = f"{r['floor_vs_adamw']:.3f}" if r["floor_vs_adamw"] is not None else "-"
        print(f"{r['variant']:<14} {r['ms_per_step']:8.1f} {ratio:>8} {floor:>6} {b['fwd_bwd']:8.1f} "
              f"{b['optimizer_step']:9.1f} {c['forward']:9.1f} {c['sampling']:9.1f} {c['backward']:9.1f} "
              f"{c['update']:9.1f} {r['tokens_per_s']:7.0f} {r['mfu']:6.1%}")
    with open(args.out, "w") as f:
        json.dump({"machine": info, "command": " ".join(sys.argv), "args": vars(args), "rounds_timed": rounds,
                   "load_average": {"before": load_before, "after": os.getloadavg()},
                   "matmul_peak": peak, "model_flops_per_token": flops_per_token, "results": results},
                  f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
