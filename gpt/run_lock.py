"""One run per `out_dir`: a lock file that works on the shared filesystems clusters use, and that a dead
job cannot hold forever.

`out_dir/.lock` is created with O_CREAT|O_EXCL, which is atomic on local disks and on NFSv3+, Lustre and GPFS
(unlike `flock`, which some of them ignore or keep per node). It records the holder (host, pid and the pid's
start time, Slurm job id and restart count, start time of the run) and a random token. While the run lives,
a daemon thread refreshes the file's mtime every HEARTBEAT_S seconds: the heartbeat. A lock is stale, and
taken over with a warning, when

- its host is this host and its pid is not running (or runs a newer process that reused the pid), or
- it was taken by an earlier incarnation of this Slurm job (same job id, another restart count: Slurm
  requeues only a job that has ended), or
- its heartbeat is older than STALE_AFTER_S, measured against the filesystem's own clock (the mtime of a
  probe file written next to it), so that clock skew between nodes does not matter.

Otherwise the run refuses with one line naming the holder. A takeover renames the stale file away (only one
of two racing runs can) and then creates its own with O_EXCL again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.errors import UserError

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats
log = logging.getLogger(__name__)


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux); None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now_start = _process_start(pid)
    return start is None or now_start is None or now_start == start


def _holder_description(holder: dict[str, Any]) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, started {holder.get('started')}"


class RunLock:
    """The lock of one run directory; `acquire` it on rank 0 before anything is written there."""

    def __init__(self, out_dir: Path, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
                "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "token": self.token}

    def _create(self) -> bool:
        """Create the lock file exclusively; False if it exists. A lock that cannot be written whole (a full
        disk) is removed again: a torn lock would read as a live holder until its heartbeat aged."""
        self.out_dir.mkdir(parents=True, exist_ok=True)  # again: a failed start may have removed it empty
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _read(self) -> tuple[dict[str, Any], float] | None:
        """The holder's record and the heartbeat's mtime; None if the lock vanished meanwhile. An empty lock
        is read again for up to a second: its holder may be writing it right now."""
        for _ in range(20):
            try:
                mtime = self.path.stat().st_mtime
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            if text:
                break
            time.sleep(0.05)
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), mtime

    def _filesystem_now(self) -> float:
        """The filesystem's clock: the mtime of a file just written next to the lock."""
        probe = self.out_dir / f".lock-clock-{self.token}"
        probe.write_bytes(b"")
        try:
            return probe.stat().st_mtime
        finally:
            probe.unlink(missing_ok=True)

    def stale_reason(self, holder: dict[str, Any], mtime: float) -> str | None:
        """Why the lock of `holder` (heartbeat at `mtime`) is stale, or None if it may be alive."""
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"], holder.get("pid_start")):
                return f"its process {holder['pid']} on this host has ended"
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job and holder.get("slurm_restart_count") != os.environ.get(
                "SLURM_RESTART_COUNT", "0"):
            return "it was taken by an earlier run of this Slurm job, which has ended"
        age = self._filesystem_now() - mtime
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def acquire(self) -> None:
        """Take the lock or raise a UserError naming its holder."""
        try:
            for _ in range(5):
                try:
                    if self._create():
                        break
                except FileNotFoundError:
                    continue  # the empty directory was removed between mkdir and create: make it again
                found = self._read()
                if found is None:
                    continue  # released meanwhile: try again
                holder, mtime = found
                reason = self.stale_reason(holder, mtime)
                if reason is None:
                    age = max(0.0, self._filesystem_now() - mtime)
                    raise UserError(
                        f"out_dir {self.out_dir} is in use by another run ({_holder_description(holder)}; "
                        f"heartbeat {age:.0f} s ago); wait for it to end or use another out_dir (a dead "
                        f"run's lock is taken over once its heartbeat is {self.stale_after_s:.0f} s old, or "
                        f"delete {self.path})")
                self._take_over(holder, reason)
            else:
                raise UserError(f"could not take the lock {self.path}: other runs keep taking it")
        except OSError as e:
            raise UserError(f"out_dir {self.out_dir} is not usable ({type(e).__name__}: {e}); "
                            "choose a writable directory") from None
        self._thread = threading.Thread(target=self._beat, name="out_dir-heartbeat", daemon=True)
        self._thread.start()

    def _take_over(self, holder: dict[str, Any], reason: str) -> None:
        """Move a stale lock aside; only one of two runs racing for it gets the file it judged."""
        aside = self.out_dir / f".lock-stale-{self.token}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read_file(aside)
        if moved.get("token") != holder.get("token"):  # another run took it over meanwhile: give it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        log.warning("taking over the lock of out_dir %s from %s: %s", self.out_dir,
                    _holder_description(holder), reason)

    @staticmethod
    def _read_file(path: Path) -> dict[str, Any]:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if self._read_file(self.path).get("token") != self.token:
                    log.warning("the lock of out_dir %s was taken by another run; this run no longer "
                                "holds it", self.out_dir)
                    return
                os.utime(self.path)
            except OSError as e:  # a transient filesystem error: the next beat tries again
                log.warning("could not refresh the lock %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._read_file(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)
