"""Muon on the hidden matrices and AdamW on everything else, as one optimizer: PyTorch's own
`torch.optim.Muon` (torch >= 2.9) and `torch.optim.AdamW` behind one param-group list, state dict and step.

Muon (Keller Jordan 2024, https://kellerjordan.github.io/posts/muon/) replaces each matrix's momentum update
by its nearest semi-orthogonal matrix (five Newton-Schulz iterations), which only makes sense for the weights
of hidden linear maps; embeddings, the output head (tied or not), norm gains and biases go to AdamW, as in
modded-nanogpt and Moonlight (Liu et al. 2025, arXiv 2502.16982). In every family the hidden matrices are
the blocks' `nn.Linear` weights: attention's c_attn and c_proj, and the MLP's c_fc and c_proj, plus
SwiGLU's gate c_gate, each its own matrix. The fused attention input `c_attn.weight`
stores three separate maps, q, k and v, stacked by rows for one matmul: each block is orthogonalised on its
own. Orthogonalising the stacked 3C×C matrix instead would give the three blocks one shared singular basis
and singular values near 1/√3 each, so the step of q would depend on the gradients of k and v and be a
third of the size an unfused model would take. Rows are split by detached views that share storage with the
parameter (and its gradient and momentum), so torch's Muon steps each block in place.

Whole-matrix updates cannot run on FSDP shards: the registry refuses FSDP for `muon` (use DDP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from optim.base import BaseOptimizer
from optim.checks import check_hyperparameters
from optim.registry import OptimizerEntry, param_groups, register

MUON_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_steps", "adjust_lr_fn")
QKV_SUFFIX = "c_attn.weight"
HEAD_SUFFIX = "lm_head.weight"  # the output head: AdamW's, tied to wte or not


def hidden_matrix_names(model: nn.Module) -> set[str]:
    """Names of the hidden matrices: weights of `nn.Linear` layers that are neither tied to an embedding
    nor the output head."""
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return {name for name, param in model.named_parameters()
            if id(param) in linear and id(param) not in embedding and param.ndim == 2
            and not name.endswith(HEAD_SUFFIX)}


def muon_param_groups(model: nn.Module, options: Mapping[str, Any], defaults: Mapping[str, Any]
                      ) -> list[dict[str, Any]]:
    """Two groups under the project's weight-decay rule: the hidden matrices (Muon, decayed) and the rest
    (AdamW: embeddings, tied head, LayerNorms and biases, none of which decays)."""
    hidden = hidden_matrix_names(model)
    groups = []
    for group in param_groups(model, options.get("weight_decay", defaults["weight_decay"])):
        for use_muon in (True, False):
            members = [(name, p) for name, p in group["params"] if (name in hidden) == use_muon]
            if members:
                groups.append({**group, "params": members, "use_muon": use_muon})
    return groups


def row_blocks(name: str, param: Tensor) -> list[slice]:
    """The separately orthogonalised row blocks of one matrix: q, k, v for the fused c_attn, else all rows."""
    rows = param.shape[0]
    if name.endswith(QKV_SUFFIX):
        if rows % 3:
            raise ValueError(f"{name} has {rows} rows: expected 3·n_embd (q, k and v stacked)")
        return [slice(i * rows // 3, (i + 1) * rows // 3) for i in range(3)]
    return [slice(0, rows)]


class MuonAdamW(BaseOptimizer):
    """Param groups with `use_muon=True` step with torch.optim.Muon (one matrix or q/k/v block at a time),
    the others with torch.optim.AdamW at `adamw_lr`. Defaults: Keller Jordan's (lr 0.02, momentum 0.95,
    Nesterov, 5 Newton-Schulz steps) and AdamW's GPT-2 small values for the rest."""

    def __init__(
        self,
        named_params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.01,
        adjust_lr_fn: str = "original",
        adamw_lr: float = 6e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
    ) -> None:
        if not hasattr(torch.optim, "Muon"):
            raise ValueError(f"muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
        check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=adamw_eps,
                              betas=adamw_betas)
        check_hyperparameters(lr=adamw_lr)
        if adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        groups = list(named_params)
        if not all(isinstance(group, dict) and "use_muon" in group for group in groups):
            raise ValueError("MuonAdamW takes param groups marked use_muon=True or False (muon_param_groups)")
        muon = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                    adjust_lr_fn=adjust_lr_fn)
        adamw = dict(lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps, weight_decay=0.0)
        ordered = [{**muon, **group} for group in groups if group["use_muon"]]
        ordered += [{**adamw, **group} for group in groups if not group["use_muon"]]
        super().__init__(ordered, {})
        for group in self.param_groups:
            if group["use_muon"] and "param_names" not in group:
                raise ValueError("MuonAdamW splits c_attn by name: give (name, parameter) pairs")
            if group["use_muon"] and any(p.ndim != 2 or hasattr(p, "device_mesh") for p in group["params"]):
                raise ValueError("Muon orthogonalises whole 2-D matrices: no FSDP shards, no other shapes")
        self._wire()

    def _wire(self) -> None:
        """(Re)build the inner optimizers over this optimizer's groups and state (after a load, too)."""
        muon_groups = [group for group in self.param_groups if group["use_muon"]]
        adamw_groups = [group for group in self.param_groups if not group["use_muon"]]
        self._blocks: list[tuple[Tensor, list[tuple[Tensor, slice]]]] = []
        inner_groups = []
        for group in muon_groups:
            views = []
            for name, param in zip(group["param_names"], group["params"], strict=True):
                blocks = [(param.detach()[rows], rows) for rows in row_blocks(name, param)]
                self._blocks.append((param, blocks))
                views += [view for view, _ in blocks]
            inner_groups.append({"params": views, **{key: group[key] for key in MUON_KEYS}})
        self._muon = torch.optim.Muon(inner_groups) if inner_groups else None
        self._adamw = None
        if adamw_groups:
            params = [p for group in adamw_groups for p in group["params"]]
            try:
                self._adamw = torch.optim.AdamW(params, fused=True)
            except RuntimeError:  # no fused kernel for these parameters' device or dtype
                self._adamw = torch.optim.AdamW(params, foreach=True)
            kernel = {key: self._adamw.param_groups[0][key] for key in ("fused", "foreach")}
            for group in adamw_groups:
                for key, value in self._adamw.defaults.items():
                    group.setdefault(key, value)
                group.update(kernel)
            self._adamw.param_groups = adamw_groups  # the same dicts: a schedule's lr reaches AdamW
            self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and the group dicts
        self._wire()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self._loss_of(closure)
        if self._muon is not None:
            outer = [group for group in self.param_groups if group["use_muon"]]
            for group, inner in zip(outer, self._muon.param_groups, strict=True):
                inner.update({key: group[key] for key in MUON_KEYS})
            for param, blocks in self._blocks:
                if param.grad is not None and "momentum_buffer" not in self.state[param]:
                    self.state[param]["momentum_buffer"] = torch.zeros_like(param)
                for view, rows in blocks:
                    view.grad = None if param.grad is None else param.grad[rows]
                    if param.grad is not None:
                        self._muon.state[view]["momentum_buffer"] = self.state[param]["momentum_buffer"][rows]
            self._muon.step()
            for _, blocks in self._blocks:
                for view, _ in blocks:
                    view.grad = None
        if self._adamw is not None:
            self._adamw.step()
        return loss


def muon_state_numel(model: nn.Module, cfg: Mapping[str, Any]) -> int:
    """One momentum tensor per hidden matrix; AdamW's m and v for the rest."""
    hidden = hidden_matrix_names(model)
    return sum(p.numel() * (1 if name in hidden else 2) for name, p in model.named_parameters()
               if p.requires_grad)


register(OptimizerEntry(
    "muon", lambda: MuonAdamW, muon_state_numel, param_groups=muon_param_groups, shards=False,
    shard_reason="Newton-Schulz orthogonalises whole matrices, and a shard holds a slice of rows",
    grouping="Muon on the blocks' nn.Linear weights (c_attn as its q, k and v blocks; SwiGLU's gate, up and "
             "down each alone), decayed; AdamW, undecayed, on embeddings, the head (tied or not), norms and "
             "biases",
))
