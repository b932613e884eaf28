"""The project's one way to replace a file: readers see the old content or the new, never a torn mix.

Content goes to `<name>.tmp`, which is fsynced and renamed over the target; the directory is then fsynced so
that the rename itself survives a crash. Large files written in place by other means (a token memmap) are
committed with `commit_file` once complete.
"""

from __future__ import annotations

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
    """Replace `path` with `content` (text is written as UTF-8)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    commit_file(tmp, path)
