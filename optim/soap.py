"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321): Adam run
in the eigenbasis of Shampoo's preconditioner, written from the paper's Algorithm 3.

For a matrix W (m×n) with gradient G it keeps Shampoo's factors L ← β_s·L + (1−β_s)·GGᵀ and
R ← β_s·R + (1−β_s)·GᵀG, their eigenbases Q_L and Q_R, the momentum M (in W's own basis) and Adam's second
moment V in the rotated basis:
  G' = Q_Lᵀ G Q_R;  M ← β1·M + (1−β1)·G;  V ← β2·V + (1−β2)·G'⊙G'
  W ← W·(1 − lr·wd) − lr·(√(1−β2^t)/(1−β1^t))·Q_L (Q_Lᵀ M Q_R / (√V + ε)) Q_Rᵀ
then L and R take G, and every `precondition_frequency` steps the bases are refreshed by one power iteration
and a QR decomposition, Q ← QR(L·Q), after sorting Q's columns by the estimated eigenvalues diag(QᵀLQ)
(descending) and permuting V's rows or columns to match. As in the authors' code, the first gradient only
initialises L, R and the bases (by an exact eigendecomposition) and moves nothing; a side longer than
`max_precond_dim` (the vocabulary side of the embedding) and 1-D tensors are not rotated (Q = I), which makes
SOAP on them plain Adam. β_s (`shampoo_beta`) defaults to β2. Weight decay is decoupled and applied first, as
for every optimizer in this project (the authors' code decays after the update: a difference of order
lr²·wd per step).

`heavyball` 3.2.1 (PyPI) has a SOAP, but it is a variant: its defaults differ (merged dimensions, a refresh
every 2 steps, 2048 as the largest rotated side), it compiles its chained transforms, and with the settings
matched it still moved a 6×5 matrix differently over 25 steps (by 0.023 after a movement of 0.125). SOAP is
therefore written here and tested against an independent float64 implementation of the paper's algorithm.
Rotations need whole matrices: the registry refuses FSDP for `soap` (use DDP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from optim.base import BaseOptimizer
from optim.checks import check_hyperparameters
from optim.registry import OptimizerEntry, register


def preconditioned_sides(shape: torch.Size | tuple[int, ...], max_precond_dim: int) -> list[int]:
    """The dimensions of a 2-D tensor that get a rotation: those no longer than max_precond_dim."""
    if len(shape) != 2:
        return []
    return [dim for dim in (0, 1) if shape[dim] <= max_precond_dim]


def _rotate(tensor: Tensor, state: dict[str, Any], back: bool) -> Tensor:
    """Q_Lᵀ T Q_R (into the eigenbasis) or Q_L T Q_Rᵀ (back), skipping the sides without a rotation."""
    if "q0" in state:
        tensor = (state["q0"] if back else state["q0"].T) @ tensor
    if "q1" in state:
        tensor = tensor @ (state["q1"].T if back else state["q1"])
    return tensor


def _accumulate(state: dict[str, Any], grad: Tensor, beta: float) -> None:
    """Shampoo's factors: L ← β·L + (1−β)·GGᵀ, R ← β·R + (1−β)·GᵀG."""
    if "gg0" in state:
        state["gg0"].lerp_(grad @ grad.T, 1.0 - beta)
    if "gg1" in state:
        state["gg1"].lerp_(grad.T @ grad, 1.0 - beta)


def _refresh_bases(state: dict[str, Any]) -> None:
    """One power iteration and QR per side, after sorting by estimated eigenvalue (V follows the sort)."""
    for dim in (0, 1):
        if f"q{dim}" not in state:
            continue
        factor, basis = state[f"gg{dim}"], state[f"q{dim}"]
        order = torch.argsort(torch.diagonal(basis.T @ factor @ basis), descending=True)
        state["exp_avg_sq"] = state["exp_avg_sq"].index_select(dim, order)
        state[f"q{dim}"] = torch.linalg.qr(factor @ basis[:, order]).Q


class SOAP(BaseOptimizer):
    """SOAP with the authors' recommended defaults (lr 3e-3, betas (0.95, 0.95), weight decay 0.01, a basis
    refresh every 10 steps, no rotation of sides longer than 10,000)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
    ) -> None:
        check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if shampoo_beta is not None:
            check_hyperparameters(momentum=shampoo_beta)  # the same range, [0, 1)
        if isinstance(precondition_frequency, bool) or precondition_frequency < 1:
            raise ValueError(f"precondition_frequency must be an integer >= 1, got {precondition_frequency}")
        if max_precond_dim < 1:
            raise ValueError(f"max_precond_dim must be >= 1, got {max_precond_dim}")
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps,
                        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                        max_precond_dim=max_precond_dim)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if any(hasattr(p, "device_mesh") for p in group["params"]):
                raise ValueError("SOAP rotates whole matrices: it cannot step FSDP shards")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self._loss_of(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
            for param in self._stepped(group):
                grad, state = param.grad, self.state[param]
                if not state:
                    self._initialise(state, param, grad, shampoo_beta, group["max_precond_dim"])
                    continue
                state["step"] += 1
                step = state["step"]
                state["exp_avg"].lerp_(grad, 1.0 - beta1)
                rotated = _rotate(grad, state, back=False)
                state["exp_avg_sq"].mul_(beta2).addcmul_(rotated, rotated, value=1.0 - beta2)
                direction = _rotate(state["exp_avg"], state, back=False) / (state["exp_avg_sq"].sqrt() + eps)
                step_size = lr * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
                param.mul_(1.0 - lr * group["weight_decay"])
                param.add_(_rotate(direction, state, back=True), alpha=-step_size)
                _accumulate(state, grad, shampoo_beta)
                if step % group["precondition_frequency"] == 0:
                    _refresh_bases(state)
        return loss

    @staticmethod
    def _initialise(state: dict[str, Any], param: Tensor, grad: Tensor, shampoo_beta: float,
                    max_precond_dim: int) -> None:
        """The first gradient: zero moments, the factors from it, their exact eigenbases (largest first)."""
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        for dim in preconditioned_sides(param.shape, max_precond_dim):
            state[f"gg{dim}"] = param.new_zeros(param.shape[dim], param.shape[dim])
        _accumulate(state, grad, shampoo_beta)
        for dim in preconditioned_sides(param.shape, max_precond_dim):
            state[f"q{dim}"] = torch.linalg.eigh(state[f"gg{dim}"]).eigenvectors.flip(1)


def soap_state_numel(model: nn.Module, cfg: Mapping[str, Any]) -> int:
    """m and v per parameter, plus a factor and a basis (side × side each) per rotated side."""
    max_dim = cfg.get("max_precond_dim", 10000)
    return sum(2 * p.numel() + sum(2 * p.shape[dim] ** 2 for dim in preconditioned_sides(p.shape, max_dim))
               for p in model.parameters() if p.requires_grad)


register(OptimizerEntry(
    "soap", lambda: SOAP, soap_state_numel, shards=False,
    shard_reason="its rotations multiply whole matrices, and a shard holds a slice of rows",
    grouping="the weight-decay rule's two groups; each matrix (SwiGLU's three, c_attn whole) rotated on "
             "every side up to max_precond_dim (not the vocabulary's), vectors not rotated",
))
