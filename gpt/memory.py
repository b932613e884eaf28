"""Peak GPU memory of a training micro-step and of a curvature pass, estimated from the model's shapes, and
the micro-batch sizes the framework picks from it when the config leaves them open (`null`).

An estimate, not a measurement: it counts the tensors autograd keeps per token (per block, the logits, the
math attention kernel's B·H·T² probabilities for Hutchinson's double backward), the fp32 weights, gradients
and optimizer state, and nothing of the allocator's fragmentation or the CUDA context; hence the headroom
below. `scripts/gpu_check.py` prints the measured peak next to it; docs/scaling.md tabulates it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import UserError

GiB = 2**30
# Per token and block, autograd keeps two fp32 LayerNorm inputs (the residual stream) and 15·n_embd values in
# the compute dtype: the two LayerNorm outputs, q/k/v, the attention output and its contiguous copy, the
# MLP's 4·n_embd input to GELU and 4·n_embd input to c_proj. Flash attention keeps no T×T matrix.
FP32_VALUES_PER_BLOCK = 2
COMPUTE_VALUES_PER_BLOCK = 15
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


def _model_shape(model: object) -> tuple[int, int, int, int, int, int]:
    c = model.config if hasattr(model, "config") else model
    return c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size, _num_params(c)


def _num_params(c: object) -> int:
    """Parameters of a GPT of these shapes without biases: blocks, final LayerNorm, tied token and position
    tables (what `GPT.num_params` counts, from the config alone)."""
    d = c.n_embd
    return c.n_layer * (12 * d * d + 2 * d) + d + (c.vocab_size + c.block_size) * d


def estimate_memory(model: object, *, micro_batch_size: int, dtype: str, state_tensors: float,
                    world_size: int = 1, sharded: bool = False, activation_checkpointing: bool = False,
                    kind: str = "train") -> MemoryEstimate:
    """Peak bytes of one micro-step on one rank; `model` is a GPT or a config with its shape fields.

    `kind` is "train" (a training micro-step), "gnb" (Sophia-G's pass) or "hutchinson" (double backward
    through the math attention kernel). `state_tensors`: fp32 optimizer state elements per parameter.
    """
    layers, heads, d, T, vocab, n = _model_shape(model)
    compute = 4 if dtype == "float32" else 2
    # fp32 weights and gradients, the optimizer state, and the compute-dtype copies (autocast's cache, or
    # FSDP's unsharded bf16 parameters kept during gradient accumulation)
    states = (8 + 4 * state_tensors) * n / (world_size if sharded else 1)
    if compute < 4:
        states += compute * n
    tokens = micro_batch_size * T
    per_block = FP32_VALUES_PER_BLOCK * 4 * d + COMPUTE_VALUES_PER_BLOCK * compute * d
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


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes; None elsewhere (CPU, meta), where no fit is computed."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def largest_fitting_divisor(per_rank: int, fits: object, ceiling: int | None = None) -> int | None:
    """The largest divisor m of `per_rank` (≤ `ceiling`) with `fits(m)`; None if not even 1 fits."""
    for m in range(min(per_rank, ceiling or per_rank), 0, -1):
        if per_rank % m == 0 and fits(m):
            return m
    return None


def choose_micro_batch(model: object, *, batch_size: int, world_size: int, memory: int | None, what: str,
                       ceiling: int | None = None, **estimate: object) -> int:
    """The micro-batch for `batch_size` sequences per pass over `world_size` ranks: the largest divisor of
    the per-rank share, at most `ceiling` (off CUDA, where `memory` is None: at most `CPU_MICRO_BATCH`),
    whose estimated peak fits `HEADROOM` of `memory`. A model that does not fit even one sequence is a
    `UserError` naming the remedies."""
    if batch_size % world_size:
        raise UserError(f"{what}={batch_size} does not split over world size {world_size}; pick a batch size "
                        "divisible by the number of ranks")
    per_rank = batch_size // world_size
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
