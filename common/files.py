"""The project's ways to change a file so that readers never see a torn one, even when the disk fills up.

A replaced file's content goes to `<name>.tmp`, which is fsynced and renamed over the target; the directory
is then fsynced so that the rename itself survives a crash, and a write that fails (a full disk, a quota)
removes its `.tmp`, leaving the old file as it was. Large files written in place by other means (a token
memmap) are committed with `commit_file` once complete. Appended lines (metrics, logs) go in whole or not at
all: a write that fails part-way is cut back to where the file ended before it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's contents (for a directory: its entries, e.g. a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: Path, path: Path) -> None:
    """Make the complete file `tmp` durable and rename it to `path`, durably."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Replace `path` with `content` (text is written as UTF-8). On failure (an OSError, e.g. ENOSPC) the
    `.tmp` is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        commit_file(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def append_whole(fd: int, data: bytes) -> None:
    """Append `data` to the file open (O_APPEND) as `fd`, all of it or none: a write that fails part-way (a
    full disk writes what fits, then fails) is cut back to the file's previous end before the error is
    raised."""
    end = os.fstat(fd).st_size
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, end)
        raise
