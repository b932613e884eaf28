"""Adam-mini (Zhang et al. 2024): AdamW with one second-moment scalar per parameter block.

m is a full tensor (bias-corrected, as in Adam); v holds one EMA of mean(g²) per block (bias-corrected), which
roughly halves AdamW's optimizer memory. The partition follows the paper's rule for transformers and needs the
parameter names, so the optimizer takes named parameters (`model.named_parameters()`, or param groups whose
"params" are (name, tensor) pairs — torch's own named-parameter support, which also puts the names into the
state_dict) plus `n_head`:
- the fused attention input `...c_attn.weight` (rows q, k, v): one block per head for q and for k (head_dim
  rows each: the paper's observation that Q/K curvature is per head), one block per output row for v;
- every other ≥2-D tensor (attention and MLP projections, wte and wpe): one block per output row (dim 0), so
  per output neuron, and per token / per position for the embeddings;
- 0-D and 1-D tensors (LayerNorm weights, biases): one block for the whole tensor.
Matching is by name suffix, so DDP's `module.` or torch.compile's `_orig_mod.` prefixes do not matter. The
update is the eager per-tensor loop: its block reductions are cheap and it is not a speed target here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from optim.base import BaseOptimizer
from optim.checks import check_hyperparameters
from optim.registry import OptimizerEntry, full_size_state, register

Segment = tuple[int, int]  # (rows along dim 0, rows per block): consecutive blocks of equal height


def second_moment_blocks(name: str, shape: torch.Size | tuple[int, ...], n_head: int) -> list[Segment]:
    """One parameter's partition, as row segments covering dim 0 (a ≤1-D tensor counts as one row)."""
    if len(shape) < 2:
        return [(1, 1)]
    rows = shape[0]
    if name.endswith("c_attn.weight"):
        if rows % 3 or (rows // 3) % n_head:
            raise ValueError(f"{name} has {rows} rows: expected 3·n_embd with n_embd divisible by "
                             f"n_head={n_head}")
        width = rows // 3
        return [(width, width // n_head), (width, width // n_head), (width, 1)]
    return [(rows, 1)]


def _block_mean_squares(grad: Tensor, segments: list[Segment]) -> Tensor:
    """mean(g²) per block, as the mean of its rows' means (the rows of a block have equal width)."""
    heights = [height for height, _ in segments]
    row_means = grad.square().reshape(sum(heights), -1).mean(dim=1)
    if isinstance(row_means, DTensor):  # FSDP shards rows: gather one value per row, never the gradient
        row_means = row_means.redistribute(placements=[Replicate()] * row_means.device_mesh.ndim)
    return torch.cat([part.reshape(-1, block_rows).mean(dim=1)
                      for part, (_, block_rows) in zip(row_means.split(heights), segments, strict=True)])


def _broadcast_rows(per_block: Tensor, segments: list[Segment], param: Tensor) -> Tensor:
    """Per-block values repeated to one per row, shaped to broadcast against `param`."""
    if param.dim() < 2:
        return per_block.reshape(())
    counts = [height // block_rows for height, block_rows in segments]
    per_row = torch.cat([values.repeat_interleave(block_rows)
                         for values, (_, block_rows) in zip(per_block.split(counts), segments, strict=True)])
    return per_row.view(-1, *([1] * (param.dim() - 1)))


class AdamMini(BaseOptimizer):
    """Adam-mini with decoupled weight decay (as AdamW); defaults are AdamW's GPT-2 values from the paper."""

    def __init__(
        self,
        named_params: Iterable[Any],
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        n_head: int,
    ) -> None:
        check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, n_head=n_head)
        super().__init__(named_params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.n_head = n_head
        for group in self.param_groups:
            if "param_names" not in group:
                raise ValueError("AdamMini partitions parameters by name: pass model.named_parameters() or "
                                 "param groups of (name, parameter) pairs")
            for name, param in zip(group["param_names"], group["params"], strict=True):
                second_moment_blocks(name, param.shape, n_head)  # fail now on a shape the partition rejects

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self._loss_of(closure)
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            for name, param in zip(group["param_names"], group["params"], strict=True):
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                segments = second_moment_blocks(name, param.shape, self.n_head)
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = param.new_zeros(sum(height // rows for height, rows in segments))
                state["step"] += 1
                bias_correction1 = 1.0 - beta1 ** state["step"]
                bias_correction2 = 1.0 - beta2 ** state["step"]
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
                state["exp_avg_sq"].mul_(beta2).add_(_block_mean_squares(grad, segments), alpha=1.0 - beta2)
                denominator = (state["exp_avg_sq"] / bias_correction2).sqrt_().add_(group["eps"])
                param.mul_(1.0 - lr * group["weight_decay"])
                param.addcdiv_(state["exp_avg"], _broadcast_rows(denominator, segments, param),
                               value=-lr / bias_correction1)
        return loss


register(OptimizerEntry("adam_mini", lambda: AdamMini, full_size_state(1)))  # m; v is per block
