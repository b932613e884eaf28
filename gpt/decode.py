"""The one-token forward that `GPT.generate` runs once per new token over its KV cache.

It is `GPT.forward` for a single position, written as plain tensor calls over weights gathered once: a
(B, C) row instead of (B, T, C), matrix products against transposed views of the weights, the residual
added inside the product where there is no bias, rotary angles read from a table, no dropout, in
inference mode. For a small model on a CPU the one-token forward is bound by per-operator and per-module
overhead, not arithmetic, and that overhead is what this path cuts (docs/models.md has the benchmark). The
module forward still fills the cache from the prompt and serves training and `use_cache=False`;
tests/gpt/test_families.py holds the two to the same logits and the same greedy tokens for every family.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt.model import GPT, KVCache, rotary_angles, rotate


class Linear(NamedTuple):
    """A weight as its transposed view (in, out), for `x @ weight` without re-transposing per call."""

    weight_t: Tensor
    bias: Tensor | None

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is None and self.bias is None:
            return torch.mm(x, self.weight_t)
        if residual is None:
            return torch.addmm(self.bias, x, self.weight_t)
        if self.bias is None:
            return torch.addmm(residual, x, self.weight_t)
        return residual + torch.addmm(self.bias, x, self.weight_t)  # the module's rounding: x + (xW + b)


def linear(module: nn.Linear) -> Linear:
    return Linear(module.weight.t(), module.bias)


def norm(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The norm module's own functional call, its parameters bound."""
    if isinstance(module, nn.RMSNorm):
        return partial(F.rms_norm, normalized_shape=module.normalized_shape, weight=module.weight,
                       eps=module.eps)
    return partial(F.layer_norm, normalized_shape=module.normalized_shape, weight=module.weight,
                   bias=module.bias, eps=module.eps)


class Layer(NamedTuple):
    norm_1: Callable[[Tensor], Tensor]
    norm_2: Callable[[Tensor], Tensor]
    qkv: Linear
    proj: Linear
    up: Linear  # c_fc
    gate: Linear | None  # SwiGLU's c_gate
    down: Linear  # the MLP's c_proj
    activation: nn.Module  # the MLP's own
    scale: float | None


class Decoder:
    """Decodes one token per call after `model` filled `cache` with the window's earlier tokens."""

    def __init__(self, model: GPT) -> None:
        config = model.config
        self.config = config
        self.wte = model.transformer.wte.weight
        self.wpe = model.transformer.wpe.weight if config.positions == "learned" else None
        if config.positions == "rotary":
            device = self.wte.device
            self.cos, self.sin = rotary_angles(config, torch.arange(config.block_size, device=device))
        self.layers = [
            Layer(norm(block.ln_1), norm(block.ln_2), linear(block.attn.c_attn), linear(block.attn.c_proj),
                  linear(block.mlp.c_fc), linear(block.mlp.c_gate) if config.mlp == "swiglu" else None,
                  linear(block.mlp.c_proj), block.mlp.act, block.attn.scale)
            for block in model.transformer.h
        ]
        self.norm_f = norm(model.transformer.ln_f)
        self.head = Linear(model.lm_head.weight.t(), None)

    @staticmethod
    def mlp(layer: Layer, x: Tensor, residual: Tensor) -> Tensor:
        if layer.gate is None:
            return layer.down(layer.activation(layer.up(x)), residual)
        return layer.down(layer.activation(layer.gate(x)) * layer.up(x), residual)

    @torch.inference_mode()
    def step(self, token: Tensor, cache: KVCache) -> Tensor:
        """The logits (B, vocab) after `token` (B, 1), the token at position `cache.length`; stores its
        keys and values in `cache`."""
        config, pos = self.config, cache.length
        B, C, H = token.shape[0], config.n_embd, config.n_head
        x = self.wte[token[:, 0]]
        if self.wpe is not None:
            x = x + self.wpe[pos]
        rope = (self.cos[pos:pos + 1], self.sin[pos:pos + 1]) if config.positions == "rotary" else None
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(layer.norm_1(x)).view(B, 3, H, 1, C // H)
            if rope is None:
                q, k, v = qkv.unbind(1)
            else:  # queries and keys rotated in one call
                (q, k), v = rotate(qkv[:, :2], *rope).unbind(1), qkv[:, 2]
            keys, values = cache.update(i, k, v)
            y = F.scaled_dot_product_attention(q, keys, values, scale=layer.scale).reshape(B, C)
            if config.block == "parallel":
                x = self.mlp(layer, layer.norm_2(x), layer.proj(y, x))
            else:
                x = layer.proj(y, x)
                x = self.mlp(layer, layer.norm_2(x), x)
        cache.length += 1
        return self.head(self.norm_f(x))
