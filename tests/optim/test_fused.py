"""The compiled-kernel wrapper: the compiler-less fallback gives the same numbers, and small tensors and views
take the eager path without disabling compilation, and the multi-tensor kernel equals the eager loop."""

import logging

import torch

from optim.fused import MIN_COMPILED_NUMEL, FusedKernel, MultiTensorKernel


def axpy_(y, x, a):
    y.mul_(0.5).add_(x * a)


def broken_compile(*args, **kwargs):
    """torch.compile on a machine without a C++ compiler: the compiled function fails when called."""
    def compiled(*call_args):
        raise RuntimeError("no C++ compiler")
    return compiled


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = FusedKernel(axpy_)
    y, x = torch.ones(MIN_COMPILED_NUMEL), torch.arange(float(MIN_COMPILED_NUMEL))
    with caplog.at_level(logging.WARNING, logger="optim.fused"):
        kernel(y, x, 2.0)
        kernel(y, x, 2.0)
    assert torch.equal(y, (torch.ones_like(y) * 0.5 + x * 2.0) * 0.5 + x * 2.0)
    assert kernel.compiled_calls == 0  # what the tests of compiled paths check
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


def test_multi_tensor_kernel_updates_every_tensor_in_one_call_and_equals_the_eager_loop():
    """Wrong here: the one compiled call over lists skips or mixes up tensors, recompiles when a float
    changes (a schedule would recompile every step), or rounds the floats differently from eager. Every one
    of the three calls must have run the compiled code (`compiled_calls`), not an eager fallback."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(300, 7), (5,), (2, 3, 4)]
    start = [torch.randn(s, generator=generator) for s in shapes]
    values = [torch.randn(s, generator=generator) for s in shapes]
    kernel = MultiTensorKernel(axpy_)
    compiled, eager = [t.clone() for t in start], [t.clone() for t in start]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for a in (0.1, 0.37, 1 / 3):  # a changing float, e.g. a learning rate
        kernel((compiled, values), (a,))
        kernel.select(False)((eager, values), (a,))
    assert kernel.compiled_calls == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for a, b, s in zip(compiled, eager, start, strict=True):
        assert torch.equal(a, b) and not torch.equal(a, s)


def test_multi_tensor_kernel_falls_back_to_its_per_tensor_function(monkeypatch, caplog):
    """Wrong here: a failed compilation loses the update or warns on every step."""
    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = MultiTensorKernel(axpy_, per_tensor=axpy_)
    ys, xs = [torch.ones(3), torch.ones(2, 2)], [torch.full((3,), 2.0), torch.full((2, 2), 4.0)]
    with caplog.at_level(logging.WARNING, logger="optim.fused"):
        kernel((ys, xs), (1.0,))
        kernel((ys, xs), (1.0,))
    assert torch.equal(ys[0], torch.full((3,), 3.25)) and torch.equal(ys[1], torch.full((2, 2), 6.25))
    assert len([r for r in caplog.records if "no C++ compiler" in r.getMessage()]) == 1
