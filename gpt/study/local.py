"""The local launcher: several runs at once on this machine, each with its own threads or its own GPUs.

Small models leave cores idle: one run of the CPU study's 0.84M-parameter model gains little from a second
thread, so two runs with one thread each finish a study's runs sooner than the same runs one after another
with two threads. A slot is a share of the machine: `threads_per_run` torch threads (OMP_NUM_THREADS and
MKL_NUM_THREADS of the run's process), and on a CUDA machine `gpus_per_run` GPUs of its own
(CUDA_VISIBLE_DEVICES). The number of slots defaults to what the machine holds: the usable cores divided by
the threads per run, or the GPUs divided by the GPUs per run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from gpt.study.arms import RunSpec
from gpt.study.execute import conclude, start
from gpt.study.outcome import Outcome

log = logging.getLogger(__name__)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class LocalSettings:
    threads_per_run: int
    parallel: int
    gpus_per_run: int
    poll_s: float


def local_settings(node: dict[str, Any]) -> LocalSettings:
    """configs/launcher/local.yaml, checked, with `parallel: null` and `gpus_per_run: auto` resolved."""
    threads = node.get("threads_per_run")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise UserError(f"launcher.threads_per_run must be an integer >= 1, got {threads!r}")
    gpus = node.get("gpus_per_run")
    if gpus == "auto":
        gpus = 1 if visible_gpus() else 0
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise UserError(f"launcher.gpus_per_run must be auto or an integer >= 0, got {gpus!r}")
    if gpus and visible_gpus() < gpus:
        raise UserError(f"launcher.gpus_per_run={gpus} but this machine shows {visible_gpus()} CUDA GPU(s)")
    fits = visible_gpus() // gpus if gpus else max(1, usable_cores() // threads)
    parallel = node.get("parallel")
    if parallel is None:
        parallel = fits
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise UserError(f"launcher.parallel must be null (as many as fit) or an integer >= 1, got "
                        f"{parallel!r}")
    if gpus and parallel > fits:
        raise UserError(f"launcher.parallel={parallel} runs of {gpus} GPU(s) each need {parallel * gpus} "
                        f"GPUs; this machine shows {visible_gpus()}")
    poll = node.get("poll_s")
    if not isinstance(poll, (int, float)) or poll <= 0:
        raise UserError(f"launcher.poll_s must be a number of seconds > 0, got {poll!r}")
    return LocalSettings(threads, parallel, gpus, float(poll))


class LocalLauncher:
    """Runs as child processes, `parallel` at a time; `poll` reports the ones that ended."""

    def __init__(self, settings: LocalSettings, log_dir: Path) -> None:
        self.settings, self.log_dir = settings, log_dir
        self.poll_s, self.stops_runs = settings.poll_s, True
        # out_dir -> (the run, its process, its slot, its log)
        self.running: dict[Path, tuple[RunSpec, subprocess.Popen, int, Path]] = {}

    def _env(self, slot: int) -> dict[str, str]:
        threads = str(self.settings.threads_per_run)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if self.settings.gpus_per_run:
            first = slot * self.settings.gpus_per_run
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(first, first + self.settings.gpus_per_run)))
        return env

    def free_slots(self) -> int:
        return self.settings.parallel - len(self.running)

    def start(self, specs: list[RunSpec]) -> None:
        for spec in specs:
            slot = min(set(range(self.settings.parallel)) - {entry[2] for entry in self.running.values()})
            log_path = self.log_dir / f"{spec.out_dir.parent.parent.name}-{spec.out_dir.parent.name}-" \
                                      f"{spec.out_dir.name}.log"
            process = start(spec, log_path, self._env(slot), self.settings.gpus_per_run)
            self.running[spec.out_dir] = (spec, process, slot, log_path)

    def poll(self) -> list[tuple[RunSpec, Outcome | UserError | None]]:
        """The runs that ended since the last call, with their outcome (None: stopped early; a UserError: the
        run failed)."""
        ended = []
        for out_dir, (spec, process, _, log_path) in list(self.running.items()):
            code = process.poll()
            if code is None:
                continue
            del self.running[out_dir]
            try:
                ended.append((spec, conclude(spec, code, log_path)))
            except UserError as error:
                ended.append((spec, error))
        return ended

    def stop(self) -> None:
        """Ask every run to stop: each finishes its step, saves a checkpoint and exits."""
        for _, process, _, _ in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        log.info("asked %d run(s) to save and stop", len(self.running))
