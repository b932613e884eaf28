"""The tests' proof that a compiled kernel really ran.

A compile failure sends a kernel to its eager fallback for the rest of the process and warns only once, so
a test of "compiled equals eager" that ran after a failure elsewhere in the same pytest process would compare
eager with eager and pass. `optim.fused` kernels count the calls their compiled function served; this checks
the count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from optim.fused import CompiledOrEager


@contextmanager
def compiled_code_runs(*kernels: CompiledOrEager) -> Iterator[None]:
    """Fails unless the compiled function of every kernel served at least one call inside the block."""
    before = [kernel.compiled_calls for kernel in kernels]
    yield
    for kernel, count in zip(kernels, before, strict=True):
        assert kernel.compiled_calls > count, (
            f"{kernel.eager.__name__}: the compiled kernel never ran in this test (its eager fallback did: "
            "a failed compilation, here or earlier in this process)")
