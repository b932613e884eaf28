"""The run directory as one process uses it: the lock first, then its files, and never another run's files.

`RunDirectory` takes the `out_dir` lock (rank 0) before anything is decided or written there, so that of two
runs started at once on the same directory the second is refused before it touches a file. It writes
`plan.txt` and `config.yaml` together when the run starts (after every start-up check, so a refused resume
leaves the records of the run it refused untouched), keeps `train.log`, and remembers which files this
process created. A run that fails before it started removes exactly those, while it still holds the lock,
and then releases the lock: a config error or a dry run leaves no directory that looks like a run, and
never removes what another run wrote. A write that fails (a full disk) is one line naming the file; nothing
is left half-written (`common.files`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from common.errors import UserError
from common.files import append_whole, write_atomic
from gpt.run_lock import RunLock

if TYPE_CHECKING:
    from gpt.distributed import Runtime

CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
PLAN_FILE = "plan.txt"
log = logging.getLogger(__name__)


def disk_error(path: Path, error: OSError, what: str = "write") -> UserError:
    """The one line for a file that could not be written (a full disk, a quota, a file-size limit)."""
    return UserError(f"cannot {what} {path} ({error.strerror or error}); free disk space (or raise the "
                     "quota) and rerun")


class WholeLineLog(logging.Handler):
    """`train.log`: each record appended whole or not at all. A write that fails (a full disk) ends the file
    log with one warning on the console, which goes on logging; the file keeps only whole lines."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, record: logging.LogRecord) -> None:
        if self.fd is None:
            return
        try:
            append_whole(self.fd, (self.format(record) + "\n").encode())
        except OSError as e:
            self.close()
            log.warning("warning: cannot write %s (%s): the log continues on the console only", self.path,
                        e.strerror or e)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
        super().close()


def setup_logging(log_file: Path | None, is_main: bool) -> None:
    """Rank 0 logs to the console and, when given, `log_file`; other ranks only report warnings."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, WholeLineLog):
            handler.close()
    root.handlers.clear()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if is_main and log_file is not None:
        file = WholeLineLog(log_file)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)


def is_empty(out_dir: str | Path) -> bool:
    """True when out_dir does not exist or holds nothing (Hydra creates it before the job starts)."""
    path = Path(out_dir)
    return not path.is_dir() or not any(path.iterdir())


def remove_if_empty(out_dir: str | Path) -> None:
    """Remove a directory that holds nothing (atomic: a directory another run has written into stays)."""
    with contextlib.suppress(OSError):
        os.rmdir(out_dir)


class RunDirectory:
    """One run directory as this process uses it; a context that holds the lock (rank 0, unless `lock` is
    false: a dry run) and, if the block fails before `start`, removes the files this process created."""

    def __init__(self, path: str | Path, runtime: Runtime, *, lock: bool = True) -> None:
        self.path, self.runtime = Path(path), runtime
        self.is_main = runtime.is_main
        self.lock = RunLock(self.path) if lock and self.is_main else None
        self.created: list[Path] = []
        self.started = False

    def __enter__(self) -> RunDirectory:
        lock = self.lock
        self.runtime.on_main(lambda: lock.acquire() if lock is not None else None)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and not self.started:
            self.discard_created()
        self.release()

    def start_logging(self) -> None:
        """The console, and `train.log` when this process holds the directory (not for a dry run)."""
        path = self.path / LOG_FILE if self.lock is not None else None
        if path is not None:
            self.note_creation(path)
        try:
            setup_logging(path, self.is_main)
        except OSError as e:
            raise disk_error(path, e, "open") from None

    def start(self, config: dict[str, Any], plan: str) -> None:
        """The run starts: its plan and resolved config are recorded (rank 0). From here on the directory
        holds a run, and nothing in it is removed when the run fails."""
        if self.is_main:
            self.write(PLAN_FILE, plan + "\n")
            self.write(CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        self.started = True

    def write(self, name: str, content: str) -> None:
        path = self.path / name
        self.note_creation(path)
        try:
            write_atomic(path, content)
        except OSError as e:
            raise disk_error(path, e) from None

    def note_creation(self, path: Path) -> None:
        """`path` (a file or a folder) is created by this process if it does not exist yet: removed when the
        run fails before it starts."""
        if not path.exists() and path not in self.created:
            self.created.append(path)

    def discard_created(self) -> None:
        """Remove the files this process created (rank 0, still holding the lock)."""
        if not self.is_main:
            return
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, WholeLineLog) and handler.path in self.created:
                root.removeHandler(handler)
                handler.close()
        for path in self.created:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self.created.clear()

    def release(self) -> None:
        """Release the lock (also from another thread, for a run ended from there)."""
        if self.lock is not None:
            self.lock.release()


def read_config(out_dir: Path) -> dict[str, Any] | None:
    """The config.yaml of a run directory; None if it has none. A damaged one is an error, not ignored:
    it is what a resume checks the experiment against."""
    path = out_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not readable YAML ({first}); restore it, or move it away to resume "
                        "from the checkpoints' own record of the config") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a {type(config).__name__}, not a mapping of settings; restore it, or "
                        "move it away to resume from the checkpoints' own record of the config")
    return config
