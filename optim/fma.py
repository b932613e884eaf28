"""Multiply-adds rounded once, as ATen rounds `add_(other, alpha=a)` and `addcmul_`, eagerly and compiled.

ATen's CPU kernels evaluate `self + alpha·other` and `self + value·t1·t2` with a fused multiply-add (one
rounding of product and sum: its vector kernels on CPUs with FMA, AVX2 and later; measured on AVX2, torch
2.13), and the official Sophia class's moment, curvature and parameter updates are exactly such calls.
Written as `x * a + y`, the same update rounds twice: over the 30 steps of tests/optim/test_sophia.py that
moves 55% of m and 17% of θ by an ulp or more. Eagerly, the functions here are those ATen calls. Under
`torch.compile` they emit Inductor's own `prims.fma` (`std::fma`/`at::vec::fmadd` in its C++, `tl.fma` in
Triton), because Inductor lowers `add` with `alpha` and `addcmul` on CPU to a separate multiply and add (it
compiles C++ with `-ffp-contract=off`). `addcmul_` follows the device's eager order: on CPU
fma(value·t1, t2, self), on CUDA (recent torch) fma(value, t1·t2, self).
Scalars may be Python floats, or 0-d tensors (`optim.fused.MultiTensorKernel` passes them so): a scalar
meets the tensors rounded to their dtype, as eager rounds a Python scalar.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _scalar(value: Tensor | float, like: Tensor) -> Tensor:
    """`value` as a 0-d tensor of `like`'s dtype, rounded as eager rounds a Python scalar for that dtype."""
    if isinstance(value, Tensor):
        return value.to(like.dtype)
    return torch.full((), value, dtype=like.dtype, device=like.device)


def add_(self: Tensor, other: Tensor, alpha: Tensor | float) -> Tensor:
    """self ← self + alpha·other, rounded once (ATen's `self.add_(other, alpha=alpha)`); returns self."""
    if torch.compiler.is_compiling():
        return self.copy_(torch.ops.prims.fma(other, _scalar(alpha, other), self))
    return self.add_(other, alpha=float(alpha))


def addcmul_(self: Tensor, tensor1: Tensor, tensor2: Tensor, value: Tensor | float) -> Tensor:
    """self ← self + value·tensor1·tensor2, rounded as ATen's `self.addcmul_(tensor1, tensor2, value=value)`.
    """
    if torch.compiler.is_compiling():
        value = _scalar(value, tensor1)
        if self.device.type == "cuda":
            return self.copy_(torch.ops.prims.fma(value, tensor1 * tensor2, self))
        return self.copy_(torch.ops.prims.fma(value * tensor1, tensor2, self))
    return self.addcmul_(tensor1, tensor2, value=float(value))
