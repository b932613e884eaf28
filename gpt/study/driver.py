"""The study's loop: start what the study needs next, collect what ended, until nothing is needed.

Each turn replays the study's state from the finished runs (gpt/study/state.py), starts the needed runs that
are not running as far as the launcher has room (the longest first, so that a long run does not start last
and hold up the end), then waits for runs to end. A divergence is a result like any other. A failed run stops
the study from starting more; the runs in progress are waited for, then the failure is reported. SIGINT or
SIGTERM asks the local runs in progress to save and stop (Slurm jobs go on; the study stops waiting for them);
a rerun of the same command resumes them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from typing import Any, Protocol

from common.errors import UserError
from gpt.study.arms import RunSpec
from gpt.study.outcome import Outcome
from gpt.study.state import StudyState

log = logging.getLogger(__name__)


class Launcher(Protocol):
    poll_s: float
    stops_runs: bool  # stop() ends the runs in progress (local processes), or leaves them going (Slurm)

    def free_slots(self) -> int: ...
    def start(self, specs: list[RunSpec]) -> None: ...
    def poll(self) -> list[tuple[RunSpec, Outcome | UserError | None]]: ...
    def stop(self) -> None: ...


def describe(spec: RunSpec) -> str:
    values = " ".join(f"{name}={value:g}" for name, value in spec.values.items())
    return " ".join(filter(None, [spec.arm.model, spec.arm.label, f"{spec.steps} steps", values,
                                  f"seed {spec.seed}"]))


@contextlib.contextmanager
def stop_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM set a flag (the list receives the signal) instead of ending the study at once."""
    received: list[int] = []

    def handle(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_study(state: StudyState, launcher: Launcher) -> int:
    """Run the study to its end; returns the number of runs this call started."""
    started, failures, stopped = 0, [], []
    with stop_signals() as received:
        asked_to_stop = False
        while True:
            if received and not asked_to_stop:
                log.info("stop requested: the runs in progress save a checkpoint and stop")
                launcher.stop()
                asked_to_stop = True
                if not launcher.stops_runs:
                    break
            if not failures and not received:
                waiting = [spec for spec in state.needed() if spec.out_dir not in state.running]
                room = min(launcher.free_slots(), len(waiting))
                batch = sorted(waiting, key=lambda spec: -spec.steps)[:room]
                if batch:
                    for spec in batch:
                        log.info("start  %s", describe(spec))
                    launcher.start(batch)
                    state.running.update(spec.out_dir for spec in batch)
                    started += len(batch)
            if not state.running:
                break
            time.sleep(launcher.poll_s)
            for spec, result in launcher.poll():
                state.running.discard(spec.out_dir)
                if isinstance(result, UserError):
                    log.info("failed %s", describe(spec))
                    failures.append(result)
                elif result is None and received:
                    stopped.append(spec)
                elif result is None:
                    failures.append(UserError(f"run {spec.out_dir} stopped before its last step without the "
                                              "study asking (a signal from elsewhere?)"))
                else:
                    state.results[spec.out_dir] = result
                    verdict = (f"diverged ({result.note})" if result.diverged
                               else f"val {result.final_loss:.4f}")
                    log.info("done   %s: %s", describe(spec), verdict)
    if failures:
        more = f" (and {len(failures) - 1} more failed run(s), in the log above)" if len(failures) > 1 else ""
        raise UserError(f"{failures[0]}{more}; fix the cause, then rerun the study: finished runs are kept")
    if received or stopped:
        raise UserError(f"the study stopped before its end ({len(stopped)} run(s) saved mid-way); rerun the "
                        "same command to resume it")
    return started
