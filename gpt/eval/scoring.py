"""Log-likelihoods of continuations given contexts under a GPT, batched: the core of HellaSwag and of the
lm-evaluation-harness model. Sequences are sorted by length so that a batch pads little, and right-padded:
causal attention never lets a position see the padding after it, so a padded row's scores are its own. A
sequence longer than the model's context keeps its last `block_size + 1` tokens; a continuation longer than
the context itself is scored on its last `block_size` tokens (`n_tokens` says how many were scored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from gpt.model import GPT


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities
    n_tokens: int
    greedy: bool  # every continuation token is the model's most likely next token


@torch.no_grad()
def score_continuations(
    model: GPT, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 32,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = False,
) -> list[Score]:
    """One Score per (context ids, continuation ids) request, in the given order; contexts are non-empty."""
    block_size = model.config.block_size
    device = next(model.parameters()).device
    sequences = []
    for context, continuation in requests:
        if not context or not continuation:
            raise ValueError("every request needs a non-empty context and continuation")
        sequences.append([*context, *continuation][-(block_size + 1):])
    order = sorted(range(len(requests)), key=lambda i: -len(sequences[i]))
    scores: list[Score | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    for first in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress):
        rows = order[first : first + batch_size]
        width = len(sequences[rows[0]]) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, : len(sequences[i]) - 1] = torch.tensor(sequences[i][:-1])
        with autocast():
            logits = model(x.to(device))[0]
        for r, i in enumerate(rows):
            n = min(len(requests[i][1]), block_size)
            end = len(sequences[i]) - 1
            targets = torch.tensor(sequences[i][-n:], device=device)
            logprobs = logits[r, end - n : end].float().log_softmax(dim=-1)
            scores[i] = Score(logprobs.gather(1, targets[:, None]).sum().item(), n,
                              bool((logprobs.argmax(dim=-1) == targets).all()))
    model.train(was_training)
    return scores  # type: ignore[return-value]
