"""The loggers a run may mirror its metrics records to, beside `metrics.jsonl`: wandb, TensorBoard and CSV.

Each sink gets every record `gpt.metrics.MetricsLog` appends (rank 0 only), and each continues a resumed run:
wandb the same run id (kept in the checkpoint), TensorBoard with a purge step (events of steps the resume
redoes are dropped by TensorBoard's readers), and the CSV file rewritten from the records `metrics.jsonl`
kept. wandb's own environment (WANDB_MODE, WANDB_PROJECT, WANDB_DIR, ...) is honoured: a setting the config
leaves null, or whose variable is set, is left to wandb. A wandb that cannot start (no API key online, no
network) is one line, before the run directory holds a run.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import write_atomic

TENSORBOARD_DIR = "tensorboard"
CSV_FILE = "metrics.csv"


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers (flags as 0/1) without the step: what the scalar loggers plot."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float))}


class WandbSink:
    """A wandb run: started (or continued, `run_id`) on creation."""

    def __init__(self, settings: Any, config: dict[str, Any], run_id: str | None, out_dir: Path) -> None:
        import wandb

        # A value the config sets is passed unless its WANDB_* variable is set; None is always left to wandb.
        wanted = {"project": (settings.project, "WANDB_PROJECT"), "name": (settings.name, "WANDB_NAME"),
                  "mode": (settings.mode, None), "dir": (str(out_dir), "WANDB_DIR")}
        passed = {key: value for key, (value, variable) in wanted.items()
                  if value is not None and not (variable and os.environ.get(variable))}
        try:
            self.run = wandb.init(id=run_id, resume="allow", config=config, **passed)
        except Exception as e:  # wandb's errors (no API key, no network, a bad setting) have no common base
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise UserError(f"wandb could not start ({first.strip()}); log in with `wandb login`, run "
                            "offline (WANDB_MODE=offline or wandb.mode=offline), or set wandb.enabled=false"
                            ) from None
        self.id: str = self.run.id

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """Event files in <out_dir>/tensorboard, one scalar series per record key (the keys of metrics.jsonl)."""

    def __init__(self, out_dir: Path, first_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("tensorboard.enabled=true needs the tensorboard package: pip install -e "
                            "'.[tensorboard]' (or set tensorboard.enabled=false)") from None
        # purge_step: TensorBoard drops the events of earlier sessions at the steps this session writes again
        self.writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=first_step or None)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class CsvSink:
    """<out_dir>/metrics.csv: a row per record, a column per key in order of first appearance, an empty cell
    where a record lacks a key. A record bringing a new key rewrites the file from `metrics.jsonl` (the
    keys of a run settle within its first records); any other record is appended."""

    def __init__(self, out_dir: Path, read_records: Callable[[], list[dict[str, Any]]]) -> None:
        self.path, self.read_records = out_dir / CSV_FILE, read_records
        self.columns: list[str] = []
        self.rewrite()  # the records a resume kept

    def rewrite(self) -> None:
        records = self.read_records()
        self.columns = list(dict.fromkeys(key for record in records for key in record))
        write_atomic(self.path, self._rows(records, header=True))

    def _rows(self, records: list[dict[str, Any]], header: bool = False) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, self.columns, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(records)
        return out.getvalue()

    def write(self, record: dict[str, Any]) -> None:
        if not set(record) <= set(self.columns):
            self.rewrite()
            return
        with open(self.path, "a") as f:
            f.write(self._rows([record]))

    def close(self) -> None:
        pass
