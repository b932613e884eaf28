"""Curvature estimators: small pure functions that the trainer composes around its micro-batch loop.

GNB (Sophia-G): `gnb_loss(logits)` is the mean cross-entropy against labels sampled from softmax(logits);
its gradient ĝ satisfies E[B·ĝ⊙ĝ] = diag of the Gauss-Newton matrix of the mean loss (B predictions),
because E[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag(p) − ppᵀ is the softmax Hessian. Sampling the labels is the whole
point: squaring the gradient against the *training* labels gives Adam's second moment (the empirical
Fisher), not GNB — the bug of several third-party Sophia packages. Hutchinson (Sophia-H, AdaHessian): for any
probe u with E[uuᵀ] = I, E[u⊙Hu] = diag(H), where Hu comes from double backward (`hessian_vector_products`);
the trainer sums u⊙Hu over micro-batches with one shared u. The probe is Gaussian N(0, I) in the Sophia paper
and Rademacher (±1) in AdaHessian's: both unbiased, with per-coordinate variance Σ_j H_ij² + H_ii² and
Σ_{j≠i} H_ij² respectively (`PROBES`). Batching, gradient sync, clipping and autocast belong to the trainer,
not here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from optim.fused import LargeInputKernel

# Inverse-CDF sampling searches blocks of this many vocabulary entries first, then one entry in the block.
SAMPLING_BLOCK = 64
# Below this many logits a compiled call's fixed cost exceeds the passes over memory it saves.
MIN_COMPILED_LOGITS = 1 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 logits (bf16 probabilities are too coarse for a 50K vocabulary)."""
    return torch.promote_types(dtype, torch.float32)


def _row_statistics(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of (N, V) logits: the max m and Σ exp(l − m) per block of `SAMPLING_BLOCK` columns (the last
    block may be shorter). A row holding NaN or +inf has a non-finite max."""
    x = logits.to(_compute_dtype(logits.dtype))
    row_max = x.amax(dim=-1)
    weights = torch.exp(x - row_max[:, None])
    full = weights.shape[-1] // SAMPLING_BLOCK * SAMPLING_BLOCK
    block_sums = weights[:, :full].reshape(weights.shape[0], -1, SAMPLING_BLOCK).sum(dim=-1)
    if full < weights.shape[-1]:
        block_sums = torch.cat([block_sums, weights[:, full:].sum(dim=-1, keepdim=True)], dim=-1)
    return row_max, block_sums


def _cross_entropy_grad(logits: Tensor, row_max: Tensor, log_sum: Tensor, labels: Tensor, scale: Tensor
                        ) -> Tensor:
    """∂/∂logits of scale·Σ_rows (m + log Σ exp(l − m) − l[label]) = scale·(softmax − onehot), in the
    logits' dtype. l − m is exact in float32, so m and the log-sum stay apart (as log_softmax keeps them):
    folded into one float32 normaliser, its rounding at |l| ≈ 10 would cost p − 1 five digits."""
    grad = torch.exp(logits.to(row_max.dtype) - row_max[:, None] - log_sum[:, None])
    grad.scatter_add_(1, labels[:, None], torch.full_like(row_max[:, None], -1.0))
    return (grad * scale).to(logits.dtype)


# One pass over the (N, V) logits each; the vocabulary is fixed and N takes one or two values per run.
ROW_STATISTICS = LargeInputKernel(_row_statistics, MIN_COMPILED_LOGITS, dynamic=False)
CROSS_ENTROPY_GRAD = LargeInputKernel(_cross_entropy_grad, MIN_COMPILED_LOGITS, dynamic=False)


def row_statistics(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`_row_statistics` of (N, V) logits and which rows are finite. Logits holding NaN or inf are made
    finite for the statistics (one more pass, only then), so every row can still be sampled."""
    row_max, block_sums = ROW_STATISTICS(logits)
    finite = torch.isfinite(row_max)
    if not bool(finite.all()):
        row_max, block_sums = ROW_STATISTICS(torch.nan_to_num(logits))
    return row_max, block_sums, finite


def sample_from_logits(
    logits: Tensor, uniforms: Tensor, statistics: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """One label per row of (N, V) `logits`, drawn from softmax(logits) by inverse CDF with `uniforms` (N,)
    in [0, 1): the label is the first index whose cumulative probability exceeds u.

    The search runs on the blocks' sums (accumulated in float64), then on the chosen block's entries
    (cumulative in float64, scaled to the block's sum), so neither the whole CDF nor the probabilities are
    ever materialised: each entry gets its exact share of its block's mass, and a block's mass is off by a
    few float32 roundings of its 64-term sum (relative ~1e-7), where one float32 cumulative sum over 50K
    entries would blur every entry below ~1e-7 of the *total*. A rounding at the CDF's end (u·total
    rounding up to total, or the scaled position reaching the block's end) never picks past the last entry
    of positive probability. `statistics` are `row_statistics(logits)[:2]` when the caller already has them.
    """
    row_max, block_sums = row_statistics(logits)[:2] if statistics is None else statistics
    block_sums = block_sums.to(torch.float64)
    cumulative = block_sums.cumsum(dim=-1)
    total = cumulative[:, -1:]
    below_total = torch.nextafter(total, total.new_zeros(()))
    target = torch.minimum(uniforms.to(torch.float64)[:, None] * total, below_total)
    block = torch.searchsorted(cumulative, target, right=True)  # (N, 1): the first block ending above target
    before = torch.where(block > 0, cumulative.gather(1, (block - 1).clamp(min=0)), 0.0)
    fraction = (target - before) / block_sums.gather(1, block)  # where in the block, in [0, 1)
    vocab = logits.shape[-1]
    columns = block * SAMPLING_BLOCK + torch.arange(SAMPLING_BLOCK, device=logits.device)
    values = torch.nan_to_num(logits.gather(1, columns.clamp(max=vocab - 1)).to(row_max.dtype))
    weights = torch.where(columns < vocab, torch.exp(values - row_max[:, None]), 0.0)
    within_cumulative = weights.to(torch.float64).cumsum(dim=-1)
    within = torch.searchsorted(within_cumulative, fraction * within_cumulative[:, -1:], right=True)
    last_positive = SAMPLING_BLOCK - 1 - (weights > 0).flip(-1).to(torch.int8).argmax(dim=-1, keepdim=True)
    return (block * SAMPLING_BLOCK + torch.minimum(within, last_positive)).squeeze(1)


class _SampledCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, V) logits against given labels, with the log-normaliser precomputed: the
    forward is a gather, the backward one fused pass (softmax − onehot) that never keeps a float32 copy."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, row_max: Tensor, log_sum: Tensor, labels: Tensor) -> Tensor:
        ctx.save_for_backward(logits, row_max, log_sum, labels)
        picked = logits.gather(1, labels[:, None]).squeeze(1).to(row_max.dtype)
        return ((row_max - picked) + log_sum).mean()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        logits, row_max, log_sum, labels = ctx.saved_tensors
        scale = (grad_output / logits.shape[0]).to(row_max.dtype)
        return CROSS_ENTROPY_GRAD(logits, row_max, log_sum, labels, scale), None, None, None


def gnb_loss(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mean cross-entropy of `logits` (..., vocab) against labels drawn from softmax(logits) (temperature 1).

    One uniform per row from `generator` (on the logits' device) drives an exact inverse-CDF draw
    (`sample_from_logits`), so the labels are a pure function of the logits and the generator's seed.
    Sampling and the loss work in float32 (float64 for float64 logits) without copying the logits; the value
    and gradient equal `F.cross_entropy(logits.float(), labels)`. Non-finite logits are made finite for the
    draw only: the loss stays non-finite, and the caller skips it.
    """
    flat = logits.reshape(-1, logits.size(-1))
    with torch.no_grad():
        row_max, block_sums, finite = row_statistics(flat.detach())
        uniforms = torch.rand(flat.shape[0], dtype=torch.float64, device=flat.device, generator=generator)
        labels = sample_from_logits(flat.detach(), uniforms, (row_max, block_sums))
        log_sum = block_sums.to(torch.float64).sum(dim=-1).log().to(row_max.dtype)
        log_sum = torch.where(finite, log_sum, torch.nan)
    return _SampledCrossEntropy.apply(flat, row_max, log_sum, labels)


def rademacher_like(params: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """One ±1 tensor per parameter (same shape, dtype and device): Hutchinson's probe vector u."""
    return [
        torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype).mul_(2).sub_(1)
        for p in params
    ]


def gaussian_like(params: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """One standard-normal tensor per parameter (same shape, dtype and device): the paper's probe u."""
    return [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for p in params]


# Hutchinson probe distributions by the name `optim.probe` gives them.
PROBES = {"gaussian": gaussian_like, "rademacher": rademacher_like}


def hessian_vector_products(
    loss: Tensor, params: Sequence[Tensor], vectors: Sequence[Tensor]
) -> list[Tensor]:
    """H·v for the Hessian of `loss` w.r.t. `params`, by double backward (one entry per parameter).

    Parameters with no path to the loss, or whose gradient does not depend on any parameter, get zeros.
    Attention must run through a kernel with a double backward (`gpt.model.math_attention`).
    """
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    terms = [(g * v).sum() for g, v in zip(grads, vectors, strict=True) if g is not None and g.requires_grad]
    if not terms:
        return [torch.zeros_like(p) for p in params]
    products = torch.autograd.grad(torch.stack(terms).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if hv is None else hv for hv, p in zip(products, params, strict=True)]


def aligned_estimates(
    param_groups: Sequence[dict[str, Any]], estimates: Sequence[Tensor]
) -> Iterator[tuple[dict[str, Any], Tensor, Tensor]]:
    """(group, param, estimate) triples for `update_hessian(estimates)`, estimates in param-group order.

    Walking the groups with one running index is what the reference AdaHessian got wrong with several groups.
    """
    params = [(group, p) for group in param_groups for p in group["params"]]
    if len(estimates) != len(params):
        raise ValueError(f"got {len(estimates)} curvature estimates for {len(params)} parameters")
    for (group, param), estimate in zip(params, estimates, strict=True):
        if estimate.shape != param.shape:
            raise ValueError(f"estimate of shape {tuple(estimate.shape)} for a parameter of shape "
                             f"{tuple(param.shape)}")
        yield group, param, estimate
