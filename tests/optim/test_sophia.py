"""Sophia-G and Sophia-H against a float64 NumPy transcription of the update (docs/optimizers.md), Sophia-G
against a transcription of the official class, bit for bit in float32 and float64 (docs/fidelity.md), the
fused path against the eager reference loop, and the diagnostics against hand computations."""

import contextlib

import numpy as np
import pytest
import torch

from optim import SophiaG, SophiaH
from optim.sophia import SOPHIA_G_HESSIAN_EMA, SOPHIA_G_STEP, SOPHIA_H_HESSIAN_EMA, SOPHIA_H_STEP
from tests.compiled import compiled_code_runs

SHAPES = [(3, 4), (1,), (5,), (2, 3, 2), (256, 300)]  # groups: the first two, then the rest
# (256, 300) is above optim.fused.MIN_COMPILED_NUMEL, so the fused path really runs compiled code there.
GROUPS = [dict(lr=0.02, weight_decay=0.1), dict(lr=0.05, weight_decay=0.0)]
STEPS = 30
HESSIAN_EVERY = 4


def make_params(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for shape in SHAPES]


def grouped(params):
    return [dict(params=params[:2], **GROUPS[0]), dict(params=params[2:], **GROUPS[1])]


def gradient_stream(seed=1, dtype=torch.float64):
    """Per step: training gradients and curvature inputs (GNB gradients or Hutchinson estimates)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        grads = [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]
        curvature = [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]
        yield grads, curvature


def lr_scale(step):
    return 1.0 - step / (2 * STEPS)  # a schedule: lr changes every step


def sophia_reference(variant, rho, bs_at, eps, betas=(0.965, 0.99)):
    """Independent float64 NumPy Sophia; `bs_at(step)` is the bs in force at that step (G only)."""
    beta1, beta2 = betas
    theta = [p.detach().numpy().copy() for p in make_params()]
    m = [np.zeros_like(t) for t in theta]
    h = [np.zeros_like(t) for t in theta]
    for step, (grads, curvature) in enumerate(gradient_stream()):
        if step % HESSIAN_EVERY == 0 and step > 0:
            for i, c in enumerate(curvature):
                c = c.numpy()
                h[i] = beta2 * h[i] + (1 - beta2) * (c * c if variant == "G" else c)
        for i, g in enumerate(grads):
            group = GROUPS[0 if i < 2 else 1]
            lr = group["lr"] * lr_scale(step)
            theta[i] = theta[i] * (1 - lr * group["weight_decay"])
            m[i] = beta1 * m[i] + (1 - beta1) * g.numpy()
            if variant == "G":
                denominator = rho * bs_at(step) * h[i] + eps
            else:
                denominator = np.maximum(rho * h[i], eps)
            theta[i] = theta[i] - lr * np.sign(m[i]) * np.minimum(np.abs(m[i]) / denominator, 1.0)
    return theta


def run(optimizer, params, variant, step_bs=None):
    for step, (grads, curvature) in enumerate(gradient_stream(dtype=params[0].dtype)):
        if step % HESSIAN_EVERY == 0 and step > 0:
            if variant == "G":
                for p, c in zip(params, curvature, strict=True):
                    p.grad = c
                optimizer.update_hessian()
            else:
                optimizer.update_hessian(curvature)
        for group, base in zip(optimizer.param_groups, GROUPS, strict=True):
            group["lr"] = base["lr"] * lr_scale(step)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if step_bs is not None and step_bs(step) is not None:
            optimizer.step(bs=step_bs(step))
        else:
            optimizer.step()
    return params


@pytest.mark.parametrize("fused", [False, True])
def test_sophia_g_matches_the_formula_with_hessian_updates_and_step_bs(fused):
    # Wrong here: the update rule, the bs scaling, the step(bs=...) override or per-group hyper-parameters.
    bs, override = 40, 7

    def step_bs(step):
        return override if step % 5 == 3 else None

    params = make_params()
    optimizer = SophiaG(grouped(params), rho=0.05, bs=bs, fused=fused)
    run(optimizer, params, "G", step_bs)
    expected = sophia_reference("G", 0.05, lambda s: step_bs(s) or bs, 1e-15)
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fused", [False, True])
def test_sophia_h_matches_the_formula_including_negative_curvature(fused):
    # Half the Hutchinson inputs are negative: wrong here means the clamp max(ρh, ε) or the EMA is off.
    params = make_params()
    optimizer = SophiaH(grouped(params), rho=0.5, fused=fused)
    run(optimizer, params, "H")
    expected = sophia_reference("H", 0.5, None, 1e-12)
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-14)


def test_without_curvature_the_step_is_a_sign_step():
    # The official behaviour while h = 0: θ ← θ(1 − lr·wd) − lr·sign(m), m = (1−β1)·g after one step.
    p = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    optimizer = SophiaG([p], lr=0.1, weight_decay=0.2, bs=100)
    p.grad = torch.tensor([1e-6, -3.0, 0.0])
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.5 * 0.98 - 0.1, -0.98 + 0.1, 2.0 * 0.98]))


@pytest.mark.parametrize("variant", ["G", "H"])
def test_fused_path_is_bit_identical_to_the_reference_loop(variant):
    # float32, where rounding differences would show: the compiled kernel must round exactly like eager.
    torch._dynamo.reset()
    results = []
    for fused in (False, True):
        params = make_params(torch.float32)
        if variant == "G":
            optimizer = SophiaG(grouped(params), rho=0.05, bs=40, fused=fused)
            kernels = (SOPHIA_G_STEP, SOPHIA_G_HESSIAN_EMA)
        else:
            optimizer = SophiaH(grouped(params), rho=0.5, fused=fused)
            kernels = (SOPHIA_H_STEP, SOPHIA_H_HESSIAN_EMA)
        with compiled_code_runs(*kernels) if fused else contextlib.nullcontext():
            run(optimizer, params, variant)
        results.append((params, optimizer.state_dict()["state"]))
    (loop_params, loop_state), (fused_params, fused_state) = results
    for a, b in zip(loop_params, fused_params, strict=True):
        assert torch.equal(a, b)
    for i in loop_state:
        for key in ("exp_avg", "hessian"):
            assert torch.equal(loop_state[i][key], fused_state[i][key])


def test_win_rate_and_hessian_norm_by_hand():
    # Wrong here: the trainer logs a misleading health signal (the official code's win: |m| < ρ·bs·h).
    a = torch.zeros(4, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    optimizer = SophiaG([dict(params=[a]), dict(params=[b], rho=0.5)], rho=0.25, bs=4, weight_decay=0.0)
    assert optimizer.win_rate() == 0.0 and optimizer.hessian_norm() == 0.0
    a.grad, b.grad = torch.ones(4), torch.ones(2)
    optimizer.step()
    optimizer.state[a]["exp_avg"] = torch.tensor([1.0, -1.0, 0.5, 2.0])
    optimizer.state[a]["hessian"] = torch.tensor([0.5, 2.0, 0.0, 3.0])  # ρ·bs·h = [0.5, 2, 0, 3]
    optimizer.state[b]["exp_avg"] = torch.tensor([1.0, 1.0])
    optimizer.state[b]["hessian"] = torch.tensor([0.25, 1.0])  # ρ·bs·h = [0.5, 2]
    # wins: a → [no, yes, no, yes], b → [no, yes]
    assert optimizer.win_rate() == pytest.approx(3 / 6)
    assert optimizer.hessian_norm() == pytest.approx((0.25 + 4 + 9 + 0.0625 + 1) ** 0.5)


def test_sophia_h_win_rate_treats_negative_curvature_as_clipped():
    p = torch.zeros(3, requires_grad=True)
    optimizer = SophiaH([p], rho=1.0)
    optimizer.update_hessian([torch.tensor([-5.0, 5.0, 0.0])])
    p.grad = torch.ones(3)
    optimizer.step()
    # m = 0.035, h = 0.01·[-5, 5, 0] → denominators [ε, 0.05, ε]: only the middle coordinate wins
    assert optimizer.win_rate() == pytest.approx(1 / 3)


def test_update_hessian_rejects_misaligned_estimates():
    params = make_params()
    optimizer = SophiaH(grouped(params))
    message = f"{len(SHAPES) - 1} curvature estimates for {len(SHAPES)} parameters"
    with pytest.raises(ValueError, match=message):
        optimizer.update_hessian([torch.zeros_like(p) for p in params[:-1]])


def test_bs_lives_in_the_param_groups_and_is_validated():
    p = torch.zeros(2, requires_grad=True)
    assert SophiaG([p], bs=491_520).param_groups[0]["bs"] == 491_520
    with pytest.raises(ValueError, match="bs must be > 0"):
        SophiaG([p], bs=0)


# The official class (Liuhong99/Sophia, sophia.py: SophiaG.update_hessian and _single_tensor_sophiag), as
# its formulas read, transcribed into a plain per-tensor loop. GPT-2-like scales: weights ~0.02, gradients
# ~1e-3 and GNB gradients ~4e-4 spread over two decades, so that ρ·bs·h clips some coordinates and not others.
OFFICIAL_SHAPES = [(64, 48), (48,), (1100, 64), (5, 3, 4)]  # groups: decayed (the matrices), not decayed
OFFICIAL_STEPS, OFFICIAL_INTERVAL, OFFICIAL_BS = 30, 7, 480 * 1024  # curvature before steps 7, 14, 21, 28
OFFICIAL_GROUPS = [dict(lr=6e-4, weight_decay=0.2), dict(lr=3e-4, weight_decay=0.0)]


def official_inputs(dtype):
    generator = torch.Generator().manual_seed(7)

    def spread(shape, scale):
        decades = torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1  # 10^[-1, 1]
        return torch.randn(shape, generator=generator, dtype=dtype) * scale * 10 ** decades

    params = [torch.randn(s, generator=generator, dtype=dtype) * 0.02 for s in OFFICIAL_SHAPES]
    steps = [([spread(s, 1e-3) for s in OFFICIAL_SHAPES], [spread(s, 4e-4) for s in OFFICIAL_SHAPES])
             for _ in range(OFFICIAL_STEPS)]
    return params, steps


def official_schedule(step):
    """(lr factor, bs passed to step) per step: a changing lr, and another bs every fifth step."""
    return 1.0 - step / (2 * OFFICIAL_STEPS), (OFFICIAL_BS // 2 if step % 5 == 3 else OFFICIAL_BS)


def official_sophia_g(dtype, betas=(0.965, 0.99), rho=0.05, fused_multiply_add=True):
    """The official update; `fused_multiply_add=False` rounds each product first, as this project once did."""
    beta1, beta2 = betas
    params, steps = official_inputs(dtype)
    exp_avgs = [torch.zeros_like(p) for p in params]
    hessians = [torch.zeros_like(p) for p in params]
    for step, (grads, gnb_grads) in enumerate(steps):
        if step % OFFICIAL_INTERVAL == 0 and step > 0:  # update_hessian() with ĝ in .grad
            for h, g in zip(hessians, gnb_grads, strict=True):
                if fused_multiply_add:
                    h.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                else:
                    h.mul_(beta2).add_(g * g * (1 - beta2))
        factor, bs = official_schedule(step)
        for param, grad, exp_avg, hess in zip(params, grads, exp_avgs, hessians, strict=True):
            group = OFFICIAL_GROUPS[0 if param.dim() > 1 else 1]
            lr = group["lr"] * factor
            param.mul_(1 - lr * group["weight_decay"])
            if fused_multiply_add:
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            else:
                exp_avg.mul_(beta1).add_(grad * (1 - beta1))
            ratio = (exp_avg.abs() / (rho * bs * hess + 1e-15)).clamp(None, 1)
            if fused_multiply_add:
                param.addcmul_(exp_avg.sign(), ratio, value=-lr)
            else:
                param.sub_(lr * exp_avg.sign() * ratio)
    return params, exp_avgs, hessians


def project_sophia_g(dtype, fused):
    params, steps = official_inputs(dtype)
    params = [p.requires_grad_() for p in params]
    groups = [dict(params=[p for p in params if (p.dim() > 1) == decayed], **group)
              for decayed, group in zip((True, False), OFFICIAL_GROUPS, strict=True)]
    optimizer = SophiaG(groups, rho=0.05, bs=OFFICIAL_BS, fused=fused)
    for step, (grads, gnb_grads) in enumerate(steps):
        if step % OFFICIAL_INTERVAL == 0 and step > 0:
            for p, g in zip(params, gnb_grads, strict=True):
                p.grad = g
            optimizer.update_hessian()
        factor, bs = official_schedule(step)
        for group, base in zip(optimizer.param_groups, OFFICIAL_GROUPS, strict=True):
            group["lr"] = base["lr"] * factor
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step(bs=bs)
    return ([p.detach() for p in params], [optimizer.state[p]["exp_avg"] for p in params],
            [optimizer.state[p]["hessian"] for p in params], optimizer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", [False, True])
def test_sophia_g_equals_the_official_class_bit_for_bit(dtype, fused):
    # 30 steps, 4 curvature updates, two param groups, a schedule and step(bs=...): θ, m and h equal to the
    # last bit. Wrong here: a multiply-add rounds twice (the fused path's compiled code included), an
    # operation is reordered, or a scalar is rounded differently from the official class.
    expected = official_sophia_g(dtype)
    with compiled_code_runs(SOPHIA_G_STEP, SOPHIA_G_HESSIAN_EMA) if fused else contextlib.nullcontext():
        *actual, optimizer = project_sophia_g(dtype, fused)
    for name, got, want in zip(("θ", "m", "h"), actual, expected, strict=True):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(a, b), f"{name} of tensor {i}: {(a != b).sum().item()} of {a.numel()} differ"
    assert 0.05 < optimizer.win_rate() < 0.95, "the inputs must leave some coordinates clipped, some not"


def test_the_official_transcription_tells_one_rounding_from_two():
    # The test above can catch the rounding it guards against: with the products rounded first (this
    # project's kernels before), thousands of float32 coordinates end up elsewhere.
    single = official_sophia_g(torch.float32)
    double = official_sophia_g(torch.float32, fused_multiply_add=False)
    for a, b in zip(single, double, strict=True):
        assert sum(int((x != y).sum()) for x, y in zip(a, b, strict=True)) > 100
