"""Content checks for prepared token files that stay cheap at OpenWebText's 18 GB.

Preparation records the SHA-256 of every BLOCK_BYTES block of each split in `meta.json`. A run then
re-hashes a few blocks chosen at random (SAMPLED_BLOCKS per split, plus the first) at every start, so a file
changed in place (shuffled, overwritten, replaced by one of the same size) is refused before training: a
change that touches every block, like a shuffle, is always caught; a change to a fraction f of the blocks is
caught with probability at least 1 - (1 - f)^SAMPLED_BLOCKS per start, and each restart draws new blocks.
What it cannot see: a change confined to blocks no start happened to sample, and files rewritten together with
their recorded hashes (a new preparation); the latter changes the content digest that every checkpoint
records, so a resume onto re-prepared data is refused anyway.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

BLOCK_BYTES = 16 << 20
SAMPLED_BLOCKS = 4


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


def sampled_mismatch(path: Path, hashes: list[str], block_bytes: int, sampled: int = SAMPLED_BLOCKS,
                     rng: random.Random | None = None) -> str | None:
    """Re-hash block 0 and `sampled` random blocks of `path`; None if they match `hashes`, else which not."""
    rng = rng or random.Random()
    chosen = sorted({0, *rng.sample(range(len(hashes)), min(sampled, len(hashes)))}) if hashes else []
    with open(path, "rb") as f:
        for index in chosen:
            f.seek(index * block_bytes)
            if hashlib.sha256(f.read(block_bytes)).hexdigest() != hashes[index]:
                return (f"{path} block {index} (bytes {index * block_bytes}-{(index + 1) * block_bytes - 1}) "
                        "differs from the hash recorded when it was prepared: the file was changed in place")
    return None
