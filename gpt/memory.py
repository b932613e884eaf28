"""Does it fit? The memory a run needs and the memory a rank has, in one place.

Two figures answer it, side by side. `estimate_memory` estimates the peak of a training micro-step or a
curvature pass from the model's shapes: the tensors autograd keeps per token (per block, the logits, the math
attention kernel's B·H·T² probabilities for Hutchinson's double backward), the fp32 weights, gradients and
optimizer state, and nothing of the allocator's fragmentation or the CUDA context (hence the headroom below);
the micro-batches the framework picks come from it (`choose_micro_batch`). `lower_bound_bytes` is what a rank
needs at the least (the training state and one micro-batch's logits): a plan above it could never run.
`device_capacity` is what a rank has: the GPU's memory, or the machine's RAM (or its cgroup limit) shared by
the ranks started on it. `gpt.device_defaults` decides with them; `scripts/gpu_check.py` prints the measured
peak next to the estimate, and docs/scaling.md tabulates it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from gpt.model import GPT, GPTConfig
from optim import entry_for

GiB = 2**30
# Per token and block, in units of n_embd, autograd keeps the fp32 inputs of the norms (the residual stream:
# two, or one where NeoX's parallel block feeds both norms the same input) and, in the compute dtype, the two
# norm outputs, q/k/v, the attention output and its contiguous copy (7), the MLP's hidden activations (GELU:
# its input and output, 2 × width; SwiGLU: gate, silu(gate), up and their product, 4 × width), rotary's
# rotated q and k (2, and their joined copies when only a fraction rotates: 1) and RMSNorm's normalised input
# (2). GPT-2: 2 + 15. Flash attention keeps no T×T matrix. The counts were checked against the tensors
# autograd saves (saved_tensors_hooks) for each family, within 0.25·n_embd.
ATTENTION_VALUES = 7
# Per token, at the loss: logits in the compute dtype, their fp32 copy, log-softmax and both gradients
# (~16 bytes × vocab); GNB's label draw adds an fp32 copy, probabilities and a cleaned copy (~12 more).
LOSS_BYTES_PER_VOCAB = {"train": 16, "gnb": 28, "hutchinson": 16}
# The math kernel (needed for double backward) keeps, per head and query, T attention probabilities: fp32
# ones, and under CUDA autocast (softmax in fp32) also their 16-bit copy for the product with v. Measured on
# CPU: 4.0 bytes in fp32, 4.7 under bf16 autocast (CPU autocast leaves the softmax in bf16).
MATH_ATTENTION_BYTES = {"float32": 4, "bfloat16": 6, "float16": 6}
# create_graph keeps the first backward's graph for the second: about the forward's size again.
DOUBLE_BACKWARD_FACTOR = 2
HEADROOM = 0.85  # use at most this share of the device's memory (context, allocator, fragmentation)
CPU_MICRO_BATCH = 12  # away from CUDA (CPU runs, dry runs) the ceiling: nanoGPT's default micro-batch


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one rank at the peak of a micro-step: `states` (weights, gradients, optimizer state and the
    compute-dtype weight copies) and `activations` (what autograd keeps for the backward)."""

    states: float
    activations: float

    @property
    def total(self) -> float:
        return self.states + self.activations


def meta_model(config: GPTConfig) -> GPT:
    """The model of `config` on the meta device: shapes and parameter count, no memory, no initialisation."""
    with torch.device("meta"):
        return GPT(config)


def state_per_parameter(model: GPT, optim: Mapping[str, Any]) -> float:
    """fp32 optimizer state elements per parameter, as the optimizer's registry entry declares."""
    return entry_for(optim).state_numel(model, optim) / model.num_params()


def values_per_block(config: GPTConfig) -> tuple[int, float]:
    """(fp32 values, compute-dtype values) autograd keeps per token and block, in units of n_embd."""
    fp32 = 1 if config.block == "parallel" else 2
    compute = ATTENTION_VALUES + (4 if config.mlp == "swiglu" else 2) * config.hidden_width / config.n_embd
    if config.positions == "rotary":
        compute += 2 + (config.rotary_fraction < 1)
    if config.norm == "rmsnorm":
        compute += 2
    return fp32, compute


def estimate_memory(model: GPT, *, micro_batch_size: int, dtype: str, state_tensors: float,
                    world_size: int = 1, sharded: bool = False, activation_checkpointing: bool = False,
                    kind: str = "train") -> MemoryEstimate:
    """Peak bytes of one micro-step on one rank of `model` (a `meta_model` will do: only shapes are read).

    `kind` is "train" (a training micro-step), "gnb" (Sophia-G's pass) or "hutchinson" (double backward
    through the math attention kernel). `state_tensors`: fp32 optimizer state elements per parameter.
    """
    c, n = model.config, model.num_params()
    layers, heads, d, T, vocab = c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size
    compute = 4 if dtype == "float32" else 2
    # fp32 weights and gradients, the optimizer state, and the compute-dtype copies (autocast's cache, or
    # FSDP's unsharded bf16 parameters kept during gradient accumulation)
    states = (8 + 4 * state_tensors) * n / (world_size if sharded else 1)
    if compute < 4:
        states += compute * n
    tokens = micro_batch_size * T
    fp32_values, compute_values = values_per_block(c)
    per_block = fp32_values * 4 * d + compute_values * compute * d
    if kind == "hutchinson":
        per_block += MATH_ATTENTION_BYTES[dtype] * heads * T
    # Checkpointing: each block keeps its fp32 input and one block is recomputed at a time. Not for the
    # Hutchinson pass: its first backward builds a graph for the second, which keeps every recomputed block.
    if activation_checkpointing and kind != "hutchinson":
        blocks = layers * 4 * d + per_block
    else:
        blocks = layers * per_block
    activations = tokens * (blocks + LOSS_BYTES_PER_VOCAB[kind] * vocab)
    if kind == "hutchinson":
        activations *= DOUBLE_BACKWARD_FACTOR
    return MemoryEstimate(states, activations)


def lower_bound_bytes(model: GPT, optim: Mapping[str, Any], *, micro_batch_size: int, dtype: str,
                      shards: int = 1) -> int:
    """Bytes one rank needs at least: fp32 weights, their gradients and the optimizer's full-size state (split
    over `shards` ranks under FSDP), plus one micro-batch's logits in the compute dtype. Activations,
    temporaries and the allocator's slack come on top."""
    n_params = model.num_params()
    training_state = 4 * (2 * n_params + entry_for(optim).state_numel(model, optim)) // shards
    element = torch.finfo(getattr(torch, dtype)).bits // 8
    return training_state + micro_batch_size * model.config.block_size * model.config.vocab_size * element


def device_capacity(device: torch.device) -> tuple[int, str]:
    """Memory one rank may use, and what it is: the GPU's total, or RAM over the ranks on this machine."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total, f"the GPU ({torch.cuda.get_device_name(device)}) has {total / GiB:,.1f} GiB"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        ram = min(ram, int(limit)) if limit.isdigit() else ram
    except OSError:
        pass
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = f" shared by {ranks_here} ranks: {ram / ranks_here / GiB:,.1f} GiB each" if ranks_here > 1 else ""
    return ram // ranks_here, f"this machine has {ram / GiB:,.1f} GiB of RAM{share}"


def largest_fitting_divisor(per_rank: int, fits: object, ceiling: int | None = None) -> int | None:
    """The largest divisor m of `per_rank` (≤ `ceiling`) with `fits(m)`; None if not even 1 fits."""
    for m in range(min(per_rank, ceiling or per_rank), 0, -1):
        if per_rank % m == 0 and fits(m):
            return m
    return None


def choose_micro_batch(model: GPT, *, per_rank: int, world_size: int, memory: int | None, what: str,
                       ceiling: int | None = None, **estimate: object) -> int:
    """The micro-batch for a pass of `per_rank` sequences on each of `world_size` ranks: the largest divisor
    of `per_rank`, at most `ceiling` (off CUDA, where `memory` is None: at most `CPU_MICRO_BATCH`), whose
    estimated peak fits `HEADROOM` of `memory`. A model that does not fit even one sequence is a `UserError`
    naming the remedies."""
    if memory is None:
        return largest_fitting_divisor(per_rank, lambda m: True, ceiling or CPU_MICRO_BATCH)
    budget = HEADROOM * memory

    def fits(m: int) -> bool:
        return estimate_memory(model, micro_batch_size=m, world_size=world_size, **estimate).total <= budget

    chosen = largest_fitting_divisor(per_rank, fits, ceiling)
    if chosen is None:
        need = estimate_memory(model, micro_batch_size=1, world_size=world_size, **estimate).total
        remedy = ("a GPU with more memory, or Sophia-G, whose curvature pass needs no double backward"
                  if estimate.get("kind") == "hutchinson" else
                  "set train.activation_checkpointing=true, or use train.strategy=fsdp over more GPUs")
        raise UserError(f"{what}: even one sequence per micro-step needs ≈ {need / GiB:.1f} GiB (estimated) "
                        f"of this GPU's {memory / GiB:.0f} GiB; {remedy}")
    return chosen
