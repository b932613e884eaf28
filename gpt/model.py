"""GPT-2: a decoder-only transformer, single-device code.

Learned positions, pre-LayerNorm blocks, GELU MLP of width 4·n_embd, causal attention through
`scaled_dot_product_attention`, `lm_head` tied to `wte`, optional biases (off by default, as in the Sophia
paper's runs), GPT-2 initialisation with residual projections scaled by 1/√(2·n_layer). The official Sophia
runs also divided layer l's attention scores by l + 1 (`scale_attn_by_inverse_layer_idx`, Hugging Face's
name for it). Parallelism, precision and compilation wrap this module from outside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.errors import UserError
from gpt.sampling import next_tokens


@dataclass(frozen=True)
class GPTConfig:
    """The model's shape; defaults are GPT-2 small's. The trainer builds it from configs/model/<name>.yaml,
    which sets every field."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64 for fast matmuls
    dropout: float = 0.0
    bias: bool = False
    scale_attn_by_inverse_layer_idx: bool = False  # scores × 1/(√head_dim · (layer_idx + 1))

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, key) < 1:
                raise UserError(f"model.{key} must be at least 1 (got {getattr(self, key)})")
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # rows: q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # None keeps SDPA's own 1/√head_dim; an explicit scale still runs the fused kernels.
        head_dim = config.n_embd // config.n_head
        self.scale = (1.0 / (math.sqrt(head_dim) * (layer_idx + 1))
                      if config.scale_attn_by_inverse_layer_idx else None)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy (targets of -1 are ignored)."""
        _, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied weight counted once); non_embedding drops wte and wpe, as in 6N."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N + 12·L·d·T (PaLM appendix B), N counting the blocks and the output
        head (the tied token table, a V×d matmul: 30% of gpt2_small's FLOPs) but not the position table.
        This is nanoGPT's count, so MFU figures compare with its."""
        c = self.config
        T = seq_len or c.block_size
        matmul_params = self.num_params(non_embedding=True) + self.lm_head.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_embd * T

    @torch.no_grad()
    def generate(
        self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        top_p: float | None = None, on_token: Callable[[Tensor], bool] | None = None,
    ) -> Tensor:
        """Sample continuations of idx (B, T); temperature 0 means greedy (gpt/sampling.py). `on_token`, if
        given, sees each new column of tokens (B, 1) as it is chosen and returns True to stop early."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            next_token = next_tokens(self(context)[0][:, -1, :], temperature, top_k, top_p)
            idx = torch.cat((idx, next_token), dim=1)
            if on_token is not None and on_token(next_token):
                break
        return idx


@contextmanager
def math_attention():
    """Route attention through the math kernel: double backward (Hessian-vector products) needs it."""
    with sdpa_kernel(SDPBackend.MATH):
        yield
