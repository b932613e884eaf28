"""AdaHessian against a float64 NumPy transcription (Yao et al. 2021, decoupled decay), with two param groups:
the reference implementation matched estimates to parameters wrongly as soon as there was more than one."""

import numpy as np
import pytest
import torch

from optim import AdaHessian
from optim.adahessian import ADAHESSIAN_UPDATE
from optim.fused import EMA_SQUARE
from tests.compiled import compiled_code_runs

# (256, 300) is above optim.fused.MIN_COMPILED_NUMEL, so the fused path really runs compiled code there.
SHAPES = [(3, 4), (1,), (5,), (2, 3, 2), (256, 300)]
GROUPS = [dict(lr=0.05, weight_decay=0.1, hessian_power=1.0),
          dict(lr=0.1, weight_decay=0.0, hessian_power=0.5)]
BETAS, EPS = (0.9, 0.999), 1e-4
STEPS, HESSIAN_EVERY = 30, 3


def make_params(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in SHAPES]


def stream(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield ([torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES],
               [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES])


def reference():
    beta1, beta2 = BETAS
    theta = [p.detach().numpy().copy() for p in make_params()]
    m = [np.zeros_like(t) for t in theta]
    v = [np.zeros_like(t) for t in theta]
    hessian_updates = 0
    for step, (grads, estimates) in enumerate(stream()):
        if step % HESSIAN_EVERY == 0:
            hessian_updates += 1
            for i, e in enumerate(estimates):
                v[i] = beta2 * v[i] + (1 - beta2) * np.abs(e.numpy()) ** 2
        for i, g in enumerate(grads):
            group = GROUPS[0 if i < 2 else 1]
            m[i] = beta1 * m[i] + (1 - beta1) * g.numpy()
            m_hat = m[i] / (1 - beta1 ** (step + 1))
            v_hat = v[i] / (1 - beta2 ** hessian_updates)
            denominator = v_hat ** (group["hessian_power"] / 2) + EPS
            decayed = theta[i] * (1 - group["lr"] * group["weight_decay"])
            theta[i] = decayed - group["lr"] * m_hat / denominator
    return theta


def run(fused, dtype=torch.float64):
    params = make_params(dtype)
    optimizer = AdaHessian([dict(params=params[:2], **GROUPS[0]), dict(params=params[2:], **GROUPS[1])],
                           betas=BETAS, eps=EPS, fused=fused)
    for step, (grads, estimates) in enumerate(stream(dtype)):
        if step % HESSIAN_EVERY == 0:
            optimizer.update_hessian(estimates)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
    return params


@pytest.mark.parametrize("fused", [False, True])
def test_matches_the_formula_with_two_groups_and_sparse_estimates(fused):
    # Wrong here: estimates assigned to the wrong parameters, shared bias-correction counters, the Hessian
    # power, or the per-group settings.
    for p, expected in zip(run(fused), reference(), strict=True):
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-11, atol=1e-13)


def test_fused_path_agrees_with_the_reference_loop():
    # Not bit for bit: v̂^(k/2) is a square root at k = 1, and ATen's eager CPU sqrt is not correctly rounded
    # (it differs from float64 sqrt rounded to float32 in the last bit), while the compiled one is. One ulp in
    # the denominator, a few ulps in θ after 30 steps: anything larger is a real difference.
    loop = run(False, torch.float32)
    with compiled_code_runs(ADAHESSIAN_UPDATE, EMA_SQUARE):
        fused = run(True, torch.float32)
    for a, b in zip(loop, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7)


def test_refuses_to_step_before_the_first_estimate():
    p = torch.ones(2, requires_grad=True)
    optimizer = AdaHessian([p])
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="before update_hessian"):
        optimizer.step()
    assert torch.equal(p.detach(), torch.ones(2))  # nothing moved
    assert AdaHessian.requires_initial_hessian and AdaHessian.curvature == "hutchinson"
