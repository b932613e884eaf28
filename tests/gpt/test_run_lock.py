"""One run per out_dir: the lock refuses a second run naming the holder, keeps its heartbeat, and is taken
over when its holder is provably dead (its pid ended, an earlier run of the same Slurm job, a heartbeat older
than the staleness limit) — never while the holder may be alive."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import UserError
from gpt.run_lock import LOCK_FILE, RunLock


def plant_lock(out: Path, age_s: float = 0.0, **holder) -> None:
    """A lock file as another run would have left it, its heartbeat `age_s` seconds old."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "slurm_job_id": None,
              "slurm_restart_count": "0", "started": "2026-01-01 00:00:00 UTC", "token": "planted", **holder}
    (out / LOCK_FILE).write_text(json.dumps(record))
    then = time.time() - age_s
    os.utime(out / LOCK_FILE, (then, then))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_is_released_at_the_end_and_held_with_a_heartbeat(tmp_path):
    """Wrong if the heartbeat does not advance (a live run would look dead) or the lock outlives the run."""
    lock = RunLock(tmp_path / "run", heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / "run" / LOCK_FILE
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 100, "the heartbeat did not refresh the lock"
    with pytest.raises(UserError, match="in use by another run"):
        RunLock(tmp_path / "run").acquire()
    lock.release()
    assert not path.exists()


@pytest.mark.parametrize(("holder", "age_s", "reason"), [
    (lambda: {"pid": dead_pid()}, 0, "on this host has ended"),
    (lambda: {"host": "elsewhere", "pid": 1}, 1000, "heartbeat is"),
    (lambda: {"host": "elsewhere", "pid": 1, "slurm_job_id": "77", "slurm_restart_count": "0"}, 0,
     "earlier run of this Slurm job"),
], ids=["dead-pid-here", "old-heartbeat-elsewhere", "earlier-slurm-restart"])
def test_stale_lock_is_taken_over_with_a_warning(holder, age_s, reason, tmp_path, monkeypatch, caplog):
    """Wrong if a killed job's lock blocks its requeue forever, or the takeover is silent."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    plant_lock(tmp_path, age_s, **holder())
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
        assert "taking over the lock" in caplog.text and reason in caplog.text, caplog.text
    finally:
        lock.release()


@pytest.mark.parametrize("holder", [
    {"host": "elsewhere", "pid": 1},
    {"host": "elsewhere", "pid": 1, "slurm_job_id": "77", "slurm_restart_count": "1"},
], ids=["fresh-heartbeat-elsewhere", "same-slurm-run"])
def test_lock_that_may_be_alive_is_not_taken(holder, tmp_path, monkeypatch):
    """Wrong if a run on another node (or another task of this very Slurm run) loses its lock while its
    heartbeat is fresh."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    plant_lock(tmp_path, 10, **holder)
    with pytest.raises(UserError, match=r"host elsewhere, pid 1.*heartbeat 1\d s ago"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "planted"
