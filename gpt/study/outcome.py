"""What a study reads back from a run directory, and the one file it adds to it.

A run is finished when its `metrics.jsonl` holds the evaluation of its last step (the trainer always
evaluates at `train.max_steps`), or when it diverged: the trainer then stops before the bad update with a
one-line error, and the study records that line in `diverged.txt` so that a rerun of the study counts the
run as a result (final loss inf) instead of resuming it into the same divergence. A final validation loss
that is not finite (written as null) is a divergence too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import write_atomic
from gpt.metrics import METRICS_FILE, read_metrics

DIVERGED_FILE = "diverged.txt"
# The start of the trainer's error line for a non-finite loss or gradient norm (train.on_nonfinite=stop).
DIVERGENCE_MESSAGE = "non-finite "


@dataclass(frozen=True)
class Outcome:
    final_loss: float  # inf when the run diverged
    diverged: bool
    note: str = ""  # the divergence's error line


def val_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's evaluation records, in step order (a NaN evaluation is written as null)."""
    records = [r for r in read_metrics(run_dir / METRICS_FILE) if "val_loss" in r]
    return sorted(records, key=lambda r: r["step"])


def read_outcome(run_dir: Path, steps: int) -> Outcome | None:
    """The run's result, or None while it is not finished (not started, running, or interrupted)."""
    marker = run_dir / DIVERGED_FILE
    if marker.is_file():
        return Outcome(math.inf, True, marker.read_text().strip())
    last = next((r for r in reversed(val_records(run_dir)) if r["step"] == steps), None)
    if last is None:
        return None
    loss = last["val_loss"]
    if loss is None or not math.isfinite(loss):
        return Outcome(math.inf, True, f"validation loss at step {steps} is not finite")
    return Outcome(float(loss), False)


def record_divergence(run_dir: Path, error_line: str) -> Outcome:
    write_atomic(run_dir / DIVERGED_FILE, error_line.strip() + "\n")
    return Outcome(math.inf, True, error_line.strip())


def is_divergence(error_line: str) -> bool:
    return error_line.removeprefix("error: ").startswith(DIVERGENCE_MESSAGE)
