"""Disk space for a token file, reserved before it is written through a memmap.

A memmap write to a file whose blocks the filesystem cannot supply (a full disk) does not fail with an
error: the kernel kills the process with SIGBUS, and the half-written file stays. So the free space is
checked first, with the exact size known once the split is tokenised, and the blocks are then allocated with
posix_fallocate, which reports a full disk or a file-size limit as an ordinary error. The file is removed on
any failure. On filesystems that only pretend to reserve (copy-on-write or compressing ones such as btrfs
and ZFS, some network filesystems) a SIGBUS remains possible; the free-space check still catches the common
case.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from common.errors import UserError

HEADROOM_BYTES = 64 << 20  # left free for meta.json, logs and the filesystem's own bookkeeping


def reserve(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` allocated on disk, or raise a UserError (leaving no file behind)."""
    free = shutil.disk_usage(path.parent).free
    if free < nbytes + HEADROOM_BYTES:
        raise UserError(f"{path.parent} has {free / 2**30:.2f} GiB free but {path.name} needs "
                        f"{nbytes / 2**30:.2f} GiB (+{HEADROOM_BYTES >> 20} MiB headroom); free space or "
                        "set data.dir to a larger disk")
    try:
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise UserError(f"cannot allocate {nbytes / 2**30:.2f} GiB for {path} ({e.strerror}); free space or "
                        "set data.dir to a larger disk") from None

