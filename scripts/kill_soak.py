"""Randomized kill soak: kill and stop a training run at random moments, restart it each time, and check that
it ends exactly where an uninterrupted run does.

    python scripts/kill_soak.py --faults 20 [--ranks 2] [--seed 0] [--work DIR] -- experiment=quickstart ...

First a straight run of the given `train.py` overrides; then the same run in another directory, hit by
`--faults` faults, each SIGKILL or SIGTERM (chosen at random) sent to the whole job (every process of it, as
Slurm or a dying node does) at a random moment of a random phase, and started again after each: during the
start-up (data verification, the resume, the lock), the data preparation (while the data folder is not yet
prepared), a training step (a random fraction of a step after a metrics record), an evaluation, and a
checkpoint save (while its staging folder exists; with `train.async_checkpoint=true`, in the background of
the training). The first faults cover every phase once; faults aimed at a step, an evaluation or a save come
after the session has completed a checkpoint of its own, so the run always progresses. Then the run is
completed, and its final weights, optimizer and scaler state (every tensor bit for bit), loop state, data
files and every metrics line (all keys but wall-clock timings) are compared with the straight run's.

`--ranks N` runs both under `torchrun --standalone --nproc_per_node=N` (DDP, or FSDP with
`train.strategy=fsdp`); a fault is sent to torchrun and to every worker at once (Linux: found in /proc).
Without a `data.dir=` override each run prepares its own copy of the data, so that the preparation can be
interrupted; pass one to share prepared data. Bit-identity holds where repeating a run repeats its
floating-point operations (CPU; on CUDA, atomics reorder sums: use --rtol). Exit status 0 when everything
matches, 1 when something differs (listed), 2 when the run cannot hold the faults asked for.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.cli import run_cli
from common.errors import UserError
from gpt.checkpoint import STATE_FILE, CheckpointDir, load_state_file, read_manifest

REPO = Path(__file__).resolve().parents[1]

TIMING_KEYS = ("tokens_per_sec", "mfu", "elapsed_s", "hessian_time_s")  # wall-clock: never reproducible
PHASES = ("preparation", "start", "step", "evaluation", "save")
POLL_S = 0.001


class Job:
    """One launch of the run. A fault reaches every process of it, as Slurm signals a job step or a dying node
    ends it: the launcher and its descendants (torchrun starts each worker in a session of its own, so a
    signal to the launcher's process group would not reach them)."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, cwd=log.parent, env=env, stdout=open(log, "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.signalled: list[int] = []

    def running(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        self.signalled = [self.process.pid, *descendants(self.process.pid)]
        for pid in self.signalled:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        """The launcher's exit status, once it and every process signalled with it have ended."""
        deadline = time.monotonic() + timeout
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            status = self.process.wait()
        while any(alive(pid) for pid in self.signalled) and time.monotonic() < deadline + 30:
            time.sleep(0.05)
        return status


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for a parent to reap it has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Run:
    """A run directory seen from outside: records, checkpoints, staging folders, the data folder."""

    def __init__(self, root: Path, overrides: list[str]) -> None:
        self.root, self.out = root, root / "run"
        given = [o.split("=", 1)[1] for o in overrides if o.startswith("data.dir=")]
        self.data = Path(given[-1]) if given else root / "data"
        self.overrides = [*overrides, f"out_dir={self.out}", *([] if given else [f"data.dir={self.data}"])]

    def records(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        records = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                records.append(json.loads(line))
            except ValueError:  # a line being written
                break
        return records

    def checkpoints(self) -> list[int]:
        return CheckpointDir(self.out / "checkpoints").complete_steps()

    def staging(self) -> list[Path]:
        return sorted((self.out / "checkpoints").glob("step_*[0-9].tmp")) if self.out.exists() else []

    def prepared(self) -> bool:
        return (self.data / "meta.json").exists()

    def preparing(self) -> bool:
        return any(self.data.glob("*.bin.tmp")) if self.data.exists() else False


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(args.work).resolve()
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        self.env.pop("HYDRA_FULL_ERROR", None)
        self.launches = 0

    def command(self, run: Run) -> list[str]:
        train = str(REPO / "train.py")
        if self.args.ranks > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.args.ranks}", train, *run.overrides]
        return [sys.executable, train, *run.overrides]

    def launch(self, run: Run) -> Job:
        self.launches += 1
        (run.root / "logs").mkdir(parents=True, exist_ok=True)
        return Job(self.command(run), run.root / "logs" / f"launch_{self.launches:03d}.txt", self.env)

    def complete(self, run: Run) -> float:
        """Run to the end without a fault; its wall time."""
        job = self.launch(run)
        status = job.wait(self.args.timeout)
        if status != 0:
            raise UserError(f"a run without a fault failed (exit {status}); see {job.log}")
        return time.monotonic() - job.started

    # ---------------------------------------------------------------------------------------- timings

    def measure(self, straight: Run, wall_s: float) -> dict[str, float]:
        """From the straight run: its start-up, one step and one evaluation (seconds), the evaluation
        interval (steps)."""
        records = [r for r in straight.records() if r["step"] > 0]
        gaps = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
                for a, b in itertools.pairwise(records)]
        step = min(gaps, default=0.1)
        evaluated = [b for b in records if "val_loss" in b]
        evaluations = [b["elapsed_s"] - a["elapsed_s"] - step * (b["step"] - a["step"])
                       for a, b in itertools.pairwise(records) if "val_loss" in b]
        return {"start": max(wall_s - (records[-1]["elapsed_s"] if records else 0.0), 1.0), "step": step,
                "evaluation": max(statistics.median(evaluations), step) if evaluations else step,
                "eval_interval": evaluated[0]["step"] if evaluated else 1}

    # ------------------------------------------------------------------------------------------ faults

    def phases(self, run: Run, aimed: list[str]) -> list[str]:
        """The phases a fault may be aimed at now: the first of PHASES not yet aimed at, until each has been
        (the preparation only while the data is not prepared yet), then any."""
        available = [p for p in PHASES if p != "preparation" or not run.prepared()]
        return [next(p for p in available if p not in aimed)] if set(available) - set(aimed) else available

    def moment(self, phase: str, run: Run, job: Job, timing: dict[str, float]) -> Callable[[], bool]:
        """A function that turns true at the fault's moment. Faults at a step, an evaluation or a save wait
        until this session has completed a checkpoint of its own, so that every such fault leaves progress."""
        rng = self.rng
        if phase == "start":
            at = job.started + rng.uniform(0.0, timing["start"])
            return lambda: time.monotonic() >= at
        if phase == "preparation":  # or, if it was too quick to be caught, at once after it
            return lambda: run.preparing() or run.prepared()
        resumed_from = max(run.checkpoints(), default=-1)
        at: list[float] = []  # the moment, once known
        seen_records: list[int] = []

        def ready() -> bool:
            if at:
                return time.monotonic() >= at[0]
            if max(run.checkpoints(), default=-1) <= resumed_from:
                return False
            if phase == "save":
                return bool(run.staging())  # a new save is being written
            records = run.records()
            if not seen_records:
                seen_records.append(len(records))
            elif len(records) > seen_records[0]:  # a record just appeared: the next step is under way
                last, step = records[-1]["step"], timing["step"]
                if phase == "step":
                    at.append(time.monotonic() + rng.uniform(0.05, 0.95) * step)
                else:  # after the steps up to the next evaluation step, a random part of its evaluation
                    ahead = timing["eval_interval"] - last % timing["eval_interval"]
                    at.append(time.monotonic() + ahead * step + rng.uniform(0.1, 0.9) * timing["evaluation"])
            return False
        return ready

    def fault(self, run: Run, aimed: list[str], timing: dict[str, float]) -> dict[str, Any] | None:
        """Launch, wait for a random moment of a random phase, and send SIGKILL or SIGTERM to the whole job;
        None if the run completed first."""
        phase = self.rng.choice(self.phases(run, aimed))
        signum = self.rng.choice((signal.SIGKILL, signal.SIGTERM))
        job = self.launch(run)
        ready = self.moment(phase, run, job, timing)
        deadline = time.monotonic() + self.args.timeout
        while not ready():
            if not job.running():
                status = job.wait(0)
                if status != 0:
                    raise UserError(f"the run failed on its own (exit {status}) before a fault; see "
                                    f"{job.log}")
                return None
            if time.monotonic() > deadline:
                job.signal(signal.SIGKILL)
                raise UserError(f"the {phase} window was not reached in {self.args.timeout:.0f} s; see "
                                f"{job.log}")
            time.sleep(POLL_S)
        observed = {"staging": [p.name for p in run.staging()], "preparing": run.preparing(),
                    "last_record": (run.records() or [{}])[-1].get("step"),
                    "last_checkpoint": max(run.checkpoints(), default=None)}
        job.signal(signum)
        status = job.wait(self.args.timeout)
        return {"phase": phase, "signal": signal.Signals(signum).name,
                "after_s": round(time.monotonic() - job.started, 3), "observed": observed, "exit": status,
                "log": str(job.log)}

    # ------------------------------------------------------------------------------------- comparison

    def compare(self, straight: Run, soaked: Run) -> list[str]:
        """Where the soaked run's end differs from the straight run's; empty when identical."""
        rtol, differences = self.args.rtol, []
        a, b = ([without_timings(r) for r in run.records()] for run in (straight, soaked))
        if len(a) != len(b):
            differences.append(f"metrics.jsonl has {len(b)} records, the straight run {len(a)}")
        differences += [f"metrics record of step {x.get('step')}: {x} != {y}"
                        for x, y in zip(a, b, strict=False) if diff(x, y, rtol)]
        ends = [run.checkpoints()[:1] for run in (straight, soaked)]
        if not ends[0] or ends[0] != ends[1]:
            return [*differences, f"final checkpoints differ: {ends[0]} vs {ends[1]}"]
        final = [run.out / "checkpoints" / f"step_{ends[0][0]:08d}" for run in (straight, soaked)]
        differences += [f"final state: {line}" for line in diff(*map(read_state, final), rtol)]
        loops = [loop_without_timings(read_manifest(path)["loop"]) for path in final]
        if loops[0] != loops[1]:
            differences.append(f"final loop state: {loops[0]} != {loops[1]}")
        if straight.data != soaked.data:
            differences += [f"data file {name} differs" for name in ("train.bin", "val.bin")
                            if (straight.data / name).read_bytes() != (soaked.data / name).read_bytes()]
        return differences

    def run(self) -> dict[str, Any]:
        args = self.args
        started = time.monotonic()
        straight, soaked = (Run(self.work / name, args.overrides) for name in ("straight", "soak"))
        for run in (straight, soaked):
            if run.out.exists():
                raise UserError(f"{run.out} exists; pass a new --work folder")
        timing = self.measure(straight, self.complete(straight))
        faults: list[dict[str, Any]] = []
        while len(faults) < args.faults:
            outcome = self.fault(soaked, [f["phase"] for f in faults], timing)
            if outcome is None:
                raise UserError(f"the run completed after {len(faults)} faults; give it more steps "
                                "(train.max_steps) or a shorter checkpoint interval for more")
            faults.append(outcome)
            print(f"fault {len(faults)}: {outcome['signal']} aimed at {outcome['phase']} after "
                  f"{outcome['after_s']} s, exit {outcome['exit']}, saw {outcome['observed']}", flush=True)
        self.complete(soaked)
        differences = self.compare(straight, soaked)
        return {"faults": len(faults), "by_signal": dict(Counter(f["signal"] for f in faults)),
                "by_phase": dict(Counter(f["phase"] for f in faults)), "launches": self.launches,
                "ranks": args.ranks, "timing": timing, "seconds": round(time.monotonic() - started, 1),
                "identical": not differences, "differences": differences[:20], "details": faults}


def without_timings(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in TIMING_KEYS}


def loop_without_timings(loop: dict[str, Any]) -> dict[str, Any]:
    """The loop state a checkpoint records, without its clock readings and the logger's id."""
    kept = {key: value for key, value in loop.items() if key not in ("elapsed_s", "wandb_id")}
    kept["window"] = {key: value for key, value in loop.get("window", {}).items() if key != "start_s"}
    if kept.get("pending_record"):
        kept["pending_record"] = without_timings(kept["pending_record"])
    return kept


def read_state(checkpoint: Path) -> dict[str, Any]:
    if (checkpoint / "sharded").is_dir():
        from gpt.checkpoint import load_whole

        return load_whole(checkpoint / "sharded")
    return load_state_file(checkpoint / STATE_FILE, ("model", "optimizer"))


def diff(a: Any, b: Any, rtol: float, where: str = "") -> list[str]:
    """Where two nested states differ (tensors bit for bit, or within `rtol` relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where or '.'}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [line for key in a for line in diff(a[key], b[key], rtol, f"{where}.{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [line for i, (x, y) in enumerate(zip(a, b, strict=True))
                for line in diff(x, y, rtol, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{where}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"]
        equal = torch.equal(a, b) if rtol == 0 else torch.allclose(a.double(), b.double(), rtol=rtol, atol=0)
        return [] if equal else [f"{where}: tensors differ"]
    if isinstance(a, float) and isinstance(b, float) and rtol:
        return [] if math.isclose(a, b, rel_tol=rtol) else [f"{where}: {a} != {b}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20, help="faults to inject (default: 20)")
    parser.add_argument("--ranks", type=int, default=1, help="processes under torchrun (default 1: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the faults' kinds, phases and moments")
    parser.add_argument("--work", default="kill_soak", help="folder for both runs (must not hold them yet)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds any one launch may take")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (0: bit for bit)")
    parser.add_argument("--json", type=Path, help="also write the summary to this file")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args(argv)
    if args.faults < 1 or args.ranks < 1:
        parser.error("--faults and --ranks must be at least 1")
    summary = Soak(args).run()
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['faults']} faults ({summary['by_signal']}; {summary['by_phase']}), "
          f"{summary['launches']} launches, {summary['seconds']} s: "
          + ("final state and every metrics line identical to the straight run's" if summary["identical"]
             else "DIFFERENT from the straight run:\n  " + "\n  ".join(summary["differences"])))
    if not summary["identical"]:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
