"""The GPT-2 architecture against published facts and closed forms."""

import math

import pytest
import torch

from gpt.model import GPT, GPTConfig, math_attention

# OpenAI's checkpoints as published (vocab 50257, biases on, context 1024): independent of this code.
PUBLISHED_COUNTS = {
    (12, 12, 768): 124_439_808,
    (24, 16, 1024): 354_823_168,
    (36, 20, 1280): 774_030_080,
    (48, 25, 1600): 1_557_611_200,
}


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0, bias=False)
    return GPT(GPTConfig(**{**cfg, **overrides}))


@pytest.mark.parametrize("shape", list(PUBLISHED_COUNTS))
def test_parameter_counts_match_openai_gpt2(shape):
    """Wrong if a layer, a bias or the weight tying differs from GPT-2."""
    n_layer, n_head, n_embd = shape
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50257, bias=True))
    assert model.num_params() == PUBLISHED_COUNTS[shape]


@pytest.mark.parametrize(
    "name, shape, millions",
    [("gpt2_30m", (6, 6, 384), 30.3), ("gpt2_small", (12, 12, 768), 124.4),
     ("gpt2_medium", (24, 16, 1024), 354.6), ("gpt2_540m", (30, 18, 1152), 537.0),
     ("gpt2_large", (36, 20, 1280), 773.6), ("gpt2_xl", (48, 25, 1600), 1556.8)],
)
def test_paper_sizes_without_bias_and_padded_vocab(name, shape, millions):
    """The configs' sizes: V·d + T·d + L·(12d² + 2d) + d with the padded vocab and no biases."""
    L, _, d = shape
    closed_form = 50304 * d + 1024 * d + L * (12 * d * d + 2 * d) + d
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=L, n_head=shape[1], n_embd=d))
    assert model.num_params() == closed_form
    assert round(closed_form / 1e6, 1) == pytest.approx(millions, abs=0.05), name


def test_loss_at_init_is_log_vocab():
    """GPT-2 init gives near-uniform predictions: loss ≈ ln(V) on random targets."""
    model = tiny(vocab_size=256, n_embd=64)
    x = torch.randint(0, 256, (8, 16))
    y = torch.randint(0, 256, (8, 16))
    _, loss = model(x, y)
    assert loss.item() == pytest.approx(math.log(256), abs=0.05)


def test_causal_logits_do_not_see_the_future():
    model = tiny().eval()
    x = torch.randint(0, 64, (2, 16))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    a, _ = model(x)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tied_embedding_is_one_tensor():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(1 for n, _ in model.named_parameters() if "wte" in n or "lm_head" in n) == 1


def test_residual_projections_are_scaled():
    model = tiny(n_layer=8, n_embd=256, vocab_size=64)
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_flops_per_token_formula():
    model = tiny()
    """Every matmul weight (blocks and the tied 64×32 head), 6 FLOPs each per token, plus attention."""
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token() == 6 * (n + 64 * 32) + 12 * 2 * 32 * 16


def test_attention_matches_explicit_softmax_and_math_kernel():
    """Our SDPA path equals a hand-written masked softmax attention (and the math-kernel route)."""
    model = tiny().eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 16, 32)
    q, k, v = attn.c_attn(x).split(32, dim=2)
    q, k, v = (t.view(2, 16, 2, 16).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(16)
    scores = scores.masked_fill(torch.triu(torch.ones(16, 16, dtype=torch.bool), 1), float("-inf"))
    expected = attn.c_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 32))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
    with math_attention():
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_inverse_layer_idx_scaling_matches_explicit_attention_per_layer():
    """With `scale_attn_by_inverse_layer_idx`, layer l's attention is softmax(QKᵀ/(√d·(l+1)))V, written out
    by hand here for each of 3 layers: wrong if the flag is ignored, uses 0-based l without the +1, or
    reaches only one layer. The flag off gives plain 1/√d, so the hand-written form is no tautology."""
    model = tiny(n_layer=3, scale_attn_by_inverse_layer_idx=True).eval()
    with torch.no_grad():  # scores of order 1, so that their scale visibly changes the softmax
        for block in model.transformer.h:
            block.attn.c_attn.weight.normal_(0.0, 0.3)
    plain = tiny(n_layer=3).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 16, 32)
    mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)
    layers = zip(model.transformer.h, plain.transformer.h, strict=True)
    for layer_idx, (block, plain_block) in enumerate(layers):
        attn = block.attn
        q, k, v = attn.c_attn(x).split(32, dim=2)
        q, k, v = (t.view(2, 16, 2, 16).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / (math.sqrt(16) * (layer_idx + 1))
        weights = scores.masked_fill(mask, float("-inf")).softmax(-1)
        expected = attn.c_proj((weights @ v).transpose(1, 2).reshape(2, 16, 32))
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
        with math_attention():
            torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
        if layer_idx > 0:
            assert not torch.allclose(plain_block.attn(x), expected, rtol=1e-3, atol=1e-4)
    # the whole model sees the scaling: logits differ from the plain model's with the same weights
    tokens = torch.randint(0, 64, (2, 16))
    assert not torch.allclose(model(tokens)[0], plain(tokens)[0])


def test_generate_greedy_and_top_k():
    model = tiny().eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    out = model.generate(prompt, 5, temperature=0)
    assert out.shape == (1, 8)
    # greedy = argmax of the model's own next-token logits
    logits, _ = model(out[:, :3])
    assert out[0, 3].item() == logits[0, -1].argmax().item()
    torch.manual_seed(0)
    sampled = model.generate(prompt, 20, temperature=1.0, top_k=1)
    assert torch.equal(sampled, model.generate(prompt, 20, temperature=0))


def test_block_size_enforced():
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_loss_is_computed_in_the_logits_precision_and_at_least_float32():
    """A float64 model's loss is float64, equal to log-sum-exp minus the target logit averaged in float64:
    wrong if the loss were rounded through float32 (a float64 comparison against a reference would then
    stop at 1e-7). Float32 logits give the float32 loss, and bfloat16 logits are upcast before it."""
    model = tiny(vocab_size=64).double()
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    logits, loss = model(x, y)
    expected = (torch.logsumexp(logits, dim=-1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)).mean()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected.item()) <= 1e-14 * expected.item()
    assert loss.item() != torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
    assert tiny(vocab_size=64)(x, y)[1].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits, bf16_loss = tiny(vocab_size=64)(x, y)
    assert bf16_logits.dtype == torch.bfloat16 and bf16_loss.dtype == torch.float32
    assert bf16_loss.item() == torch.nn.functional.cross_entropy(
        bf16_logits.float().flatten(0, 1), y.flatten()).item()
