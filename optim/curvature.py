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
import torch.nn.functional as F
from torch import Tensor


def gnb_loss(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mean cross-entropy of `logits` (..., vocab) against labels drawn from softmax(logits) (temperature 1).

    Sampling happens in float32 on detached logits (bf16 probabilities are too coarse for a 50K vocabulary);
    `generator` (on the logits' device) makes the draw reproducible. Non-finite logits (an overflow, a
    diverged model) are made finite for the draw only: the loss stays non-finite, and the caller skips it.
    """
    flat = logits.reshape(-1, logits.size(-1)).float()
    with torch.no_grad():
        probabilities = torch.softmax(torch.nan_to_num(flat), dim=-1)
        labels = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
    return F.cross_entropy(flat, labels)


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
