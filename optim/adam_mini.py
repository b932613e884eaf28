"""Adam-mini (Zhang et al. 2024): AdamW with one second-moment scalar per parameter block.

m is a full tensor (bias-corrected, as in Adam); v holds one EMA of mean(g²) per block (bias-corrected), which
roughly halves AdamW's optimizer memory. The partition follows the paper's rule for transformers and needs the
parameter names, so the optimizer takes named parameters (`model.named_parameters()`, or param groups whose
"params" are (name, tensor) pairs — torch's own named-parameter support, which also puts the names into the
state_dict) plus `n_head`:
- the fused attention input `...c_attn.weight` (rows q, k, v): one block per head for q and for k (head_dim
  rows each: the paper's observation that Q/K curvature is per head), one block per output row for v;
- every other ≥2-D tensor (attention and MLP projections, SwiGLU's gate included, wte, wpe and an untied
  lm_head): one block per output row (dim 0), so per output neuron, and per token / per position for the
  embeddings and the head;
- 0-D and 1-D tensors (LayerNorm and RMSNorm weights, biases): one block for the whole tensor.
Rotary positions change nothing here: c_attn holds the same q, k and v rows in every family.
Matching is by name suffix, so DDP's `module.` or torch.compile's `_orig_mod.` prefixes do not matter. The
step updates all tensors of a param group in one compiled call (`optim.fused.MultiTensorKernel`): per
tensor, on a (rows, width) view, each row's mean of g², each block's v and denominator, then m and θ
elementwise. `fused=False` runs the same per-tensor function eagerly: the reference loop. FSDP2 shards of the
rows (DTensors) and non-contiguous tensors take eager per-row operations instead (for a shard, the row means
are gathered: one value per row, never the gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from optim.base import BaseOptimizer
from optim.checks import check_hyperparameters
from optim.fused import MultiTensorKernel
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


def _adam_mini_tensor_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                       segments: list[Segment], beta1: float, one_minus_beta1: float, beta2: float,
                       one_minus_beta2: float, bias_correction2: float, eps: float, decay: float,
                       step_size: float) -> None:
    """One tensor's update on (rows, width) views, `exp_avg_sq` one value per block: v ← β2·v +
    (1−β2)·mean(g²) per block (the mean of its rows' means); m ← β1·m + (1−β1)·g; θ ← θ·decay −
    step_size·m / (√(v/bc2) + ε), each row divided by its block's denominator."""
    exp_avg_sq.mul_(beta2).add_(_block_means(_row_mean_squares(grad), segments) * one_minus_beta2)
    denominator = _rows((exp_avg_sq / bias_correction2).sqrt() + eps, segments).unsqueeze(1)
    exp_avg.mul_(beta1).add_(grad * one_minus_beta1)
    param.mul_(decay).add_(exp_avg / denominator * -step_size)


# All tensors of a param group in one compiled call (the row sums of g², the blocks' denominators and the
# elementwise update, in one C++ function). Left to itself, Inductor would inline the few scalar operations
# of a row's denominator (a division, a square root) into the elementwise loop and redo them for every
# vector of the row; realize_opcount_threshold makes it store them once per row instead.
ADAM_MINI_STEP = MultiTensorKernel(_adam_mini_tensor_, per_tensor=_adam_mini_tensor_,
                                   options={"realize_opcount_threshold": 2})


def _per_row_step_(param: Tensor, grad: Tensor, state: dict[str, Any], segments: list[Segment], beta1: float,
                   beta2: float, bias_correction2: float, eps: float, decay: float, step_size: float) -> None:
    """The same update in eager operations on the tensor itself, for tensors that have no (rows, width) view:
    FSDP2 shards of the rows (DTensors, whose row means are gathered: one value per row, never the
    gradient) and non-contiguous parameters."""
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
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            decay = 1.0 - lr * group["weight_decay"]
            batches: dict[int, tuple[list[Any], ...]] = {}  # step count → the lists one call updates
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
                if isinstance(param, DTensor) or not param.is_contiguous():
                    _per_row_step_(param, grad, state, segments, beta1, beta2, 1.0 - beta2 ** state["step"],
                                   eps, decay, lr / (1.0 - beta1 ** state["step"]))
                    continue
                rows = sum(height for height, _ in segments)
                lists = batches.setdefault(state["step"], ([], [], [], [], []))
                views = (param.detach().view(rows, -1), grad.reshape(rows, -1),
                         state["exp_avg"].view(rows, -1), state["exp_avg_sq"], segments)
                for items, item in zip(lists, views, strict=True):
                    items.append(item)
            update = ADAM_MINI_STEP.select(group["fused"])
            for step, lists in batches.items():
                update(lists, (beta1, 1.0 - beta1, beta2, 1.0 - beta2, 1.0 - beta2 ** step, eps, decay,
                               lr / (1.0 - beta1 ** step)))
        return loss


register(OptimizerEntry(
    "adam_mini", lambda: AdamMini, full_size_state(1),  # m; v is per block
    grouping="the weight-decay rule's two groups; within a tensor, one v per block: a head of q and of k, "
             "a row of v, of every other matrix (SwiGLU's three, embeddings, head) and one per vector",
))
