"""SGD-SaI against a float64 NumPy transcription of arXiv 2412.11768, including the reference code's pitfalls:
resume must not recompute g-SNR, momentum 0, 1-element tensors, parameters without a gradient at step 1."""

import contextlib
import io

import numpy as np
import pytest
import torch

from optim import SGDSaI
from optim.sgd_sai import MOMENTUM_SGD_STEP
from tests.compiled import compiled_code_runs

# (256, 300) is above optim.fused.MIN_COMPILED_NUMEL, so the fused path really runs compiled code there.
SHAPES = [(3, 4), (1,), (6,), (2, 3), (256, 300)]
GROUPS = [dict(lr=0.01, weight_decay=0.1), dict(lr=0.002, weight_decay=0.0)]
EPS = 1e-8
STEPS = 30
LATE = 3  # parameter index 3 gets no gradient before this step


def make_params(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in SHAPES]


def gradients(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        # growing scale: g-SNR recomputed from a later gradient would differ from the frozen one
        grads = [(1 + step) * torch.randn(shape, generator=generator, dtype=dtype) + step for shape in SHAPES]
        if step < LATE:
            grads[3] = None
        yield grads


def reference(momentum):
    theta = [p.detach().numpy().copy() for p in make_params()]
    gsnr, buf = [None] * len(theta), [None] * len(theta)
    for grads in gradients():
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.numpy()
            group = GROUPS[0 if i < 2 else 1]
            if gsnr[i] is None:
                gsnr[i] = 1.0 if g.size == 1 else np.linalg.norm(g) / (np.std(g, ddof=1) + EPS)
                buf[i] = g
            else:
                buf[i] = momentum * buf[i] + (1 - momentum) * g
            theta[i] = theta[i] * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * gsnr[i] * buf[i]
    return theta


def make_optimizer(params, momentum, fused=True):
    return SGDSaI([dict(params=params[:2], **GROUPS[0]), dict(params=params[2:], **GROUPS[1])], lr=1.0,
                  momentum=momentum, eps=EPS, fused=fused)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_the_formula_across_a_checkpoint_resume(momentum, fused, tmp_path):
    # Wrong here: g-SNR recomputed after resume (the reference's lost "initialised" flag), wrong std, a
    # 1-element tensor's scale, a late parameter's g-SNR, or momentum=0 handling.
    params = make_params()
    optimizer = make_optimizer(params, momentum, fused)
    for step, grads in enumerate(gradients()):
        if step == STEPS // 2:  # save, then continue in a fresh optimizer as a resumed run would
            torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
            optimizer = make_optimizer(params, momentum, fused)
            optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
    for p, expected in zip(params, reference(momentum), strict=True):
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-11, atol=1e-13)
    assert optimizer.state[params[1]]["gsnr"] == 1.0  # the 1-element tensor
    assert ("momentum_buffer" in optimizer.state[params[0]]) == (momentum > 0)


def test_fused_path_is_bit_identical_to_the_reference_loop():
    runs = []
    for fused in (False, True):
        params = make_params(torch.float32)
        optimizer = make_optimizer(params, 0.9, fused)
        with compiled_code_runs(MOMENTUM_SGD_STEP) if fused else contextlib.nullcontext():
            for grads in gradients(torch.float32):
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                optimizer.step()
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_gsnr_survives_a_state_dict_round_trip_exactly():
    p = torch.randn(10, requires_grad=True)
    optimizer = SGDSaI([p], lr=0.1)
    p.grad = torch.randn(10)
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    fresh = SGDSaI([p], lr=0.1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.state[p]["gsnr"] == optimizer.state[p]["gsnr"]
