"""Content checks for prepared token files: every block is verified before a batch reads it.

Preparation records the SHA-256 of every BLOCK_BYTES block of each split in `meta.json`. In a run, a
`BlockVerifier` per split re-hashes each block the first time the loader needs it and remembers the blocks
that matched, so a file changed in place (a flipped byte, a shuffle, a file of the same size swapped in) is
refused before any batch that touches a changed block is returned; batches touching only verified blocks cost
one array lookup. Background threads (`VERIFY_THREADS`) walk the blocks in order from the start, so most
blocks are verified before the training needs them; a block a batch needs first is hashed at once by the
batch's thread, and a mismatch found in the background refuses the next batch, whichever blocks it reads. At
start-up the trainer also hashes block 0 and SAMPLED_BLOCKS random blocks, to refuse a changed file before
resuming. What this cannot see: files rewritten together with their recorded hashes (a new preparation); that
changes the content digest every checkpoint records, so a resume onto re-prepared data is refused anyway.
"""

from __future__ import annotations

import atexit
import hashlib
import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError

BLOCK_BYTES = 16 << 20
SAMPLED_BLOCKS = 4
VERIFY_THREADS = 2  # background hashing threads per process (hashlib releases the GIL)
_PENDING, _RUNNING, _GOOD, _BAD = range(4)


def block_hashes(path: Path, block_bytes: int = BLOCK_BYTES) -> list[str]:
    """SHA-256 of each consecutive `block_bytes` block of `path` (the last one may be shorter)."""
    hashes = []
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_bytes), b""):
            hashes.append(hashlib.sha256(block).hexdigest())
    return hashes


def record(directory: Path, splits: list[str], block_bytes: int = BLOCK_BYTES) -> dict[str, Any]:
    """The `blocks` entry of meta.json for the split files in `directory`."""
    return {"block_bytes": block_bytes,
            **{name: block_hashes(directory / f"{name}.bin", block_bytes) for name in splits}}


def content_digest(blocks: dict[str, Any] | None) -> str | None:
    """One hash standing for all recorded block hashes: what a checkpoint records of the data's content."""
    if not blocks:
        return None
    return hashlib.sha256(repr(sorted(blocks.items())).encode()).hexdigest()


def sampled_blocks(count: int, sampled: int = SAMPLED_BLOCKS, rng: random.Random | None = None) -> list[int]:
    """Block 0 and `sampled` other blocks drawn at random among `count`."""
    rng = rng or random.Random()
    return sorted({0, *rng.sample(range(count), min(sampled, count))}) if count else []


class BlockVerifier:
    """The verified blocks of one token file (see the module docstring); safe to use from several threads."""

    def __init__(self, path: Path, hashes: list[str], block_bytes: int) -> None:
        self.path, self.hashes, self.block_bytes = path, hashes, block_bytes
        self.hashed = 0  # blocks hashed so far: each at most once
        self._state = np.full(len(hashes), _PENDING, dtype=np.uint8)
        self._next = 0  # where the background walk goes on
        self._failure: str | None = None
        self._changed = threading.Condition()

    def require_bytes(self, starts: np.ndarray, stops: np.ndarray) -> None:
        """Verify every block that the byte ranges [starts[i], stops[i]) touch, or raise a UserError."""
        first, last = starts // self.block_bytes, (stops - 1) // self.block_bytes
        if np.all(last - first <= 1):
            needed = np.concatenate([first, last])
        else:
            needed = np.concatenate([np.arange(f, g + 1) for f, g in zip(first, last, strict=True)])
        self.require(needed)

    def require(self, indices: Sequence[int] | np.ndarray) -> None:
        """Verify the blocks `indices`, hashing here those no thread has started on; raise a UserError if one
        of them, or any block verified so far, differs from its recorded hash."""
        indices = np.asarray(indices, dtype=np.int64)
        todo = np.unique(indices[self._state[indices] != _GOOD])
        for index in todo:
            if self._claim(int(index)):
                self._verify(int(index))
        with self._changed:
            self._changed.wait_for(lambda: bool(np.all(self._state[todo] >= _GOOD)))
        if self._failure is not None:
            raise UserError(self._failure)

    def walk(self, stop: threading.Event) -> None:
        """Verify the blocks no one has claimed yet, in order, until all are done or `stop` is set."""
        while not stop.is_set():
            with self._changed:
                while self._next < len(self.hashes) and self._state[self._next] != _PENDING:
                    self._next += 1
                if self._next == len(self.hashes):
                    return
                index = self._next
                self._state[index] = _RUNNING
            self._verify(index)

    def _claim(self, index: int) -> bool:
        with self._changed:
            if self._state[index] != _PENDING:
                return False
            self._state[index] = _RUNNING
            return True

    def _verify(self, index: int) -> None:
        begin = index * self.block_bytes
        try:
            with open(self.path, "rb") as f:
                f.seek(begin)
                good = hashlib.sha256(f.read(self.block_bytes)).hexdigest() == self.hashes[index]
            problem = None if good else (
                f"{self.path} block {index} (bytes {begin}-{begin + self.block_bytes - 1}) differs from the "
                "hash recorded when it was prepared: the file was changed in place; prepare the data again "
                "(python -m data.prepare) into a new data.dir")
        except OSError as e:
            problem = f"cannot read {self.path} ({e.strerror}) to verify its block {index}"
        with self._changed:
            self.hashed += 1
            self._state[index] = _BAD if problem else _GOOD
            if problem and self._failure is None:
                self._failure = problem
            self._changed.notify_all()


class BackgroundVerification:
    """`VERIFY_THREADS` daemon threads walking the verifiers' blocks in order; stopped at exit, between two
    blocks (a block takes milliseconds), so that no thread is inside a read at interpreter shutdown."""

    def __init__(self, verifiers: list[BlockVerifier], threads: int | None = None) -> None:
        threads = VERIFY_THREADS if threads is None else threads
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(verifiers,), daemon=True,
                                          name=f"verify-blocks-{i}") for i in range(threads)]
        for thread in self._threads:
            thread.start()
        atexit.register(self.stop)

    def _run(self, verifiers: list[BlockVerifier]) -> None:
        for verifier in verifiers:
            verifier.walk(self._stop)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        atexit.unregister(self.stop)
