"""The GPT: one decoder-only transformer whose configuration picks the family, single-device code.

The defaults are GPT-2's: learned positions, pre-LayerNorm blocks, a GELU MLP of width 4·n_embd, `lm_head`
tied to `wte`, optional biases (off in the Sophia paper's runs). Five switches give the other families
(docs/models.md): rotary positions on a fraction of each head (`positions`, `rotary_base`,
`rotary_fraction`), RMSNorm (`norm`, `norm_eps`), an exact-GELU or SwiGLU MLP of any width (`mlp`,
`mlp_hidden`), NeoX's parallel block, whose attention and MLP both read the block's input (`block`), and an
untied output head (`tie_embeddings`). GPT-NeoX is rotary + parallel + exact GELU + biases + untied;
Llama-style is rotary + RMSNorm + SwiGLU, no biases, untied. Every family has causal attention through
`scaled_dot_product_attention`, the GPT-2 initialisation (N(0, 0.02), residual projections scaled by
1/√(2·n_layer)) and, as an option, the official Sophia runs' division of layer l's attention scores by
l + 1 (`scale_attn_by_inverse_layer_idx`, Hugging Face's name). `generate` decodes with a cache of keys and
values, each token after a window's first through the lean one-token forward of gpt/decode.py.
Parallelism, precision and compilation wrap this module from outside.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.errors import UserError
from gpt.sampling import next_tokens

CHOICES = {"positions": ("learned", "rotary"), "norm": ("layernorm", "rmsnorm"),
           "mlp": ("gelu_tanh", "gelu", "swiglu"), "block": ("sequential", "parallel")}
# The fields added for the other families; a run recorded before they existed is a GPT-2 run.
FAMILY_FIELDS = ("positions", "rotary_base", "rotary_fraction", "norm", "norm_eps", "mlp", "mlp_hidden",
                 "block", "tie_embeddings")


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
    bias: bool = False  # biases of every Linear and LayerNorm (never of the head)
    scale_attn_by_inverse_layer_idx: bool = False  # scores × 1/(√head_dim · (layer_idx + 1))
    positions: str = "learned"  # learned (a table, wpe) | rotary
    rotary_base: float = 10000.0  # rotary: the wavelength base θ
    rotary_fraction: float = 1.0  # rotary: the share of each head's dimensions rotated (NeoX's rotary_pct)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu_tanh"  # gelu_tanh (GPT-2's) | gelu (exact, NeoX's) | swiglu (Llama's)
    mlp_hidden: int | None = None  # the MLP's hidden width; None: 4·n_embd
    block: str = "sequential"  # sequential | parallel (NeoX: x + attn(ln_1(x)) + mlp(ln_2(x)))
    tie_embeddings: bool = True  # lm_head is wte

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, key) < 1:
                raise UserError(f"model.{key} must be at least 1 (got {getattr(self, key)})")
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"model.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise UserError(f"model.mlp_hidden must be at least 1, or null for 4·n_embd (got "
                            f"{self.mlp_hidden})")
        if not (self.norm_eps > 0 and self.rotary_base > 0):
            raise UserError(f"model.norm_eps={self.norm_eps} and model.rotary_base={self.rotary_base} must "
                            "be positive")
        if not 0 < self.rotary_fraction <= 1:
            raise UserError(f"model.rotary_fraction={self.rotary_fraction} must be in (0, 1]")
        if self.positions == "rotary" and (self.rotary_dim < 2 or self.rotary_dim % 2):
            raise UserError(f"model.rotary_fraction={self.rotary_fraction} rotates {self.rotary_dim} of each "
                            f"head's {self.head_dim} dimensions; rotary needs an even number, at least 2")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that rotary positions rotate (the first ones), as NeoX rounds them."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def hidden_width(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    def describe(self) -> str:
        """The switches in words, e.g. 'rotary positions (25% of each head), LayerNorm, exact-GELU MLP
        4096 wide, parallel blocks, biases, untied head'."""
        positions = ("learned positions" if self.positions == "learned" else
                     f"rotary positions ({self.rotary_fraction:.0%} of each head, base {self.rotary_base:g})")
        mlp = {"gelu_tanh": "GELU (tanh)", "gelu": "exact-GELU", "swiglu": "SwiGLU"}[self.mlp]
        parts = [positions, {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[self.norm],
                 f"{mlp} MLP {self.hidden_width} wide", f"{self.block} blocks",
                 "biases" if self.bias else "no biases",
                 "tied head" if self.tie_embeddings else "untied head"]
        if self.scale_attn_by_inverse_layer_idx:
            parts.append("attention scores ÷ (layer + 1)")
        return ", ".join(parts)


def rotary_angles(config: GPTConfig, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin (T, rotary_dim) of each position's angles, θ^(-2i/rotary_dim) per pair i, each angle
    repeated for both halves of the rotated dimensions: the layout of GPT-NeoX and Hugging Face's Llama."""
    dim = config.rotary_dim
    inverse_frequency = 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2, device=positions.device,
                                                                   dtype=torch.float32) / dim))
    angles = positions.float()[:, None] * inverse_frequency[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary positions on x (B, H, T, head_dim): dimension j of the rotated part pairs with j + dim/2."""
    dim = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated, passed = x[..., :dim], x[..., dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, passed), dim=-1) if passed.shape[-1] else rotated


class KVCache:
    """The keys and values of the tokens seen so far, per layer, for `generate`: a prompt fills it in one
    forward, then each new token adds one position, up to `capacity` positions."""

    def __init__(self, n_layer: int, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer
        self.length = 0  # positions filled; the next token's position

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this forward's k and v (B, H, T, head_dim) after the earlier ones; all of them so far."""
        if self.keys[layer] is None:
            shape = (*k.shape[:2], self.capacity, k.shape[-1])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # rows: q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # None keeps SDPA's own 1/√head_dim; an explicit scale still runs the fused kernels.
        self.scale = (1.0 / (math.sqrt(config.head_dim) * (layer_idx + 1))
                      if config.scale_attn_by_inverse_layer_idx else None)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        dropout = self.dropout if self.training else 0.0
        # A token decoded after a cached prompt sees every cached position: no mask.
        causal = cache is None or T > 1
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU: c_proj(gelu(c_fc(x))). SwiGLU: c_proj(silu(c_gate(x)) ⊙ c_fc(x)), Llama's gate/up/down."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        width = config.hidden_width
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.c_gate = nn.Linear(config.n_embd, width, bias=config.bias)
        activations = {"gelu_tanh": nn.GELU(approximate="tanh"), "gelu": nn.GELU(), "swiglu": nn.SiLU()}
        self.act = activations[config.mlp]
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.act(self.c_gate(x)) * self.c_fc(x) if self.swiglu else self.act(self.c_fc(x))
        return self.dropout(self.c_proj(hidden))


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.parallel = config.block == "parallel"

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                cache: KVCache | None = None) -> Tensor:
        if self.parallel:
            return x + self.attn(self.ln_1(x), rope, cache) + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        tables = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.positions == "learned":
            tables["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(
            dict(
                **tables,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=make_norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
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

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy (targets of -1 are ignored). With
        a `cache`, idx continues the cached tokens: a whole prompt into an empty cache, then one token per
        call."""
        _, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        if start and T > 1:
            raise ValueError("after its prompt, a KV cache takes one token per forward")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx)
        if self.config.positions == "learned":
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        rope = rotary_angles(self.config, pos) if self.config.positions == "rotary" else None
        for block in self.transformer.h:
            x = block(x, rope, cache)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            # At least float32 (bf16 logits are upcast), float64 logits stay float64 (reference comparisons).
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(wide.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied weight counted once); non_embedding drops the input tables (wte, wpe)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(table.weight.numel() for key, table in self.transformer.items() if key in ("wte", "wpe"))
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N + 12·L·d·T (PaLM appendix B), N counting every weight a matmul
        uses: the blocks (SwiGLU's three matrices included) and the output head (the tied token table or
        the untied head, a V×d matmul: 30% of gpt2_small's FLOPs), not the input tables (wte when untied,
        wpe). This is nanoGPT's count, so MFU figures compare with its. Rotary's elementwise products, like
        the norms', are left out (under 0.5% of any config here)."""
        c = self.config
        T = seq_len or c.block_size
        matmul_params = self.num_params(non_embedding=True) + self.lm_head.weight.numel() * c.tie_embeddings
        return 6 * matmul_params + 12 * c.n_layer * c.n_embd * T

    @torch.no_grad()
    def generate(
        self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, *,
        top_p: float | None = None, stop_id: int | None = None, use_cache: bool = True,
    ) -> Tensor:
        """Continuations of idx (B, T): the prompt followed by up to `max_new_tokens` tokens each. Temperature
        0 is greedy; top_k and top_p (nucleus) restrict sampling. A row that produces `stop_id` is padded
        with it, and decoding ends early once every row has. See `stream` for the context window."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p=top_p, stop_id=stop_id,
                               use_cache=use_cache))
        return torch.cat([idx, *new], dim=1)

    @torch.no_grad()
    def stream(
        self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, *,
        top_p: float | None = None, stop_id: int | None = None, use_cache: bool = True,
    ) -> Iterator[Tensor]:
        """`generate`'s new tokens (B, 1), one at a time as they are decoded.

        The model sees at most block_size tokens. Up to that length the context is the whole sequence; once
        it is full, the window keeps its last three quarters and grows again: a shift every block_size/4
        tokens, not every token, so that the cache (`use_cache`) is rebuilt once per shift instead of the
        whole window being recomputed for every token. With or without the cache the windows, hence the
        tokens, are the same."""
        from gpt.decode import Decoder  # here, not above: gpt.decode builds on this module

        block = self.config.block_size
        keep = max(1, block - max(1, block // 4))
        start = max(0, idx.shape[1] - block)
        cache, cached_start = None, None
        # Dropout in training mode needs the modules; otherwise a token after the window's first is decoded
        # by the lean one-token forward.
        decoder = Decoder(self) if use_cache and not (self.training and self.config.dropout) else None
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for produced in range(max_new_tokens):
            if idx.shape[1] - start > block:
                start = idx.shape[1] - keep
            if not use_cache:
                logits = self(idx[:, start:])[0][:, -1]
            elif cached_start != start:  # a new window: its tokens fill a new cache, as long as it can grow
                capacity = min(block, idx.shape[1] - start + max_new_tokens - produced)
                cache, cached_start = KVCache(self.config.n_layer, capacity), start
                logits = self(idx[:, start:], cache=cache)[0][:, -1]
            elif decoder is not None:
                logits = decoder.step(idx[:, -1:], cache)
            else:
                logits = self(idx[:, -1:], cache=cache)[0][:, -1]
            token = next_tokens(logits, temperature, top_k, top_p)
            if stop_id is not None:
                token = torch.where(finished[:, None], stop_id, token)
                finished |= token[:, 0] == stop_id
            idx = torch.cat((idx, token), dim=1)
            yield token
            if stop_id is not None and bool(finished.all()):
                return



@contextmanager
def math_attention():
    """Route attention through the math kernel: double backward (Hessian-vector products) needs it."""
    with sdpa_kernel(SDPBackend.MATH):
        yield
