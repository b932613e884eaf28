"""Seeds derived from named counters, so every random draw is a pure function of (seed, step, ...).

Nothing random depends on hidden generator state carried between steps: dropout, GNB label sampling and
Hutchinson probes at step s are the same whether the run got there straight or through a resume.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from integers and labels (SeedSequence hashing, so nearby inputs decorrelate)."""
    words = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
