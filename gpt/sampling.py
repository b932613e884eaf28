"""The sampling step: the next token from a model's last logits, greedy or drawn at a temperature from the
top-k tokens and the nucleus (the most likely tokens whose probabilities sum to top-p), in that order, as
Hugging Face's `generate` applies them. `GPT.generate` and the sampling command both choose tokens here, and
their defaults are in configs/sample.yaml, which an export's generation_config.json repeats.
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor


def sampling_defaults() -> DictConfig:
    """configs/sample.yaml: max_new_tokens, temperature, top_k, top_p, num_samples, seed."""
    return OmegaConf.load(resources.files("configs") / "sample.yaml")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """`logits` (B, V) with -inf for every token outside the top k and outside the nucleus of mass `top_p`
    (the most likely token always stays). None (or top_p >= 1) leaves that filter off."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> Tensor:
    """The next token of each row of `logits` (B, V), as a (B, 1) tensor: the argmax at temperature 0,
    else a draw (from torch's global generator) from the filtered softmax of logits / temperature."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
