"""Benchmark the study runner: a batch of small runs several at once (one thread each) against the same runs
one after another with every thread, on this machine.

    python scripts/bench_study.py [--runs 4] [--steps 300] [--repeats 3] [--out FILE] [OVERRIDE ...]

The runs are the CPU study's (configs/study/cpu.yaml: the 0.84M-parameter byte-level GPT, 16 × 128 tokens per
step) with AdamW at its configured rate, one run per seed, `--steps` steps each. Both ways train the same runs
from scratch, through the study's own local launcher (each run a `python train.py` process): "parallel" with
as many runs at once as there are usable cores, one thread each; "sequential" one run at a time with all
cores' threads. They alternate, `--repeats` times, so that a change of load hits both; the table gives each
way's median wall-clock and the ratio of the medians (a study wants it at most 2/3), and the JSON every
repetition and the machine. Study overrides after the options change the runs' shape (docs/study.md times a
smaller model this way). Time a quiet machine: other processes on the cores decide these numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from common.cli import run_cli
from gpt.study.arms import resolve_arms
from gpt.study.conduct import prepare_data
from gpt.study.driver import run_study
from gpt.study.local import LocalLauncher, LocalSettings, usable_cores
from gpt.study.report import machine
from gpt.study.schema import load_study
from gpt.study.state import StudyState

from study import compose_study


def bench_study(runs: int, steps: int, work: Path, overrides: list[str]) -> Any:
    """The CPU study (with the study `overrides`) reduced to `runs` seeds of AdamW at `steps` steps, its runs
    under `work`."""
    name, node, _ = compose_study(["study=cpu", *overrides])
    node.update(optimizers={"adamw": {}}, tune={}, seeds=list(range(runs)), tuning_seed=0,
                out_dir=str(work / "study"), run_root=str(work / "runs"))
    tokens_per_step = resolve_arms(load_study(node, name))[0].tokens_per_step
    node.update(budgets=[{"tokens": steps * tokens_per_step}])
    study = load_study(node, name)
    return study, resolve_arms(study)


def time_runs(study: Any, arms: list, parallel: int, threads: int, work: Path) -> float:
    """Seconds to train every run of the study from scratch, `parallel` at once with `threads` each."""
    shutil.rmtree(work / "runs", ignore_errors=True)
    launcher = LocalLauncher(LocalSettings(threads, parallel, 0, 0.1), work / "logs")
    began = time.perf_counter()
    run_study(StudyState(study, arms), launcher)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="runs in the batch (default 4)")
    parser.add_argument("--steps", type=int, default=300, help="steps per run (default 300, the CPU study's)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repetitions of both ways")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_study"), help="scratch folder")
    parser.add_argument("--out", type=Path, default=Path("bench_study.json"))
    parser.add_argument("overrides", nargs="*", help="overrides of the study file, e.g. smaller runs: "
                        "study.overrides.model.n_embd=64")
    args = parser.parse_args(argv)
    cores = usable_cores()
    study, arms = bench_study(args.runs, args.steps, args.work, args.overrides)
    prepare_data(arms)
    ways = {"parallel": (cores, 1), "sequential": (1, cores)}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for repeat in range(args.repeats):
        for way, (parallel, threads) in ways.items():
            seconds[way].append(time_runs(study, arms, parallel, threads, args.work))
            print(f"repeat {repeat + 1}: {way:<10} {seconds[way][-1]:7.1f} s", flush=True)
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    ratio = medians["parallel"] / medians["sequential"]
    print(f"\n{args.runs} runs of {args.steps} steps ({arms[0].model}, {arms[0].params:,} parameters), "
          f"{cores} cores, median of {args.repeats}:\n")
    print("| way | runs at once × threads | wall-clock (s) | vs sequential |\n|---|---|---:|---:|")
    for way, (parallel, threads) in ways.items():
        print(f"| {way} | {parallel} × {threads} | {medians[way]:.1f} | "
              f"{medians[way] / medians['sequential']:.2f}× |")
    print(f"\nratio parallel / sequential: {ratio:.2f} (a study wants it at most 0.67)")
    record = {"runs": args.runs, "steps": args.steps, "repeats": args.repeats, "overrides": args.overrides,
              "model": arms[0].model, "parameters": arms[0].params,
              "tokens_per_step": arms[0].tokens_per_step, "cores": cores,
              "machine": machine(), "seconds": seconds, "median_seconds": medians,
              "ratio_parallel_to_sequential": ratio, "ways": {w: {"parallel": p, "threads": t}
                                                              for w, (p, t) in ways.items()}}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
