"""The curvature estimators are unbiased for the right matrix, checked statistically against exact answers
on models small enough to differentiate completely (float64, fixed seeds).

Tolerances are in standard errors of the Monte-Carlo mean: every coordinate within 5 SE (a false alarm has
probability < 1e-4 over all coordinates), and a coordinate whose SE is zero must agree exactly. Each
statistical test also shows its power: a plausible wrong answer fails the same criterion.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from gpt.model import math_attention
from optim import build_optimizer, curvature
from optim.curvature import (
    PROBES,
    gaussian_like,
    gnb_loss,
    hessian_vector_products,
    rademacher_like,
    sample_from_logits,
)
from tests.compiled import compiled_code_runs
from tests.tiny_model import tiny_gpt

Z = 5.0


def z_max(mean, target, se):
    """Largest |mean − target| / SE over coordinates; coordinates with zero SE must match exactly."""
    exact = se == 0
    assert torch.allclose(mean[exact], target[exact], rtol=0, atol=1e-12)
    return ((mean - target).abs()[~exact] / se[~exact]).max().item()


def sample_z_max(samples, target):
    return z_max(samples.mean(0), target, samples.std(0) / samples.shape[0] ** 0.5)


def mlp_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    return model, torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))


def gpt_classifier():
    model = tiny_gpt(n_layer=1, vocab_size=7).double()
    return model, torch.randint(0, 7, (2, 4)), torch.randint(0, 7, (2, 4))


def logits_of(output):
    """(N, V) logits from an MLP's output or GPT's (logits, loss) pair."""
    logits = output[0] if isinstance(output, tuple) else output
    return logits.reshape(-1, logits.shape[-1])


def flat(model):
    """(θ as one vector, f(θ, *inputs) calling the model with θ) for torch.autograd.functional."""
    names, params = zip(*model.named_parameters(), strict=True)
    sizes = [p.numel() for p in params]

    def call(theta, *inputs):
        pieces = [t.view(p.shape) for t, p in zip(theta.split(sizes), params, strict=True)]
        return functional_call(model, dict(zip(names, pieces, strict=True)), inputs)

    return torch.cat([p.detach().reshape(-1) for p in params]), call


def logit_jacobian(model, x):
    """Logits (N, V) and their Jacobian (N, V, P) w.r.t. all parameters, one row per prediction."""
    theta, call = flat(model)
    logits = logits_of(call(theta, x))
    jacobian = torch.autograd.functional.jacobian(lambda t: logits_of(call(t, x)), theta)
    return logits.detach(), jacobian


def gauss_newton_diagonal(logits, jacobian):
    """diag of (1/N) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i: the Gauss-Newton matrix of the mean loss."""
    p = torch.softmax(logits, dim=-1)
    softmax_hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nap,nab,nbp->p", jacobian, softmax_hessian, jacobian) / logits.shape[0]


def gnb_samples(logits, jacobian, count, seed):
    """`count` GNB estimates N·ĝ⊙ĝ with ĝ = Jᵀ ∂gnb_loss/∂logits (the chain rule the backward applies).

    One gnb_loss call on `count` stacked copies of the logits draws independent labels for every copy; its
    mean over count·N predictions makes each copy's gradient 1/count of that copy's own estimate.
    """
    copies = logits.expand(count, *logits.shape).clone().requires_grad_()
    (grad,) = torch.autograd.grad(gnb_loss(copies, torch.Generator().manual_seed(seed)), copies)
    g_hat = torch.einsum("knv,nvp->kp", grad * count, jacobian)
    return logits.shape[0] * g_hat ** 2


def test_gnb_gradient_through_the_model_is_the_chain_rule_of_gnb_loss():
    # The trainer backpropagates gnb_loss through the model; the statistical tests use Jᵀ·∂loss/∂logits.
    model, x, _ = gpt_classifier()
    logits, jacobian = logit_jacobian(model, x)
    loss = gnb_loss(model(x)[0], torch.Generator().manual_seed(7))  # the trainer's call: 3-D logits
    through_model = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    leaf = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(gnb_loss(leaf, torch.Generator().manual_seed(7)), leaf)
    chain_rule = jacobian.flatten(0, 1).T @ grad.reshape(-1)
    torch.testing.assert_close(through_model, chain_rule, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("make", [mlp_classifier, gpt_classifier], ids=["mlp", "gpt"])
def test_gnb_is_unbiased_for_the_gauss_newton_diagonal(make):
    model, x, y = make()
    logits, jacobian = logit_jacobian(model, x)
    exact = gauss_newton_diagonal(logits, jacobian)
    samples = gnb_samples(logits, jacobian, 20_000, seed=1)
    assert sample_z_max(samples, exact) < Z
    assert (samples.mean(0) - exact).norm() / exact.norm() < 0.03
    assert sample_z_max(samples, 1.1 * exact) > Z  # power: a 10% scale error is caught
    # Power against the third-party bug: squaring the gradient against the *training* labels gives the
    # empirical Fisher (Adam's v), which the same criterion rejects by a wide margin.
    targets = nn.functional.one_hot(y.reshape(-1), logits.shape[-1]).double()
    logit_grad = (torch.softmax(logits, -1) - targets) / logits.shape[0]
    training_grad = torch.einsum("nv,nvp->p", logit_grad, jacobian)
    assert sample_z_max(samples, logits.shape[0] * training_grad ** 2) > 10 * Z


def test_halving_the_hessian_batch_leaves_bs_times_gnb_unchanged():
    """bs·ĝ⊙ĝ estimates the Gauss-Newton diagonal whatever `optim.hessian_batch_size` is, because the
    registry's bs counts the curvature pass's predictions. A pass over 4 sequences and one over 2 (the same
    2 twice in the 4, so that both have the same average Gauss-Newton diagonal) agree within 5 SE of the
    difference of their means, and each equals the exact diagonal. With bs fixed at the training batch's
    tokens (the former rule), the half batch's estimate is twice the full one's, and the test rejects it."""
    model, half, _ = gpt_classifier()
    full = torch.cat([half, half])
    exact = gauss_newton_diagonal(*logit_jacobian(model, half))
    estimates: dict[str, dict[int, torch.Tensor]] = {"registry": {}, "fixed": {}}
    for sequences, x in ((4, full), (2, half)):
        cfg = {"name": "sophia_g", "hessian_interval": 10, "hessian_batch_size": sequences}
        bs = build_optimizer(cfg, model, tokens_per_step=8 * 4).param_groups[0]["bs"]
        assert bs == sequences * 4  # sequences × block_size
        logits, jacobian = logit_jacobian(model, x)
        squares = gnb_samples(logits, jacobian, 20_000, seed=sequences) / logits.shape[0]  # ĝ⊙ĝ
        estimates["registry"][sequences] = bs * squares
        estimates["fixed"][sequences] = 8 * 4 * squares  # bs = the training batch's 8 × 4 tokens
        assert sample_z_max(bs * squares, exact) < Z

    def z_of_difference(samples):
        se = (samples[2].var(0) / len(samples[2]) + samples[4].var(0) / len(samples[4])).sqrt()
        return z_max(samples[2].mean(0) - samples[4].mean(0), torch.zeros_like(se), se)

    assert z_of_difference(estimates["registry"]) < Z
    assert z_of_difference(estimates["fixed"]) > Z


def test_hessian_vector_products_are_exact_on_an_mlp():
    model, x, y = mlp_classifier()
    theta, call = flat(model)
    hessian = torch.autograd.functional.hessian(lambda t: nn.functional.cross_entropy(call(t, x), y), theta)
    params = list(model.parameters())
    for seed in range(3):
        vectors = rademacher_like(params, torch.Generator().manual_seed(seed))
        products = hessian_vector_products(nn.functional.cross_entropy(model(x), y), params, vectors)
        flat_v = torch.cat([v.reshape(-1) for v in vectors])
        torch.testing.assert_close(torch.cat([p.reshape(-1) for p in products]), hessian @ flat_v,
                                   rtol=1e-10, atol=1e-12)


def test_hessian_vector_products_through_gpt_math_attention_match_finite_differences():
    # Independent of double backward: central differences of the gradient in float64 (the loss is taken
    # from the float64 logits: the model's own loss is computed in float32).
    model, x, y = gpt_classifier()
    theta, call = flat(model)
    params = list(model.parameters())
    vectors = rademacher_like(params, torch.Generator().manual_seed(0))
    flat_v = torch.cat([v.reshape(-1) for v in vectors])

    def loss_of(output):
        return nn.functional.cross_entropy(logits_of(output), y.reshape(-1))

    def gradient(t):
        t = t.clone().requires_grad_()
        return torch.autograd.grad(loss_of(call(t, x)), t)[0]

    eps = 1e-6  # truncation error ~ε²·|third derivative| ≈ 1e-7 here, rounding ~1e-16/ε ≈ 1e-10
    expected = (gradient(theta + eps * flat_v) - gradient(theta - eps * flat_v)) / (2 * eps)
    with math_attention():
        products = hessian_vector_products(loss_of(model(x)), params, vectors)
    error = (torch.cat([p.reshape(-1) for p in products]) - expected).abs().max()
    assert error < 1e-6 * expected.abs().max()


def test_hutchinson_is_unbiased_for_the_hessian_diagonal():
    # Real double-backward products with rademacher_like probes, against the exact diagonal. The SE is
    # exact: Var(u_j (Hu)_j) = Σ_{k≠j} H_jk² for Rademacher u.
    model, x, y = mlp_classifier()
    theta, call = flat(model)
    hessian = torch.autograd.functional.hessian(lambda t: nn.functional.cross_entropy(call(t, x), y), theta)
    diagonal = hessian.diagonal()
    params, generator, count = list(model.parameters()), torch.Generator().manual_seed(3), 500
    total = torch.zeros_like(diagonal)
    for _ in range(count):
        probes = rademacher_like(params, generator)
        products = hessian_vector_products(nn.functional.cross_entropy(model(x), y), params, probes)
        total += torch.cat([(u * hu).reshape(-1) for u, hu in zip(probes, products, strict=True)])
    se = ((hessian ** 2).sum(1) - diagonal ** 2).sqrt() / count ** 0.5
    assert z_max(total / count, diagonal, se) < Z
    # Power: the Gauss-Newton diagonal (what dropping the network's second-order term would estimate) is a
    # different target here, and the same criterion rejects it.
    logits, jacobian = logit_jacobian(model, x)
    assert z_max(total / count, gauss_newton_diagonal(logits, jacobian), se) > Z


def mlp_hessian():
    """The MLP classifier's parameters, its loss and the exact Hessian of that loss (float64)."""
    model, x, y = mlp_classifier()
    theta, call = flat(model)
    hessian = torch.autograd.functional.hessian(lambda t: nn.functional.cross_entropy(call(t, x), y), theta)
    return list(model.parameters()), lambda: nn.functional.cross_entropy(model(x), y), hessian


# Per-coordinate variance of u_i (Hu)_i: E[u_i² u_j u_k] is 1 for j = k ≠ i, and E[u_i⁴] is 3 for a Gaussian,
# 1 for a Rademacher u.
PROBE_VARIANCE = {
    "gaussian": lambda h: (h ** 2).sum(1) + h.diagonal() ** 2,
    "rademacher": lambda h: (h ** 2).sum(1) - h.diagonal() ** 2,
}


def test_gaussian_hutchinson_is_unbiased_for_the_hessian_diagonal():
    """The paper's estimator: real double-backward products with gaussian_like probes average to the exact
    Hessian diagonal within 5 SE, the SE from theory (Σ_j H_ij² + H_ii²)/count. Wrong if the probe were not
    unit-variance (a scaled diagonal) or not centred."""
    params, loss, hessian = mlp_hessian()
    diagonal, generator, count = hessian.diagonal(), torch.Generator().manual_seed(4), 500
    total = torch.zeros_like(diagonal)
    for _ in range(count):
        probes = gaussian_like(params, generator)
        products = hessian_vector_products(loss(), params, probes)
        total += torch.cat([(u * hu).reshape(-1) for u, hu in zip(probes, products, strict=True)])
    se = (PROBE_VARIANCE["gaussian"](hessian) / count).sqrt()
    assert z_max(total / count, diagonal, se) < Z
    assert z_max(total / count, 2 * diagonal, se) > Z  # power: a probe of variance 2 is caught


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_probe_variance_matches_theory(probe):
    """200,000 probes from PROBES[probe] against the exact Hessian: the per-coordinate sample mean of
    u⊙Hu is diag(H) and its sample variance is Σ_j H_ij² + H_ii² (Gaussian) or Σ_{j≠i} H_ij² (Rademacher),
    each within 5 SE (the SE of a sample variance from the sample's fourth central moment). The other
    probe's variance formula is rejected, so the test tells the two distributions apart."""
    _, _, hessian = mlp_hessian()
    count = 200_000
    probes = PROBES[probe]([torch.zeros(count, hessian.shape[0], dtype=torch.float64)],
                           torch.Generator().manual_seed(5))[0]
    samples = probes * (probes @ hessian)  # row n: u_n ⊙ H u_n (H is symmetric)
    assert sample_z_max(samples, hessian.diagonal()) < Z
    centred = samples - samples.mean(0)
    variance = centred.pow(2).mean(0)
    se = ((centred.pow(4).mean(0) - variance ** 2) / count).clamp(min=0).sqrt()
    assert z_max(variance, PROBE_VARIANCE[probe](hessian), se) < Z
    other = "rademacher" if probe == "gaussian" else "gaussian"
    assert z_max(variance, PROBE_VARIANCE[other](hessian), se) > Z


def test_gaussian_probes_are_standard_normal_and_shaped_like_the_parameters():
    """Wrong if the probe is not N(0, 1) per entry (a biased Hutchinson estimate) or mis-shaped."""
    params = [torch.zeros(300, 400, dtype=torch.float64), torch.zeros(5)]
    probes = gaussian_like(params, torch.Generator().manual_seed(0))
    assert [(u.shape, u.dtype) for u in probes] == [(p.shape, p.dtype) for p in params]
    # 120,000 draws: mean 0 ± 5·(1/√n), variance 1 ± 5·√(2/n)
    assert abs(probes[0].mean().item()) < 5 / 120_000 ** 0.5
    assert abs(probes[0].var().item() - 1) < 5 * (2 / 120_000) ** 0.5


def test_parameters_without_a_path_to_the_loss_get_zero_products():
    used, unused = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    products = hessian_vector_products((used ** 3).sum(), [used, unused], [torch.ones(2), torch.ones(3)])
    assert torch.equal(products[0], torch.full((2,), 6.0)) and torch.equal(products[1], torch.zeros(3))
    linear = (used * 2).sum()  # a gradient that does not depend on the parameters: H = 0
    assert all(torch.equal(p, torch.zeros_like(p))
               for p in hessian_vector_products(linear, [used, unused], [torch.ones(2), torch.ones(3)]))


def test_rademacher_probes_are_signs_shaped_like_the_parameters():
    params = [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5)]
    probes = rademacher_like(params, torch.Generator().manual_seed(0))
    assert [(u.shape, u.dtype) for u in probes] == [(p.shape, p.dtype) for p in params]
    assert all(set(u.unique().tolist()) == {-1.0, 1.0} for u in probes)


def test_gnb_loss_samples_from_the_logits():
    # Near point-mass logits: the sampled label is the argmax and the loss ~0; uniform logits give log(V).
    logits = torch.tensor([[[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]]])
    assert gnb_loss(logits, torch.Generator().manual_seed(0)).item() == pytest.approx(0.0, abs=1e-12)
    assert gnb_loss(torch.zeros(4, 5)).item() == pytest.approx(torch.log(torch.tensor(5.0)).item())


# --- the label sampler ----------------------------------------------------------------------------------
# Chi-square goodness of fit at a false-alarm rate of ALPHA per test (fixed seeds make each run reproducible):
# with the correct sampler a test fails with probability 1e-3; each also shows the same counts rejected
# against a slightly wrong distribution (temperature 1.05), i.e. that the test has the power to fail.
ALPHA = 1e-3


def chi_square_p_value(counts, probabilities):
    """P(χ² ≥ observed) for multinomial `counts` against `probabilities`; cells expecting < 5 draws pooled."""
    counts, probabilities = counts.double(), probabilities.double()
    expected = counts.sum() * probabilities
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = torch.tensor((keep.sum() - 1).item() / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, statistic / 2).item()


def skewed_logits(vocab, seed):
    """Logits with a heavy head, a long tail of small probabilities and a few impossible entries."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=generator, dtype=torch.float64) * 3
    logits[vocab // 3] = -float("inf")
    logits[-1] = -1e4  # exp underflows to exactly 0 in float32 and float64: probability 0
    return logits


@pytest.mark.parametrize("vocab", [5, 64, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inverse_cdf_draws_follow_softmax(vocab, dtype):
    # Counts of 200,000 draws per case. 150 spans two full 64-blocks and a partial one; bf16 logits are
    # sampled from the softmax of their (rounded) values.
    draws = 200_000
    logits = skewed_logits(vocab, seed=vocab).to(dtype)
    probabilities = torch.softmax(logits.double(), dim=-1)
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(vocab), dtype=torch.float64)
    labels = sample_from_logits(logits.expand(draws, vocab).contiguous(), uniforms)
    counts = torch.bincount(labels, minlength=vocab)
    assert counts.numel() == vocab and counts[probabilities == 0].sum() == 0
    assert chi_square_p_value(counts, probabilities) > ALPHA
    assert chi_square_p_value(counts, torch.softmax(1.05 * logits.double(), dim=-1)) < ALPHA  # power


def test_gnb_loss_draws_its_labels_from_softmax_with_its_generator():
    # Through gnb_loss itself: the gradient of the mean loss is (p − onehot)/N, so each row's label is the
    # argmin of its gradient. Every row has its own logits; pooled χ² over rows.
    rows, vocab, repeats = 40, 70, 4000
    logits = torch.stack([skewed_logits(vocab, seed) for seed in range(rows)]).float()
    copies = logits.repeat(repeats, 1).requires_grad_()
    (grad,) = torch.autograd.grad(gnb_loss(copies, torch.Generator().manual_seed(5)), copies)
    labels = grad.argmin(dim=-1).view(repeats, rows)
    counts = torch.stack([torch.bincount(labels[:, r], minlength=vocab) for r in range(rows)])
    probabilities = torch.softmax(logits.double(), dim=-1).reshape(-1) / rows
    wrong = torch.softmax(1.05 * logits.double(), dim=-1).reshape(-1) / rows
    assert chi_square_p_value(counts.reshape(-1), probabilities) > ALPHA
    assert chi_square_p_value(counts.reshape(-1), wrong) < ALPHA
    again = copies.detach().clone().requires_grad_()
    (grad_again,) = torch.autograd.grad(gnb_loss(again, torch.Generator().manual_seed(5)), again)
    assert torch.equal(grad, grad_again)  # the same seed draws the same labels


def test_inverse_cdf_ends_pick_the_first_and_last_possible_labels():
    # u = 0 and the largest double below 1: a rounding at either end of the CDF must never pick an entry of
    # probability 0 (here at both ends and inside) nor run past the vocabulary.
    logits = torch.full((130,), -float("inf"))
    logits[[3, 70, 127]] = torch.tensor([0.0, 5.0, -30.0])
    # 127's probability is e^-35 ≈ 6e-16 of the total, above the last double below 1 but not 1 − 2^-30.
    uniforms = torch.tensor([0.0, 1.0 - 2.0 ** -53, 1.0 - 2.0 ** -30], dtype=torch.float64)
    labels = sample_from_logits(logits.expand(3, 130).contiguous(), uniforms)
    assert labels.tolist() == [3, 127, 70]


def plain_gnb_reference(logits, grad):
    """The plain computation for the labels gnb_loss drew (recovered from its gradient's argmin)."""
    leaf = logits.detach().clone().requires_grad_()
    flat = leaf.reshape(-1, leaf.shape[-1])
    labels = grad.reshape(flat.shape).argmin(dim=-1)
    loss = nn.functional.cross_entropy(flat.float() if flat.dtype != torch.float64 else flat, labels)
    return loss, torch.autograd.grad(loss, leaf)[0]


def assert_gnb_loss_matches_plain_cross_entropy(logits):
    logits = logits.requires_grad_()
    loss = gnb_loss(logits, torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(loss, logits)
    expected_loss, expected_grad = plain_gnb_reference(logits, grad)
    assert loss.dtype == expected_loss.dtype
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    # The gradient is (p − onehot)/N. float32: probabilities within 1e-6 absolute (sums of 64 float32
    # terms, a few ulps of 1), so p − 1 near a certain label keeps ~4 digits; bf16 adds one rounding of the
    # result (8e-3 relative); float64 is exact to 1e-12.
    n = grad.numel() // grad.shape[-1]
    rtol, atol = {torch.bfloat16: (8e-3, 1e-6 / n), torch.float32: (1e-6, 1e-6 / n)}.get(logits.dtype,
                                                                                       (1e-12, 1e-15))
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gnb_loss_value_and_gradient_equal_plain_cross_entropy(dtype):
    # What the GNB estimate and its loss would be with F.cross_entropy(logits.float(), labels): a mismatch
    # means the fused loss changed the curvature estimate.
    logits = (torch.randn(3, 16, 200, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    assert_gnb_loss_matches_plain_cross_entropy(logits)


@pytest.mark.slow
def test_compiled_gnb_kernels_equal_plain_cross_entropy(monkeypatch):
    # The path the trainer takes on real logits (over MIN_COMPILED_LOGITS): compiled statistics and gradient.
    kernels = (curvature.ROW_STATISTICS, curvature.CROSS_ENTROPY_GRAD)
    for kernel in kernels:
        monkeypatch.setattr(kernel, "min_numel", 0)
    logits = (torch.randn(2, 32, 300, generator=torch.Generator().manual_seed(2)) * 4).bfloat16()
    with compiled_code_runs(*kernels):
        assert_gnb_loss_matches_plain_cross_entropy(logits)


def test_non_finite_logits_give_a_non_finite_loss_and_labels_in_range():
    # The trainer skips a non-finite estimate; a NaN must neither crash the draw nor pick a label past V.
    logits = torch.randn(4, 130)
    logits[1, 5], logits[2, :] = float("nan"), float("inf")
    leaf = logits.clone().requires_grad_()
    loss = gnb_loss(leaf, torch.Generator().manual_seed(0))
    assert not torch.isfinite(loss)
    labels = sample_from_logits(logits, torch.rand(4, dtype=torch.float64))
    assert ((labels >= 0) & (labels < 130)).all()
