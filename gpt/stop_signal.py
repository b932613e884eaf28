"""Stop signals (pre-emption, Ctrl-C) honoured within a grace, even inside a step that would outlast it.

SIGTERM, SIGINT and SIGUSR1 set a flag: the loop finishes the step in progress, saves it and hands the signal
on (to the handler installed before, e.g. submitit's requeue on USR1), or abandons an evaluation between two
micro-batches. A step can be far longer than a pre-emption grace (a huge context, the first compilation of a
large model), and a single long kernel runs no Python code that could notice the flag; so the signal also
starts a watchdog thread. If the main thread has not acted on the stop `grace_s` seconds after the signal,
the watchdog ends the run from outside: one line saying why and which checkpoint a rerun resumes from, the
`out_dir` lock released, the logs flushed, then the process exits. Nothing of the abandoned step is saved:
checkpoints and metrics lines are whole or absent at every instant, and a rerun resumes exactly from the last
checkpoint. A second Ctrl-C ends the run the same way at once.

`step_time_warning` says before a run starts when one of its steps will outlast the grace, from the plan's
FLOPs and a rate: the GPU's peak at the assumed MFU, or a matmul rate measured on this CPU.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Exit status of a run ended by a second Ctrl-C (the shell's convention for SIGINT); one ended by the grace
# exits 0, like a stop that saved its step: both are resumed by rerunning.
INTERRUPTED = 130


class StopRequested:
    """The stop flag, the previous handlers, and the watchdog of one training loop (a context manager).

    The loop reports what it is doing (`busy`), which the watchdog's message names, and calls `honoured` once
    it acts on the stop (the step is done and is being saved, or an evaluation was abandoned). `on_expiry`
    receives the line to log and the exit status when the grace runs out (or at a second Ctrl-C) and must
    end the process; without one, the watchdog only logs."""

    def __init__(self, grace_s: float = 60.0, on_expiry: Callable[[str, int], Any] | None = None) -> None:
        self.signal: int | None = None
        self.grace_s = grace_s
        self.doing = "the run"
        self.on_expiry = on_expiry or (lambda line, status: log.warning("%s", line))
        self._guard = threading.Lock()
        self._honoured = False
        self._timer: threading.Timer | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            if signum == signal.SIGINT and self.signal == signal.SIGINT:
                self._expire(f"interrupted by a second SIGINT during {self.doing}", INTERRUPTED, force=True)
            return
        self.signal = signum
        log.warning("%s received: stopping after this step (within train.stop_grace_s=%g s)", name,
                    self.grace_s)
        self._timer = threading.Timer(self.grace_s, self._grace_expired)
        self._timer.daemon = True
        self._timer.start()

    def _grace_expired(self) -> None:
        name = signal.Signals(self.signal).name if self.signal else "a signal"
        self._expire(f"stopped by {name} during {self.doing}, which did not finish within "
                     f"train.stop_grace_s={self.grace_s:g} s of the signal", 0)

    def busy(self, what: str) -> None:
        """What the loop is doing now (e.g. "step 12", "the evaluation of step 10")."""
        self.doing = what

    def honoured(self) -> None:
        """The loop acts on the stop: the watchdog stands down. Blocks for good if it has already fired (the
        process is ending)."""
        with self._guard:
            self._honoured = True
            if self._timer is not None:
                self._timer.cancel()

    def _expire(self, why: str, status: int, force: bool = False) -> None:
        with self._guard:
            if self._honoured and not force:
                return
            self._honoured = True
            self.on_expiry(why, status)

    def __enter__(self) -> StopRequested:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def hand_over(self, when: str) -> None:
        """Log that the run stopped `when` (e.g. "after step 4, checkpoint saved: rerun to resume"), then
        hand the signal on."""
        self.honoured()
        name = signal.Signals(self.signal).name if self.signal else "a signal on another rank"
        log.info("stopped by %s %s", name, when)
        self.restore()
        handler = self.previous.get(self.signal)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signal, None)


def measured_cpu_flops() -> float:
    """FLOP/s of a float32 matmul on this CPU (the best of a few 512² products, tens of milliseconds): an
    upper bound on what a training step achieves here."""
    a = torch.randn(512, 512)
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - started)
    return 2 * 512**3 / best


def step_time_warning(flops_per_step: float, rate: float, grace_s: float, log_interval: int) -> str | None:
    """A warning when one step of `flops_per_step` (per rank) at `rate` FLOP/s takes longer than a stop
    signal waits; None otherwise."""
    seconds = flops_per_step / rate
    if seconds <= grace_s:
        return None
    return (f"warning: one step of this plan is {flops_per_step:.3g} FLOP per rank, at least "
            f"{_duration(seconds)} at {rate:.3g} FLOP/s, longer than train.stop_grace_s={grace_s:g} s: a "
            "stop signal will abandon the step in progress (the run resumes from its last checkpoint), and "
            f"the first metrics line comes after ~{_duration(seconds * log_interval)}; a shorter "
            "model.block_size or a smaller batch per step shortens steps")


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"
