"""The sampling step (gpt/sampling.py) and `GPT.generate` built on it: top-k and top-p keep exactly the tokens
their definitions name, draws follow the renormalised distribution, greedy decoding is the argmax of a plain
forward pass, and the stream yields generate's tokens one by one."""

from __future__ import annotations

import math

import pytest
import torch

from gpt.sampling import filter_logits, next_tokens, sampling_defaults
from tests.tiny_model import random_model


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """The reference nucleus: tokens by falling probability until their mass first reaches top_p."""
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        kept.add(token)
        mass += probs[token]
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_nucleus(top_p):
    """Wrong if the nucleus drops the token that crosses top_p, keeps one after it, or mixes up the
    positions of sorted and unsorted tokens (then the wrong tokens survive)."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    kept = filter_logits(logits, top_p=top_p).isfinite()
    for row in range(logits.shape[0]):
        probs = torch.softmax(logits[row], -1).tolist()
        assert set(kept[row].nonzero().flatten().tolist()) == nucleus(probs, top_p)


def test_top_k_then_top_p():
    """Wrong if the nucleus is taken over the unfiltered distribution instead of the top-k one (Hugging Face's
    order, which generation_config.json users get): the top 2 of (0.5, 0.25, 0.15, 0.1), renormalised, are
    (2/3, 1/3), and mass 0.6 needs one of them; over all four it would need two."""
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()
    assert filter_logits(logits, top_k=2, top_p=0.6).isfinite().tolist() == [[True, False, False, False]]
    assert filter_logits(logits, top_p=0.6).isfinite().tolist() == [[True, True, False, False]]
    assert filter_logits(logits, top_k=2).isfinite().tolist() == [[True, True, False, False]]
    assert filter_logits(logits, top_p=1.0).isfinite().all()


def test_draws_follow_the_filtered_distribution():
    """Wrong if a filtered token is ever drawn, or the survivors are not drawn in proportion to their
    probabilities at the temperature (logits / T, renormalised)."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]])
    temperature, n = 0.7, 20000
    draws = next_tokens(logits.expand(n, -1), temperature=temperature, top_k=4, top_p=0.9).flatten()
    weights = [math.exp(x / temperature) for x in logits[0, :4].tolist()]
    probs = [w / sum(weights) for w in weights]
    allowed = nucleus(probs, 0.9)
    expected = {t: probs[t] / sum(probs[s] for s in allowed) for t in allowed}
    counts = torch.bincount(draws, minlength=5).tolist()
    assert set(t for t, c in enumerate(counts) if c) == allowed
    for token, p in expected.items():
        assert counts[token] / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))


def test_greedy_generation_is_the_argmax_of_plain_forward_passes():
    """Wrong if generate's greedy path (KV-cached) chooses other tokens than the argmax of a full forward pass
    over the sequence so far, up to the context length (beyond it: tests/gpt/test_families.py)."""
    model = random_model()
    idx = torch.tensor([[5, 17, 200, 3]])
    new = model.config.block_size - idx.shape[1]
    out = model.generate(idx, new, temperature=0)
    expected = idx
    with torch.no_grad():
        for _ in range(new):
            logits = model(expected)[0][:, -1, :]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_stream_yields_generates_tokens_in_order():
    """Wrong if the stream misses a token, yields them out of order, or draws other tokens than generate
    from the same seed (the sampling command streams; exports and tests call generate)."""
    model = random_model()
    idx = torch.zeros(3, 1, dtype=torch.long)
    torch.manual_seed(1)
    seen = []
    for tokens in model.stream(idx, 50, temperature=1.0, top_p=0.9):
        seen.append(tokens.clone())
        if len(seen) == 5:
            break
    torch.manual_seed(1)
    assert torch.equal(torch.cat([idx, *seen], dim=1), model.generate(idx, 5, temperature=1.0, top_p=0.9))


def test_defaults_are_the_config_files():
    """Wrong if configs/sample.yaml lost a key the sampler, the command or the export reads."""
    assert set(sampling_defaults()) >= {"max_new_tokens", "temperature", "top_k", "top_p", "num_samples",
                                        "seed"}
