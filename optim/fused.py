"""Per-tensor optimizer updates compiled into one elementwise kernel, with an eager fallback.

Each optimizer writes its update of one tensor as a plain function of tensors and Python floats. Run
eagerly, that function is the reference implementation (one ATen kernel per operation, several passes over
memory). `FusedKernel` also runs it through `torch.compile(dynamic=True)`: Inductor fuses the whole update
into one loop that reads each input once and writes each output once (a C++/OpenMP loop on CPU, a Triton
kernel on CUDA), which is what makes these steps as fast as torch's fused AdamW. Shapes are symbolic and
dynamo does not specialise on Python floats, so one graph serves every tensor of a model and a
learning-rate schedule never triggers a recompile. The compiled code performs the same float roundings in
the same order as eager (Inductor compiles C++ with `-ffp-contract=off`, so it contracts no a·b + c into a
fused multiply-add on its own; where eager ATen does fuse one, `optim.fma` asks for it explicitly): kernels
made of + − × ÷, sign, clamp and those multiply-adds agree bit for bit with the eager loop, which the tests
check; a square root may differ in the last bit (ATen's eager CPU sqrt is not correctly rounded, the
compiled one is: AdaHessian only). If compilation fails (no C++ compiler, an unsupported platform), the
kernel logs one warning and runs the same function eagerly for the rest of the process: slower, same update.
Each kernel counts the calls its compiled function served (`compiled_calls`), so that a test can tell that
the compiled code ran and not the eager fallback a failure earlier in the process left behind.
FSDP2-sharded tensors (DTensors) are updated through their local shards: the update is elementwise and
a parameter, its gradient and its state are sharded alike, so each rank updates exactly its own slice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


# Below this many elements (LayerNorm weights, biases) a compiled call's fixed cost — dynamo's guards and an
# OpenMP fork-join — exceeds the memory passes it saves, so those tensors take the eager path.
MIN_COMPILED_NUMEL = 1 << 16


class CompiledOrEager:
    """A pure tensor function `fn` with a compiled variant built on first use (importing dynamo is slow).

    A compile failure (no C++ compiler, an unsupported platform) logs one warning and sends every later call
    to the eager function, which computes the same thing. Subclasses decide which calls are worth compiling.
    """

    def __init__(self, fn: Callable[..., Any], **compile_options: Any) -> None:
        self.eager = fn
        self._options = compile_options
        self._compiled: Callable[..., Any] | None = None
        self._failed = False
        self.compiled_calls = 0  # calls the compiled function served

    def _try_compiled(self, *args: Any) -> tuple[bool, Any]:
        """(True, result) from the compiled function, or (False, None) once compilation has failed."""
        if self._failed:
            return False, None
        try:
            if self._compiled is None:
                import torch._inductor.inductor_prims  # registers prims.fma (optim.fma) before tracing

                self._compiled = torch.compile(self.eager, fullgraph=True, **self._options)
            result = self._compiled(*args)
        except Exception as error:  # compilation fails before any tensor is touched
            self._failed = True
            log.warning("torch.compile of %s failed (%s: %s); running it eagerly from now on (same "
                        "results, slower)", self.eager.__name__, type(error).__name__, error)
            return False, None
        self.compiled_calls += 1
        return True, result


class FusedKernel(CompiledOrEager):
    """An elementwise update `fn(*tensors_and_floats)` of same-shape tensors, mutating some in place.

    Small tensors (`MIN_COMPILED_NUMEL`) and non-contiguous ones (rare: views) take the eager path, which
    gives the same numbers.
    """

    def __init__(self, fn: Callable[..., None]) -> None:
        # With symbolic sizes Inductor decides on threading from the first call's size, so a kernel first
        # compiled for a LayerNorm vector would run single-threaded on the embedding matrix;
        # dynamic_threads keeps an OpenMP parallel region in every kernel and decides at run time.
        super().__init__(fn, dynamic=True, options={"cpp.dynamic_threads": True})

    def select(self, fused: bool) -> Callable[..., None]:
        """The compiled kernel, or the eager reference when an optimizer's `fused` option is False."""
        return self if fused else self.eager

    def __call__(self, *args: Any) -> None:
        args = tuple(arg.to_local() if isinstance(arg, DTensor) else arg for arg in args)
        tensors = [arg for arg in args if isinstance(arg, Tensor)]
        if tensors[0].numel() >= MIN_COMPILED_NUMEL and all(t.is_contiguous() for t in tensors):
            # Flat views make every call the same 1-D graph whatever the parameter's shape: without them
            # dynamo compiles one graph per rank and per pattern of equal dimensions and soon hits its limit.
            flat = [arg.view(-1) if isinstance(arg, Tensor) else arg for arg in args]
            if self._try_compiled(*flat)[0]:
                return
        self.eager(*args)


class LargeInputKernel(CompiledOrEager):
    """A function of a tensor (and more arguments), compiled when that first tensor has at least
    `min_numel` elements and is contiguous, eager otherwise (where a compiled call's fixed cost exceeds
    the passes over memory it saves). Unlike `FusedKernel`, shapes are kept: reductions along rows."""

    def __init__(self, fn: Callable[..., Any], min_numel: int, **compile_options: Any) -> None:
        super().__init__(fn, **compile_options)
        self.min_numel = min_numel

    def __call__(self, tensor: Tensor, *args: Any) -> Any:
        if tensor.numel() >= self.min_numel and tensor.is_contiguous():
            compiled, result = self._try_compiled(tensor, *args)
            if compiled:
                return result
        return self.eager(tensor, *args)


def _over_lists(fn: Callable[..., None]) -> Callable[..., None]:
    """`fn(*items, *scalars)` for each aligned tuple of items (tensors or per-tensor constants) in `lists`."""

    def apply(lists: tuple[list[Any], ...], scalars: tuple[Tensor | float, ...]) -> None:
        for items in zip(*lists, strict=True):
            fn(*items, *scalars)

    apply.__name__ = getattr(fn, "__name__", type(fn).__name__)
    return apply


class MultiTensorKernel(CompiledOrEager):
    """An elementwise update `fn(*tensors, *floats)` applied to whole lists of tensors in one compiled call.

    `kernel(lists, floats)` updates `lists[0][i], lists[1][i], ...` for every i, as `fn` would tensor by
    tensor: one dynamo call, and one C++ function (CUDA: one wrapper launching its kernels) per step
    instead of one call and one OpenMP region or kernel launch per tensor, which is the fixed cost that
    dominates an optimizer step on GPUs and on busy CPUs. Shapes are static (a model's are fixed: one graph
    per parameter group); the floats travel as 0-d float64 CPU tensors, so a changing learning rate never
    recompiles, and are rounded to float32 where they meet the tensors, as eager rounds Python floats. Lists
    of other values (per-tensor constants such as a partition) are baked into the graph. If compilation
    fails, or more lists than `RECOMPILE_LIMIT` distinct ones are seen, `per_tensor` (by default a
    `FusedKernel` of `fn`) takes over tensor by tensor for the rest of the process: same numbers.
    """

    RECOMPILE_LIMIT = 64  # distinct lists of shapes (param groups of different models) in one process

    def __init__(self, fn: Callable[..., None], per_tensor: Callable[..., None] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(_over_lists(fn), dynamic=False, options=options)
        self.reference = _over_lists(fn)
        self.per_tensor = _over_lists(per_tensor or FusedKernel(fn))

    def select(self, fused: bool) -> Callable[..., None]:
        """This kernel, or the eager per-tensor reference loop when an optimizer's `fused` is False."""
        return self if fused else self.reference

    def __call__(self, lists: tuple[list[Any], ...], floats: tuple[float, ...]) -> None:
        if not lists[0]:
            return
        local = tuple([t.to_local() if isinstance(t, DTensor) else t for t in items] for items in lists)
        scalars = tuple(torch.tensor(floats, dtype=torch.float64).unbind())
        with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):  # fullgraph: a hit raises
            if self._try_compiled(local, scalars)[0]:
                return
        self.per_tensor(lists, floats)


def _ema_square_(average: Tensor, value: Tensor, beta: float, one_minus_beta: float) -> None:
    average.mul_(beta).add_(value * value * one_minus_beta)


EMA_SQUARE = FusedKernel(_ema_square_)  # average ← β·average + (1−β)·value²: AdaHessian's curvature EMA
