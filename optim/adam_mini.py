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
step sees each block kind of a tensor (q heads, k heads, rows) as a (blocks, block size) view, whose rows
are the blocks, and updates it in one compiled call (`optim.fused.LargeInputKernel`): each block's mean of
g², v and its denominator, then m and θ elementwise, in one parallel region. `fused=False` runs the same
function eagerly: the reference loop. FSDP2 shards of the rows (DTensors) and non-contiguous tensors take
eager per-row operations instead (for a shard, the row means are gathered: one value per row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from optim.base import BaseOptimizer
from optim.checks import check_hyperparameters
from optim.fused import MIN_COMPILED_NUMEL, LargeInputKernel
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


def _row_mean_squares(rows: Tensor) -> Tensor:
    """mean(g²) of each row of a 2-D gradient."""
    return (rows * rows).mean(dim=1)


def _block_denominators_(grad: Tensor, exp_avg_sq: Tensor, beta2: float, one_minus_beta2: float,
                          bias_correction2: float, eps: float) -> Tensor:
    """On a (blocks, block size) view of g and its `exp_avg_sq` (blocks,): v ← β2·v + (1−β2)·mean(g²) per
    block, then returns each block's denominator √(v / bc2) + ε as a (blocks, 1) column."""
    exp_avg_sq.mul_(beta2).add_(_row_mean_squares(grad) * one_minus_beta2)
    return ((exp_avg_sq / bias_correction2).sqrt() + eps).unsqueeze(1)


def _adam_mini_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, denominator: Tensor, beta1: float,
                       one_minus_beta1: float, decay: float, step_size: float) -> None:
    """On (blocks, block size) views, `denominator` (blocks, 1): m ← β1·m + (1−β1)·g; θ ← θ·decay −
    step_size·m / d."""
    exp_avg.mul_(beta1).add_(grad * one_minus_beta1)
    param.mul_(decay).add_(exp_avg / denominator * -step_size)


def _adam_mini_step_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float,
                     one_minus_beta1: float, beta2: float, one_minus_beta2: float, bias_correction2: float,
                     eps: float, decay: float, step_size: float) -> None:
    """One block kind's whole update on (blocks, block size) views and its `exp_avg_sq` (blocks,)."""
    denominator = _block_denominators_(grad, exp_avg_sq, beta2, one_minus_beta2, bias_correction2, eps)
    _adam_mini_update_(param, grad, exp_avg, denominator, beta1, one_minus_beta1, decay, step_size)


# Compiled with symbolic sizes: one graph for every (blocks, block size) of a model, three loops in one
# parallel region (the blocks' sums of g², their denominators, the elementwise update). Left to itself,
# Inductor would inline the few scalar operations of a block's denominator (a division, a square root)
# into the elementwise loop and redo them for every vector of the block's elements;
# realize_opcount_threshold makes it store them once per block instead.
ADAM_MINI_STEP = LargeInputKernel(_adam_mini_step_, MIN_COMPILED_NUMEL, dynamic=True,
                                  options={"cpp.dynamic_threads": True, "realize_opcount_threshold": 2})


def _block_views(tensor: Tensor, segments: list[Segment]) -> list[Tensor]:
    """A contiguous tensor as one (blocks, block size) view per segment: each row of a view is a block.
    Detached: views of a parameter that several outputs share would otherwise count as autograd views."""
    rows = tensor.detach().view(sum(height for height, _ in segments), -1)
    if len(segments) == 1:
        return [rows.view(segments[0][0] // segments[0][1], -1)]
    parts = rows.split([height for height, _ in segments])
    return [part.view(height // block_rows, -1)
            for part, (height, block_rows) in zip(parts, segments, strict=True)]


def _block_means(row_means: Tensor, segments: list[Segment]) -> Tensor:
    """Per-block means of per-row means (the rows of a block have equal width)."""
    if all(block_rows == 1 for _, block_rows in segments):
        return row_means
    heights = [height for height, _ in segments]
    return torch.cat([part.reshape(-1, block_rows).mean(dim=1)
                      for part, (_, block_rows) in zip(row_means.split(heights), segments, strict=True)])


def _rows(per_block: Tensor, segments: list[Segment]) -> Tensor:
    """Per-block values repeated to one per row (dim 0), as a vector."""
    if all(block_rows == 1 for _, block_rows in segments):
        return per_block
    counts = [height // block_rows for height, block_rows in segments]
    return torch.cat([values.repeat_interleave(block_rows)
                      for values, (_, block_rows) in zip(per_block.split(counts), segments, strict=True)])


def _per_row_step_(param: Tensor, grad: Tensor, state: dict[str, Any], segments: list[Segment], beta1: float,
                   beta2: float, bias_correction2: float, eps: float, decay: float, step_size: float) -> None:
    """The same update through per-row means, for tensors that have no block views: FSDP2 shards of the
    rows (DTensors, whose row means are gathered: one value per row, never the gradient) and
    non-contiguous parameters."""
    row_means = _row_mean_squares(grad.reshape(sum(height for height, _ in segments), -1))
    if isinstance(row_means, DTensor):
        row_means = row_means.redistribute(placements=[Replicate()] * row_means.device_mesh.ndim)
    state["exp_avg_sq"].mul_(beta2).add_(_block_means(row_means, segments), alpha=1.0 - beta2)
    denominator = _rows((state["exp_avg_sq"] / bias_correction2).sqrt_().add_(eps), segments)
    state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
    param.mul_(decay)
    param.addcdiv_(state["exp_avg"], denominator.view(-1, *([1] * (param.dim() - 1))), value=-step_size)


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
        fused: bool = True,
    ) -> None:
        check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, n_head=n_head)
        super().__init__(named_params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                            fused=fused))
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
                decay, step_size = 1.0 - lr * group["weight_decay"], lr / bias_correction1
                if isinstance(param, DTensor) or not param.is_contiguous():
                    _per_row_step_(param, grad, state, segments, beta1, beta2, bias_correction2, group["eps"],
                                   decay, step_size)
                    continue
                update = ADAM_MINI_STEP if group["fused"] else _adam_mini_step_
                tensors = (param, grad.contiguous(), state["exp_avg"])
                views = zip(*(_block_views(t, segments) for t in tensors),
                            state["exp_avg_sq"].split([h // rows for h, rows in segments]), strict=True)
                for param_blocks, grad_blocks, exp_avg_blocks, exp_avg_sq_blocks in views:
                    update(param_blocks, grad_blocks, exp_avg_blocks, exp_avg_sq_blocks, beta1, 1.0 - beta1,
                           beta2, 1.0 - beta2, bias_correction2, group["eps"], decay, step_size)
        return loss


register(OptimizerEntry("adam_mini", lambda: AdamMini, full_size_state(1)))  # m; v is per block
