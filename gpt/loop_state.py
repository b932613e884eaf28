"""What the training loop carries from step to step, saved with every checkpoint.

A resumed run must decide and report exactly what the straight run would: flag the same loss spikes, count
the same skip streak, and write the same metrics records. So besides the step, the elapsed time, the recent
losses and the wandb id, the loop's state holds the metrics window (the steps since the last record: where
it began, how many of its steps were clipped, the training clock at its start), so that a record after a
resume that fell inside a window covers the whole window, and a record whose evaluation a stop signal
abandoned, which the resumed run completes and writes.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

SPIKE_FACTOR = 5.0  # a loss above this multiple of the median of the recent losses is recorded as a spike
RECENT_LOSSES = 100  # how many losses of applied steps that median is taken over
SPIKE_MIN_HISTORY = 10  # no spike is flagged before this many losses are known


@dataclass
class MetricsWindow:
    """The steps since the last metrics record (clip fraction and throughput are taken over them)."""

    start_step: int = 0  # the step the previous record reported: the window holds the steps after it
    clipped: int = 0  # steps of the window whose gradient was clipped
    start_s: float = 0.0  # the training clock when the window began

    def state_dict(self) -> dict[str, Any]:
        return {"start_step": self.start_step, "clipped": self.clipped, "start_s": self.start_s}


@dataclass
class LoopState:
    """The loop's state; `state_dict` is JSON (it goes into the checkpoint's manifest)."""

    step: int = 0  # optimizer steps done
    elapsed_s: float = 0.0  # training wall-clock of the earlier sessions of this run
    recent_losses: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_LOSSES))
    skipped_in_row: int = 0
    wandb_id: str | None = None
    window: MetricsWindow = field(default_factory=MetricsWindow)
    pending_record: dict[str, Any] | None = None  # the record of `step`, to complete with its evaluation
    _started: float = field(default_factory=time.perf_counter, repr=False)

    def start_clock(self) -> None:
        self._started = time.perf_counter()

    def clock(self, now: float | None = None) -> float:
        """Training wall-clock so far, the earlier sessions included."""
        return self.elapsed_s + (time.perf_counter() if now is None else now) - self._started

    def end_step(self, loss: float, skipped: bool, clipped: bool = False) -> bool:
        """Count a finished step; whether its loss is a spike (above SPIKE_FACTOR × the recent median)."""
        self.step += 1
        self.window.clipped += clipped
        if skipped:
            return False
        spike = (len(self.recent_losses) >= SPIKE_MIN_HISTORY
                 and loss > SPIKE_FACTOR * statistics.median(self.recent_losses))
        self.recent_losses.append(loss)
        return spike

    @property
    def window_steps(self) -> int:
        return self.step - self.window.start_step

    def new_window(self, now: float | None = None) -> None:
        """A record was written: the next window begins after this step."""
        self.window = MetricsWindow(self.step, 0, self.clock(now))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "elapsed_s": self.clock(), "recent_losses": list(self.recent_losses),
                "skipped_in_row": self.skipped_in_row, "wandb_id": self.wandb_id,
                "window": self.window.state_dict(), "pending_record": self.pending_record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.elapsed_s = state["step"], state["elapsed_s"]
        self.recent_losses = deque(state["recent_losses"], maxlen=RECENT_LOSSES)
        self.skipped_in_row, self.wandb_id = state["skipped_in_row"], state["wandb_id"]
        # Checkpoints older than the window's record start a new window at their step.
        window = state.get("window") or {"start_step": self.step, "clipped": 0, "start_s": self.elapsed_s}
        self.window = MetricsWindow(**window)
        self.pending_record = state.get("pending_record")
