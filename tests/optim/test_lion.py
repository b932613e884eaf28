"""Lion against a float64 NumPy transcription of its update, and the fused path against the reference loop."""

import numpy as np
import pytest
import torch

from optim import Lion
from optim.lion import LION_UPDATE
from tests.compiled import compiled_code_runs

# (256, 300) is above optim.fused.MIN_COMPILED_NUMEL, so the fused path really runs compiled code there.
SHAPES = [(3, 4), (1,), (5,), (2, 3, 2), (256, 300)]
GROUPS = [dict(lr=0.01, weight_decay=0.5), dict(lr=0.03, weight_decay=0.0)]
BETAS = (0.9, 0.99)
STEPS = 40


def make_params(dtype):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in SHAPES]


def gradients(dtype):
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES] for _ in range(STEPS)]


def run(fused, dtype):
    params = make_params(dtype)
    groups = [dict(params=params[:2], **GROUPS[0]), dict(params=params[2:], **GROUPS[1])]
    optimizer = Lion(groups, betas=BETAS, fused=fused)
    for grads in gradients(dtype):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("fused", [False, True])
def test_lion_matches_the_formula(fused):
    # Wrong here: interpolation vs momentum betas swapped, decay not decoupled, or group settings ignored.
    beta1, beta2 = BETAS
    theta = [p.detach().numpy().copy() for p in make_params(torch.float64)]
    m = [np.zeros_like(t) for t in theta]
    for grads in gradients(torch.float64):
        for i, g in enumerate(grads):
            group = GROUPS[0 if i < 2 else 1]
            g = g.numpy()
            c = beta1 * m[i] + (1 - beta1) * g
            theta[i] = theta[i] * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * np.sign(c)
            m[i] = beta2 * m[i] + (1 - beta2) * g
    params, _ = run(fused, torch.float64)
    for p, expected in zip(params, theta, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12, atol=1e-14)


def test_fused_path_is_bit_identical_to_the_reference_loop():
    loop_params, loop = run(False, torch.float32)
    with compiled_code_runs(LION_UPDATE):
        fused_params, fused = run(True, torch.float32)
    for a, b in zip(loop_params, fused_params, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(loop.state[a]["exp_avg"], fused.state[b]["exp_avg"])
