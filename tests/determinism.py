"""Where the tests may demand bit-identical numbers: on CPU, where a run repeated (resumed, restarted,
checkpointed) performs the same floating-point operations in the same order. On CUDA, flash attention's and
the embedding's backward accumulate with atomics whose order varies from run to run, so equal runs differ in
the last bits; there the comparisons allow a relative tolerance. The tests run on CUDA when one is visible
(`train.device=auto`)."""

from __future__ import annotations

import math

import torch

CUDA_RELATIVE_TOLERANCE = 1e-5  # atomics reorder float32 sums: ~1e-7 per step, compounding over a few steps


def assert_same_numbers(a: dict, b: dict, what: str = "") -> None:
    """`a == b` on CPU; on CUDA the same keys, and numbers within `CUDA_RELATIVE_TOLERANCE` (recursively)."""
    if not torch.cuda.is_available():
        assert a == b, what
        return
    assert _close(a, b), f"{what}: differs beyond {CUDA_RELATIVE_TOLERANCE:g} relative"


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=CUDA_RELATIVE_TOLERANCE)
    return a == b
