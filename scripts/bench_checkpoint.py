"""Benchmark how long a checkpoint save holds the training up, before and after saves were taken off the
critical path: a reference the size of a real model shows what a pre-emption grace and each periodic save
cost, with the ratios measured in the same run (absolute times depend on the disk and the machine's load).

Three ways of saving the same state of AdamW on `--model` (GPT-2 small by default), in one process or as
FSDP on the ranks torchrun starts:
  before  the trainer's save until now: a finiteness check with a mask per tensor, the write, then rank 0
          alone fsyncs and hashes every file, reading it back;
  sync    the synchronous save now (a stop signal's and the final one): a single file is hashed while it is
          written, FSDP's files each by the rank that wrote them;
  async   a periodic save with `train.async_checkpoint=true`: blocking is the copy to CPU memory; `durable`
          is until the background write, hashing and commit have ended.
The variants take turns, `--rounds` times, in a rotating order; each reports the median time and its ratio
to `before`, round by round.

    python scripts/bench_checkpoint.py [--model gpt2_small] [--rounds 3] [--dir /tmp/x]
    torchrun --standalone --nproc_per_node=2 scripts/bench_checkpoint.py --strategy fsdp
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from gpt.checkpoint import CheckpointDir, save_training_state
from gpt.checkpoint.checkpointer import Checkpointer
from gpt.distributed import init_runtime, wrap_model
from gpt.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("before", "sync", "async")


class _Loop:
    def state_dict(self) -> dict[str, Any]:
        return {"step": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _build(model_name: str, runtime: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    fields = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{model_name}.yaml"))
    fields.pop("name")
    torch.manual_seed(0)
    model = wrap_model(GPT(GPTConfig(**fields)), runtime)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step on a made-up gradient: AdamW's two moments exist and are not zero
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    return model, optimizer


def _timed(action: Any, runtime: Any) -> float:
    """Seconds `action` blocks the slowest rank (the others wait for it at the next collective)."""
    runtime.all_ranks(True)
    start = time.perf_counter()
    action()
    elapsed = torch.tensor(time.perf_counter() - start)
    return float(runtime.all_reduce(elapsed, "max")) if runtime.distributed else float(elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2_small", help="a configs/model/ name")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategy", default="auto", choices=("auto", "fsdp", "ddp"))
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    runtime = init_runtime(args.strategy, "cpu")
    model, optimizer = _build(args.model, runtime)
    sharded = runtime.strategy == "fsdp"
    base = Path(args.dir or tempfile.gettempdir()) / "bench_checkpoint"
    root = Path(runtime.broadcast_object(str(base / f"{os.getpid()}")))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    savers = {variant: Checkpointer(root / variant, runtime, {}, interval=1, keep=1, max_steps=10**9,
                                    states={"model": model, "optimizer": optimizer, "scaler": scaler},
                                    records={"loop": _Loop()},
                                    evaluation_weights=contextlib.nullcontext, async_saves=variant == "async")
              for variant in VARIANTS}

    def before(step: int) -> None:  # the previous code path, as it was
        tensors = [t.to_local() if hasattr(t, "to_local") else t
                   for t in [*model.state_dict().values(),
                             *(v for s in optimizer.state.values() for v in s.values())]
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        runtime.all_ranks(bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()))
        directory = root / "before"
        if runtime.is_main:
            CheckpointDir(directory, keep=1).begin(step)
        runtime.all_ranks(True)
        save_training_state(CheckpointDir(directory).staging(step), model, optimizer, {}, sharded,
                            runtime.is_main)
        runtime.all_ranks(True)
        if runtime.is_main:
            CheckpointDir(directory, keep=1).commit(step, {})
        runtime.all_ranks(True)

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    durable: list[float] = []
    for step in range(1, args.rounds + 1):
        order = VARIANTS[step % 3:] + VARIANTS[:step % 3]
        for variant in order:
            if variant == "before":
                times[variant].append(_timed(lambda s=step: before(s), runtime))
            else:
                saver = savers[variant]
                blocked = _timed(lambda s=step, saver=saver: saver.save(s), runtime)
                times[variant].append(blocked)
                if variant == "async":
                    durable.append(blocked + _timed(saver.wait, runtime))
    size = sum(p.stat().st_size for p in (root / "sync").rglob("*") if p.is_file())
    if runtime.is_main:
        ranks = f"{runtime.world_size} rank(s), {runtime.strategy}"
        print(f"{args.model}: checkpoint {size / 2**20:,.0f} MiB, {ranks}, {args.rounds} rounds, "
              f"{torch.get_num_threads()} threads")
        print(f"{'variant':<16}{'median s':>10}{'/ before':>10}")
        for variant in VARIANTS:
            ratio = statistics.median(t / b for t, b in zip(times[variant], times["before"], strict=True))
            print(f"{variant + ' (blocking)':<16}{statistics.median(times[variant]):>10.2f}{ratio:>10.2f}")
        ratio = statistics.median(t / b for t, b in zip(durable, times["before"], strict=True))
        print(f"{'async (durable)':<16}{statistics.median(durable):>10.2f}{ratio:>10.2f}")
        shutil.rmtree(root, ignore_errors=True)
    if runtime.distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
