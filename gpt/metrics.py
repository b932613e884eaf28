"""Run metrics: `metrics.jsonl` (the file every plot and analysis reads), the console line, and the loggers
that mirror it (wandb, TensorBoard, CSV: `gpt.metric_sinks`).

Only rank 0 writes. Each record is appended whole or not at all: a write that fails part-way (a full disk) is
cut back to the last whole line and reported. On resume the file is cut back to the records of steps the
checkpoint already covers (none when there is no checkpoint: the step-0 evaluation is redone), so a run
killed after logging but before checkpointing never leaves duplicated or torn lines; a record written at a
stop that the resumed run completes (marked `partial`: the window of a stop between two records, or a
record whose evaluation the stop abandoned) is dropped too. The loggers the config enables get the same
records, each appended after metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from common.files import append_whole, write_atomic
from gpt.metric_sinks import CsvSink, TensorBoardSink, WandbSink

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Valid records of a metrics file, skipping a torn last line."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so the file stays valid for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.path = Path(out_dir) / METRICS_FILE
        self.enabled = enabled
        self.sinks: list[WandbSink | TensorBoardSink | CsvSink] = []

    def resume(self, step: int, record_pending: bool) -> None:
        """Keep the records of the steps up to `step`, the checkpoint's, except a `partial` record of that
        step (the resumed run completes its window) and, when the checkpoint holds a record still to be
        written (`record_pending`: its evaluation was abandoned), the record of that step."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [r for r in read_metrics(self.path) if step > 0 and (
            r.get("step", 0) < step
            or (r.get("step") == step and not r.get("partial") and not record_pending))]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def start_wandb(self, settings: Any, config: dict[str, Any], run_id: str | None) -> str | None:
        """Start or continue the wandb run (`settings`: the wandb section); its id, for the checkpoint."""
        if self.enabled and settings.enabled:
            self.sinks.append(WandbSink(settings, config, run_id, self.path.parent))
            return self.sinks[-1].id
        return run_id

    def start_files(self, settings: Any, first_step: int) -> None:
        """The loggers that write files into the run directory (TensorBoard, CSV); this session's first record
        is of `first_step` (0 for a new run)."""
        if self.enabled and settings.tensorboard.enabled:
            self.sinks.append(TensorBoardSink(self.path.parent, first_step))
        if self.enabled and settings.csv.enabled:
            self.sinks.append(CsvSink(self.path.parent, lambda: read_metrics(self.path)))

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` as one line (an OSError, e.g. a full disk, leaves the file's whole lines as they
        were)."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            append_whole(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def clock_time(seconds: float) -> str:
    """h:mm:ss, the hours growing past 24 rather than rolling into days."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def eta_seconds(elapsed_s: float, step: int, max_steps: int) -> float | None:
    """The time the remaining steps take at the run's average so far (its evaluations and checkpoints
    included); None before the first step."""
    if step <= 0 or elapsed_s <= 0:
        return None
    return elapsed_s / step * max(max_steps - step, 0)


def format_line(record: dict[str, Any], max_steps: int) -> str:
    """One readable console line for a metrics record: the step out of `max_steps`, the values, the
    throughput and MFU (where a peak is known), the elapsed training time and the ETA."""
    width = len(str(max_steps))
    parts = [f"step {record['step']:>{width}}/{max_steps}"]
    for key, fmt in (("train_loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"),
                     ("hellaswag_acc_norm", "hellaswag {:.3f}"), ("lr", "lr {:.2e}"),
                     ("grad_norm", "gnorm {:.3f}"), ("win_rate", "win {:.3f}"),
                     ("tokens_per_sec", "{:,.0f} tok/s"), ("mfu", "mfu {:.1%}")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    if record.get("elapsed_s") is not None:
        parts.append(f"{clock_time(record['elapsed_s'])} elapsed")
        eta = eta_seconds(record["elapsed_s"], record["step"], max_steps)
        if eta is not None:
            parts.append(f"ETA {clock_time(eta)}")
    return " | ".join(parts)
