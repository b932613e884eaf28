"""The compiled-kernel wrapper: the compiler-less fallback gives the same numbers, and small tensors and views
take the eager path without disabling compilation."""

import logging

import torch

from optim.fused import MIN_COMPILED_NUMEL, FusedKernel


def axpy_(y, x, a):
    y.mul_(0.5).add_(x * a)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken_compile(*args, **kwargs):
        def compiled(*call_args):
            raise RuntimeError("no C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = FusedKernel(axpy_)
    y, x = torch.ones(MIN_COMPILED_NUMEL), torch.arange(float(MIN_COMPILED_NUMEL))
    with caplog.at_level(logging.WARNING, logger="optim.fused"):
        kernel(y, x, 2.0)
        kernel(y, x, 2.0)
    assert torch.equal(y, (torch.ones_like(y) * 0.5 + x * 2.0) * 0.5 + x * 2.0)
    assert len([r for r in caplog.records if "no C++ compiler" in r.getMessage()]) == 1


def test_small_and_non_contiguous_tensors_run_eagerly(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: lambda *args: calls.append(args))
    kernel = FusedKernel(axpy_)
    rows = MIN_COMPILED_NUMEL // 4
    y = torch.ones(4, rows).t()  # a transposed view
    kernel(y, torch.ones(rows, 4), 1.0)
    small = torch.ones(3)
    kernel(small, torch.ones(3), 1.0)
    assert not calls
    assert torch.equal(y, torch.full((rows, 4), 1.5)) and torch.equal(small, torch.full((3,), 1.5))
    kernel(torch.ones(4, rows), torch.ones(4, rows), 1.0)
    assert len(calls) == 1 and calls[0][0].shape == (4 * rows,)  # compiled, as one flat view


def test_select_returns_the_eager_reference_when_not_fused():
    kernel = FusedKernel(axpy_)
    assert kernel.select(False) is axpy_ and kernel.select(True) is kernel
