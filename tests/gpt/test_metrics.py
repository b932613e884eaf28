"""metrics.jsonl on resume: cut back to the checkpoint's step, without the records the resumed run writes
again (a stop's partial window, a record whose evaluation a stop abandoned) or a torn last line."""

import json

import pytest

from gpt.metrics import MetricsLog, clock_time, eta_seconds, format_line


def records(*entries: dict) -> str:
    return "".join(json.dumps(entry) + "\n" for entry in entries)


STOPPED = [{"step": 0, "val_loss": 5.0}, {"step": 4, "clip_fraction": 0.5, "window_steps": 4},
           {"step": 6, "clip_fraction": 1.0, "window_steps": 2, "partial": True}]


@pytest.mark.parametrize(("lines", "step", "pending", "kept"), [
    # a stop between records at 6: its partial record goes, the resumed run's record of 8 covers 5-8
    (STOPPED, 6, False, [0, 4]),
    # a stop abandoned the evaluation of 8: that record goes, the resumed run writes it whole
    ([*STOPPED[:2], {"step": 8, "partial": True}], 8, True, [0, 4]),
    # a complete record of the checkpoint's step stays; later ones (after the checkpoint) go
    ([*STOPPED[:2], {"step": 5}, {"step": 6}], 4, False, [0, 4]),
    # no checkpoint: the run starts over, step-0 evaluation included
    (STOPPED, 0, False, []),
], ids=["partial-window", "pending-evaluation", "complete", "no-checkpoint"])
def test_resume_keeps_only_what_the_resumed_run_does_not_write_again(lines, step, pending, kept, tmp_path):
    """Wrong if a record the resumed run writes again stays (a duplicated step, or a partial window next to
    the whole one), or one it does not write is lost."""
    (tmp_path / "metrics.jsonl").write_text(records(*lines) + '{"step": 9, "tor')  # and a torn line
    MetricsLog(tmp_path, enabled=True).resume(step, record_pending=pending)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == kept


def test_the_console_line_shows_step_of_total_elapsed_and_eta():
    """Wrong if the line lacked the step out of the total, the elapsed time or the ETA, or the ETA were not
    the remaining steps at the average time per step so far: 30 of 300 steps in 90 s leave 270 × 3 s."""
    record = {"step": 30, "train_loss": 2.5, "tokens_per_sec": 1234.0, "mfu": 0.4, "elapsed_s": 90.0}
    line = format_line(record, 300)
    assert line.startswith("step  30/300 | loss 2.5000")
    assert "1,234 tok/s | mfu 40.0% | 0:01:30 elapsed | ETA 0:13:30" in line
    assert eta_seconds(90.0, 30, 300) == pytest.approx(810.0)
    assert eta_seconds(0.0, 0, 300) is None  # nothing measured yet
    assert "ETA" not in format_line({"step": 0, "val_loss": 5.0, "elapsed_s": 0.0}, 300)
    assert clock_time(3 * 3600 + 61.4) == "3:01:01" and clock_time(26 * 3600) == "26:00:00"
    assert "mfu" not in format_line({**record, "mfu": None}, 300)  # no peak known (a CPU)
