"""The tests' one tiny GPT: a real model's parameter layout (embeddings, attention, MLP, LayerNorms, the tied
head) in a few hundred parameters, initialised from a fixed seed."""

from __future__ import annotations

import torch

from gpt.model import GPT, GPTConfig


def tiny_gpt(*, n_layer: int = 2, n_embd: int = 8, block_size: int = 4, vocab_size: int = 11,
             bias: bool = False, seed: int = 0) -> GPT:
    """2 heads, 8 wide over 4 positions unless told; the global RNG is seeded with `seed` first, so what a
    test draws next is fixed too."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=block_size,
                         vocab_size=vocab_size, bias=bias))
