"""The tests' small GPTs: a real model's parameter layout (embeddings, attention, MLP, LayerNorms, the tied
head) in a few hundred parameters, initialised from a fixed seed; one with every parameter random; one
stepped once by AdamW; and a checkpoint of a model written as the trainer writes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gpt.checkpoint import CheckpointDir, save_training_state
from gpt.model import GPT, GPTConfig


def tiny_gpt(*, n_layer: int = 2, n_embd: int = 8, block_size: int = 4, vocab_size: int = 11,
             bias: bool = False, seed: int = 0) -> GPT:
    """2 heads, 8 wide over 4 positions unless told; the global RNG is seeded with `seed` first, so what a
    test draws next is fixed too."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=block_size,
                         vocab_size=vocab_size, bias=bias))


def random_model(vocab_size: int = 320, **overrides) -> GPT:
    """A small GPT whose every parameter (biases and LayerNorms included) is random, so no term hides; its
    vocabulary is the byte tokenizer's 256 padded to a multiple of 64."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=vocab_size, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def stepped() -> tuple[GPT, torch.optim.Optimizer]:
    """A one-layer GPT and its AdamW after one step: every kind of state a checkpoint holds is non-zero."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 32, (2, 8))
    model(x, x)[1].backward()
    optimizer.step()
    return model, optimizer


def write_checkpoint(model: GPT, run_dir: Path, tokenizer: str, sharded: bool = False) -> Path:
    """`model` saved as the trainer saves it (single-file or sharded), with the manifest config it reads."""
    ckpts = CheckpointDir(run_dir / "checkpoints")
    staging = ckpts.begin(5)
    optimizer = torch.optim.AdamW(model.parameters())
    save_training_state(staging, model, optimizer, {}, sharded=sharded, is_main=True)
    config = {"model": {"name": "test", **dataclasses.asdict(model.config)}, "data": {"tokenizer": tokenizer}}
    return ckpts.commit(5, {"config": config})
