"""Adam-mini: the block partition on a real GPT (per head for q and k, per row elsewhere, per tensor for
vectors) and the update against a float64 NumPy transcription with one second moment per block."""

import contextlib
import itertools

import numpy as np
import pytest
import torch

from gpt.model import GPT, GPTConfig
from optim import AdamMini
from optim.adam_mini import ADAM_MINI_STEP, second_moment_blocks
from tests.compiled import compiled_code_runs

N_EMBD, N_HEAD, VOCAB, BLOCK = 16, 4, 32, 8


def expected_blocks(name, shape):
    """The partition the paper prescribes for this GPT, written out per parameter name."""
    if name.endswith("c_attn.weight"):
        return 2 * N_HEAD + N_EMBD  # q heads, k heads, v rows
    if name.endswith("wte.weight"):
        return VOCAB  # one per token
    if name.endswith("wpe.weight"):
        return BLOCK  # one per position
    if len(shape) == 2:
        return shape[0]  # one per output neuron
    return 1  # LayerNorm weights and biases: the whole tensor


@pytest.mark.parametrize("bias", [False, True])
def test_partition_on_a_real_gpt(bias):
    # Wrong here: Adam-mini's memory saving or its per-head Q/K treatment silently changes.
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=N_HEAD, n_embd=N_EMBD, block_size=BLOCK, vocab_size=VOCAB,
                          bias=bias))
    optimizer = AdamMini(model.named_parameters(), n_head=N_HEAD)
    x = torch.randint(0, VOCAB, (2, BLOCK))
    model(x, x)[1].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    beta2 = optimizer.param_groups[0]["betas"][1]
    for name, p in model.named_parameters():
        v = optimizer.state[p]["exp_avg_sq"]
        assert v.shape == (expected_blocks(name, p.shape),), name
        if name.endswith("c_attn.weight"):
            head_dim = N_EMBD // N_HEAD
            g = grads[name]
            q_heads = [g[h * head_dim:(h + 1) * head_dim].square().mean() for h in range(N_HEAD)]
            k_heads = [g[N_EMBD + h * head_dim:N_EMBD + (h + 1) * head_dim].square().mean()
                       for h in range(N_HEAD)]
            v_rows = list(g[2 * N_EMBD:].square().mean(dim=1))
            torch.testing.assert_close(v, (1 - beta2) * torch.stack(q_heads + k_heads + v_rows))
    assert sum(state["exp_avg_sq"].numel() for state in optimizer.state.values()) < 0.05 * sum(
        p.numel() for p in model.parameters())


def test_partition_rejects_a_fused_attention_that_does_not_split_into_heads():
    with pytest.raises(ValueError, match="n_head=5"):
        second_moment_blocks("h.0.attn.c_attn.weight", (48, 16), n_head=5)


def test_needs_parameter_names():
    with pytest.raises(ValueError, match="named_parameters"):
        AdamMini([torch.zeros(3, requires_grad=True)], n_head=1)


def test_update_matches_the_formula_with_two_groups():
    # Wrong here: bias corrections, the block means, the broadcast of a block's scalar to its rows, or groups.
    betas, eps, steps = (0.9, 0.95), 1e-8, 25
    generator = torch.Generator().manual_seed(0)
    shapes = {"h.0.attn.c_attn.weight": (12, 4), "h.0.mlp.c_fc.weight": (5, 4), "ln.weight": (4,),
              "scalar": (1,)}
    params = {n: torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_()
              for n, s in shapes.items()}
    names = list(shapes)
    groups = [dict(lr=0.01, weight_decay=0.1), dict(lr=0.02, weight_decay=0.0)]
    optimizer = AdamMini([dict(params=[(n, params[n]) for n in names[:2]], **groups[0]),
                          dict(params=[(n, params[n]) for n in names[2:]], **groups[1])],
                         betas=betas, eps=eps, n_head=2)
    theta = {n: p.detach().numpy().copy() for n, p in params.items()}
    m = {n: np.zeros(shapes[n]) for n in names}
    v = {n: None for n in names}
    row_blocks = {"h.0.attn.c_attn.weight": [2, 2, 2, 2, 1, 1, 1, 1], "h.0.mlp.c_fc.weight": [1] * 5}
    for step in range(1, steps + 1):
        grads = {n: torch.randn(shapes[n], generator=generator, dtype=torch.float64) for n in names}
        for n in names:
            params[n].grad = grads[n]
        optimizer.step()
        for i, n in enumerate(names):
            g, group = grads[n].numpy(), groups[0 if i < 2 else 1]
            if n in row_blocks:  # consecutive row blocks of the given heights
                edges = np.cumsum([0, *row_blocks[n]])
                block_means = np.array([np.mean(g[a:b] ** 2) for a, b in itertools.pairwise(edges)])
                per_row = np.repeat(block_means, row_blocks[n])[:, None]
            else:
                block_means = np.array([np.mean(g ** 2)])
                per_row = block_means
            v[n] = (1 - betas[1]) * per_row if v[n] is None else betas[1] * v[n] + (1 - betas[1]) * per_row
            m[n] = betas[0] * m[n] + (1 - betas[0]) * g
            m_hat, v_hat = m[n] / (1 - betas[0] ** step), v[n] / (1 - betas[1] ** step)
            theta[n] = theta[n] * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * m_hat / (
                np.sqrt(v_hat) + eps)
    for n in names:
        np.testing.assert_allclose(params[n].detach().numpy(), theta[n], rtol=1e-11, atol=1e-13)


def test_compiled_step_equals_the_reference_loop():
    # The default step (one compiled call per block kind: block sums of g², denominators, m and θ) against
    # the eager reference loop (`fused=False`), over 30 steps on tensors above optim.fused.MIN_COMPILED_NUMEL
    # (so compiled code really runs, which the kernel's count of compiled calls checks) and small ones (eager
    # in both). Wrong here: the compiled kernel pairs a denominator with the wrong block, or drifts from the
    # reference. The block sums may be added in another order (a last-bit difference in v), so θ is held to
    # 4 float32 ulps after 30 steps.
    generator = torch.Generator().manual_seed(0)
    shapes = {"h.0.attn.c_attn.weight": (384, 200), "wte.weight": (300, 256), "h.0.mlp.c_fc.weight": (5, 4),
              "ln_f.weight": (200,)}
    start = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    runs = {}
    for fused in (True, False):
        params = {n: t.clone().requires_grad_() for n, t in start.items()}
        optimizer = AdamMini(list(params.items()), lr=1e-2, n_head=4, fused=fused)
        gradients = torch.Generator().manual_seed(1)
        with compiled_code_runs(ADAM_MINI_STEP) if fused else contextlib.nullcontext():
            for _ in range(30):
                for p in params.values():
                    p.grad = torch.randn(p.shape, generator=gradients)
                optimizer.step()
        runs[fused] = params
    for name in shapes:
        fused, reference = runs[True][name].detach(), runs[False][name].detach()
        assert (fused - start[name]).abs().max() > 0.1  # the parameters moved
        ulp = torch.finfo(torch.float32).eps * reference.abs().clamp(min=1.0)
        assert ((fused - reference).abs() <= 4 * ulp).all(), name
