"""One check of a GPU machine before long runs, in under 8 minutes on one GPU, printed as tables.

1. Throughput: gpt2_small and gpt2_medium (bf16, compiled, micro-batches chosen for the GPU) with AdamW,
   Sophia-G, Sophia-H and Lion through the real trainer on random tokens: tokens/s, MFU against the GPU's
   bf16 peak, step time (steps without a curvature pass) against AdamW's, the curvature pass's time, and
   the peak memory against the estimate that chose the micro-batch.
2. The optimizers' compiled (fused) kernels against their eager reference on this device.
3. One rank through torchrun and the process-group backend (NCCL on CUDA) for DDP and FSDP: a run killed
   with SIGKILL after a checkpoint and resumed gives the straight run's losses within tolerance.

No network: the throughput data is random bytes, the resume check the shipped quick start sample. `--smoke`
runs the same steps at toy sizes on whatever device there is (CI runs it on CPU). Exit status 1 when a
check fails. Usage: `bash scripts/gpu_check.sh [--smoke] [--work DIR]`.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from gpt.memory import GiB, estimate_memory, meta_model, state_per_parameter  # noqa: E402
from gpt.plan import peak_flops  # noqa: E402
from gpt.settings import load_settings  # noqa: E402
from gpt.trainer import train  # noqa: E402
from optim import OPTIMIZERS  # noqa: E402

OPTIMIZERS_CHECKED = ("adamw", "sophia_g", "sophia_h", "lion")
RESUME_TOLERANCE = {"cpu": 0.0, "cuda": 1e-4}  # relative; CUDA's atomics (flash/embedding backward) vary
FULL = {
    "models": {"gpt2_small": [], "gpt2_medium": []},
    "global_batch_size": 48, "steps": 25, "warmup": 8, "hessian_interval": 5,
    "resume_model": [],  # the quick start's gpt2_tiny
}
TOY = ["model.n_layer=2", "model.block_size=32", "model.vocab_size=256"]
SMOKE = {
    "models": {"toy_small": [*TOY, "model.n_head=2", "model.n_embd=32"],
               "toy_medium": [*TOY, "model.n_head=4", "model.n_embd=64"]},
    "global_batch_size": 8, "steps": 6, "warmup": 2, "hessian_interval": 2,
    "resume_model": [*TOY, "model.n_head=2", "model.n_embd=32", "train.global_batch_size=8",
                     "train.micro_batch_size=4"],
}


def compose_train(overrides: list[str]):
    """configs/train.yaml composed with `overrides`, as `python train.py` would."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def random_corpus(directory: Path, megabytes: int) -> str:
    """Random printable bytes as 20 text files (documents; one becomes the validation split), as a glob:
    throughput does not depend on what the tokens say."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(20):
        path = directory / f"random_{index:02d}.txt"
        if not path.exists():
            path.write_bytes(rng.integers(32, 127, size=megabytes * 2**20 // 20, dtype=np.uint8).tobytes())
    return str(directory / "*.txt")


def throughput_run(work: Path, corpus: str, model: str, model_overrides: list[str], optim: str,
                   sizes: dict) -> dict:
    """Train `sizes["steps"]` steps with the real trainer; timings from its per-step records."""
    out = work / "throughput" / f"{model}-{optim}"
    curvature = OPTIMIZERS[optim].curvature
    overrides = [
        f"out_dir={out}", "data=text", f"data.files={corpus}", "data.tokenizer=byte",
        "data.auto_prepare=true", f"data.dir={work / 'random_byte'}", "data.val_fraction=0.05",
        *([f"model={model}"] if not model_overrides else ["model=gpt2_tiny", *model_overrides]),
        f"optim={optim}", f"train.max_steps={sizes['steps']}",
        f"train.global_batch_size={sizes['global_batch_size']}",
        "train.log_interval=1", f"train.eval_interval={sizes['steps']}",
        f"train.eval_sequences={sizes['global_batch_size']}",
        f"train.ckpt_interval={sizes['steps']}", "train.keep_checkpoints=1", "train.dtype=bfloat16",
        "schedule.warmup_steps=2",
        *([f"optim.hessian_interval={sizes['hessian_interval']}"] if curvature else []),
    ]
    cfg = compose_train(overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings, _ = load_settings(cfg, world_size=1, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f"{out.name}.log").open("w") as log, contextlib.redirect_stdout(log):
        train(cfg)
    peak = torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_sec" in r and r["step"] > sizes["warmup"]]
    tokens_per_step = sizes["global_batch_size"] * settings.model.block_size
    # the pass of step s (s % interval == 0) is timed in the record of step s + 1
    with_pass = {s + 1 for s in range(sizes["steps"]) if curvature and s % sizes["hessian_interval"] == 0
                 and (s > 0 or getattr(OPTIMIZERS[optim].cls, "requires_initial_hessian", False))}
    plain = [tokens_per_step / r["tokens_per_sec"] for r in steps if r["step"] not in with_pass]
    total_time = sum(tokens_per_step / r["tokens_per_sec"] for r in steps)
    model_shapes = meta_model(settings.model)
    tokens_per_sec = tokens_per_step * len(steps) / total_time
    peak_flops_per_s = peak_flops(device, "bfloat16")
    passes = [r.get("hessian_time_s") for r in steps if r.get("hessian_time_s")]
    t = settings.train
    common = dict(dtype="bfloat16", state_tensors=state_per_parameter(model_shapes, settings.optim))
    estimate = estimate_memory(model_shapes, micro_batch_size=t.micro_batch_size, **common).total
    if curvature:
        estimate = max(estimate, estimate_memory(model_shapes, micro_batch_size=t.hessian_micro_batch_size,
                                                 kind=curvature, **common).total)
    return {
        "model": model, "optim": optim, "micro": t.micro_batch_size,
        "hessian_micro": t.hessian_micro_batch_size, "compile": t.compile, "tokens_per_sec": tokens_per_sec,
        "mfu": (model_shapes.flops_per_token() * tokens_per_sec / peak_flops_per_s
                if peak_flops_per_s else None),
        "step_s": statistics.median(plain), "pass_s": statistics.median(passes) if passes else None,
        "peak_gib": peak, "estimate_gib": estimate / GiB, "final_loss": steps[-1]["train_loss"],
    }


def fused_kernel_check(device: torch.device) -> list[dict]:
    """Every optimizer with compiled kernels: 3 steps (with curvature updates) fused and eager from the same
    state on this device; the largest parameter difference relative to the parameters' scale. A kernel that
    failed to compile and ran eagerly instead (logged by optim.fused) fails the row: fused would equal eager
    trivially."""
    rows = []
    fallbacks: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: fallbacks.append(record.getMessage())
    logging.getLogger("optim.fused").addHandler(handler)
    generator = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(512, 256), (300,)]  # one tensor on the compiled path, one below MIN_COMPILED_NUMEL
    start = [torch.randn(s, generator=generator).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=generator).to(device) for s in shapes] for _ in range(3)]
    for name, entry in OPTIMIZERS.items():
        try:
            cls = entry.cls
        except ImportError:  # an optional package that is not installed
            continue
        if "fused" not in inspect.signature(cls).parameters or not cls.__module__.startswith("optim."):
            continue
        results = []
        began, logged_before = time.perf_counter(), len(fallbacks)
        for fused in (True, False):
            params = [torch.nn.Parameter(p.clone()) for p in start]
            kwargs = {"lr": 1e-3, **({"bs": 1024} if "bs" in inspect.signature(cls).parameters else {})}
            if "n_head" in inspect.signature(cls).parameters:
                continue
            optimizer = cls(params, fused=fused, **kwargs)
            for g in grads:
                for p, gi in zip(params, g, strict=True):
                    p.grad = gi.clone()
                kind = getattr(cls, "curvature", None)
                if kind == "gnb":
                    optimizer.update_hessian()
                elif kind == "hutchinson":
                    optimizer.update_hessian([gi * gi for gi in g])
                optimizer.step()
            results.append([p.detach() for p in params])
        if len(results) < 2:
            continue
        scale = max(p.abs().max().item() for p in results[1])
        worst = max((a - b).abs().max().item() for a, b in zip(*results, strict=True)) / scale
        fell_back = fallbacks[logged_before:]
        rows.append({"optim": name, "relative_difference": worst, "ok": worst <= 1e-5 and not fell_back,
                     "compile_fallbacks": fell_back, "seconds": time.perf_counter() - began})
    logging.getLogger("optim.fused").removeHandler(handler)
    return rows


def _torchrun(nproc_args: list[str], args: list[str], cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               *nproc_args, str(REPO / "train.py"), *args]
    return subprocess.Popen(command, cwd=cwd, env=dict(os.environ, PYTHONPATH=str(REPO)), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def resume_check(work: Path, strategy: str, steps: int, model_overrides: list[str]) -> dict:
    """Straight run; the same run SIGKILLed after its first checkpoint and run again (it resumes)."""
    base = work / "resume" / strategy
    base.mkdir(parents=True, exist_ok=True)
    args = ["experiment=quickstart", f"data.dir={work / 'shakespeare_byte'}", f"train.max_steps={steps}",
            "train.ckpt_interval=4", "train.eval_interval=1000", "train.log_interval=1",
            f"train.strategy={strategy}", "train.compile=false", *model_overrides]
    began = time.perf_counter()
    straight = _torchrun([], [*args, f"out_dir={base / 'straight'}"], base)
    output, _ = straight.communicate(timeout=300)
    if straight.returncode != 0:
        return {"strategy": strategy, "ok": False, "detail": output[-2000:]}
    killed_dir = base / "killed"
    victim = _torchrun([], [*args, f"out_dir={killed_dir}"], base)
    deadline = time.monotonic() + 300
    while not list((killed_dir / "checkpoints").glob("step_*/manifest.json")):
        if victim.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    killed = victim.poll() is None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate()
    resumed = _torchrun([], [*args, f"out_dir={killed_dir}"], base)
    output, _ = resumed.communicate(timeout=300)
    if resumed.returncode != 0 or "resumed from" not in output:
        return {"strategy": strategy, "ok": False, "detail": output[-2000:]}
    a, b = losses(killed_dir), losses(base / "straight")
    worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in b) if a.keys() == b.keys() else float("inf")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"strategy": strategy, "backend": "nccl" if device == "cuda" else "gloo", "killed": killed,
            "relative_difference": worst, "ok": worst <= RESUME_TOLERANCE[device],
            "seconds": time.perf_counter() - began}


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device, CPU included")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: temporary)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device, "bfloat16")
    print(f"# gpu_check{' --smoke' if args.smoke else ''}: {name}, torch {torch.__version__}, bf16 peak "
          f"{_fmt(peak and peak / 1e12, '.0f')} TFLOP/s, work dir {work}")
    failures = []
    began = time.perf_counter()

    corpus = random_corpus(work / "corpus", 2 if args.smoke else 16)
    rows = []
    for model, model_overrides in sizes["models"].items():
        for optim in OPTIMIZERS_CHECKED:
            rows.append(throughput_run(work, corpus, model, model_overrides, optim, sizes))
    print("\n## Throughput (bf16, trainer on random tokens; step = a step without a curvature pass)\n")
    print("| model | optimizer | micro (pass) | compile | tokens/s | MFU | step ms | / AdamW | pass ms "
          "| peak GiB | estimate GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    adamw_step = {r["model"]: r["step_s"] for r in rows if r["optim"] == "adamw"}
    for r in rows:
        pass_ms = r["pass_s"] and r["pass_s"] * 1e3
        ratio = r["step_s"] / adamw_step[r["model"]]
        print(f"| {r['model']} | {r['optim']} | {r['micro']} ({_fmt(r['hessian_micro'], 'd')}) "
              f"| {r['compile']} | {r['tokens_per_sec']:,.0f} | {_fmt(r['mfu'], '.1%')} "
              f"| {r['step_s'] * 1e3:.1f} | {ratio:.2f} | {_fmt(pass_ms, '.0f')} "
              f"| {_fmt(r['peak_gib'], '.2f')} | {r['estimate_gib']:.2f} |")
        if not np.isfinite(r["final_loss"]):
            failures.append(f"{r['model']} {r['optim']}: non-finite loss")
        if r["peak_gib"] is not None and r["peak_gib"] > r["estimate_gib"] * 1.15:
            failures.append(f"{r['model']} {r['optim']}: peak {r['peak_gib']:.1f} GiB > estimate "
                            f"{r['estimate_gib']:.1f} GiB + 15%")
    print(f"\n(throughput: {time.perf_counter() - began:.0f} s)")

    section = time.perf_counter()
    print("\n## Fused optimizer kernels against the eager reference (3 steps, this device)\n")
    print("| optimizer | max relative difference | ok | s |")
    print("|---|---|---|---|")
    for r in fused_kernel_check(device):
        print(f"| {r['optim']} | {r['relative_difference']:.2e} | {r['ok']} | {r['seconds']:.1f} |")
        if not r["ok"]:
            failures.append(f"fused {r['optim']}: differs from eager by {r['relative_difference']:.2e}"
                            + "".join(f"; compile fell back: {m}" for m in r["compile_fallbacks"]))
    print(f"\n(kernels: {time.perf_counter() - section:.0f} s)")

    section = time.perf_counter()
    print("\n## One rank under torchrun: SIGKILL after a checkpoint, resume, compare with the straight run\n")
    print("| strategy | backend | killed mid-run | max relative loss difference | ok | s |")
    print("|---|---|---|---|---|---|")
    for strategy in ("ddp", "fsdp"):
        r = resume_check(work, strategy, 8 if args.smoke else 40, sizes["resume_model"])
        if "detail" in r:
            print(f"| {strategy} | - | - | - | False | - |\n\n```\n{r['detail']}\n```")
        else:
            print(f"| {strategy} | {r['backend']} | {r['killed']} | {r['relative_difference']:.2e} "
                  f"| {r['ok']} | {r['seconds']:.0f} |")
        if not r["ok"]:
            failures.append(f"resume under {strategy} failed")
    print(f"\n(resume: {time.perf_counter() - section:.0f} s; total {time.perf_counter() - began:.0f} s)")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
