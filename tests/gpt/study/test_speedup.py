"""Wen et al.'s speed-up estimator on synthetic loss curves whose answer is known, its bootstrap interval's
coverage, the cases where it must refuse to give a number, and the paper's mid-run measure beside it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpt.study.speedup import (
    Speedup,
    first_crossing,
    fit_power_law,
    paper_measure,
    pooled_residuals,
    wen_speedup,
)

BUDGETS = [1e6, 2e6, 4e6]  # tokens: 1×, 2×, 4×


def baseline_curve(a: float = 3.0, b: float = 0.3, c: float = 1.8):
    return lambda tokens: a * (tokens / 1e5) ** -b + c


@pytest.mark.parametrize(("a", "b", "c"), [(3.0, 0.3, 1.8), (0.8, 0.6, 3.1), (10.0, 0.15, 0.5)])
def test_fit_recovers_an_exact_power_law(a, b, c):
    """Noise-free losses a·D^(−b) + c at five budgets: the fit returns the curve (its own parameterisation
    divides D by the smallest budget, so a is compared through the losses it predicts)."""
    curve = baseline_curve(a, b, c)
    budgets = [1e6, 2e6, 4e6, 8e6, 16e6]
    fit = fit_power_law(budgets, [curve(d) for d in budgets])
    assert fit.b == pytest.approx(b, rel=1e-5) and fit.c == pytest.approx(c, abs=1e-5)
    for tokens in (1.5e6, 3e6, 12e6):
        assert fit.loss(tokens) == pytest.approx(curve(tokens), rel=1e-7)


@pytest.mark.parametrize(("a", "b", "c"), [(3.0, 0.3, 1.8), (0.8, 0.6, 3.1), (10.0, 0.15, 0.5)])
@pytest.mark.parametrize("budget", BUDGETS[:2])
def test_an_optimizer_worth_1_3x_the_data_gets_1_30(a, b, c, budget):
    """The optimizer ends where the baseline would with 1.3× its data: Wen et al.'s speed-up is 1.30 ± 0.01,
    whatever the curve (three budgets, three seeds, no noise)."""
    curve = baseline_curve(a, b, c)
    baseline = {d: [curve(d)] * 3 for d in BUDGETS}
    result = wen_speedup(baseline, [curve(1.3 * budget)] * 3, budget, np.array([]), 0, 0.95)
    assert result.value == pytest.approx(1.30, abs=0.01) and result.reason is None


@pytest.mark.slow
def test_bootstrap_interval_covers_the_truth_in_at_least_90_percent_of_noisy_trials():
    """200 simulated studies: baseline and optimizer (1.3× the data) at three budgets, three seeds each with
    Gaussian seed noise of 0.01 (the CPU study's seed spread is 0.01-0.02 at losses 1.3-0.3 apart between
    budgets here); a 95% interval must contain 1.30 in at least 90% of them, and give a number in all."""
    curve, rng = baseline_curve(), np.random.default_rng(1234)
    covered = trials = 0
    for trial in range(200):
        baseline = {d: list(curve(d) + rng.normal(0, 0.01, 3)) for d in BUDGETS}
        optimizer = {d: list(curve(1.3 * d) + rng.normal(0, 0.01, 3)) for d in BUDGETS}
        residuals = pooled_residuals([*baseline.values(), *optimizer.values()])
        for budget in BUDGETS[:2]:
            result = wen_speedup(baseline, optimizer[budget], budget, residuals, 400, 0.95, seed=trial)
            trials += 1
            assert result.low is not None
            covered += result.low <= 1.3 <= result.high
    assert covered / trials >= 0.90


def test_fewer_than_three_budgets_gives_no_number():
    curve = baseline_curve()
    baseline = {d: [curve(d)] for d in BUDGETS[:2]}
    result = wen_speedup(baseline, [curve(1.3e6)], 1e6, np.array([]), 0, 0.95)
    assert result.value is None and "needs three" in result.reason and result.text().startswith("n/a")


def test_beyond_the_largest_budget_is_a_bound_not_a_number():
    """At 4×, an optimizer worth 1.3× needs 5.2× of the baseline: beyond its budgets, so only '> 1.00×'."""
    curve = baseline_curve()
    baseline = {d: [curve(d)] for d in BUDGETS}
    result = wen_speedup(baseline, [curve(1.3 * 4e6)], 4e6, np.array([]), 0, 0.95)
    assert result.value is None and result.bound == "> 1.00×" and "largest budget" in result.reason
    below = wen_speedup(baseline, [curve(0.5e6)], 2e6, np.array([]), 0, 0.95)
    assert below.value is None and below.bound == "< 0.50×"


def test_losses_that_do_not_flatten_give_no_number():
    """Losses falling faster at larger budgets (concave in log D) fit no power law with a floor."""
    baseline = {1e6: [3.0], 2e6: [2.9], 4e6: [2.6]}
    result = wen_speedup(baseline, [2.8], 2e6, np.array([]), 0, 0.95)
    assert result.value is None and "do not flatten" in result.reason


def test_a_diverged_seed_gives_no_number():
    curve = baseline_curve()
    baseline = {d: [curve(d)] * 2 for d in BUDGETS}
    result = wen_speedup(baseline, [curve(1.3e6), math.inf], 1e6, np.array([]), 0, 0.95)
    assert result.value is None and "diverged" in result.reason


def test_pooled_residuals_are_deviations_scaled_to_unbiased_spread():
    """Seeds [1, 3] deviate ±1 from their mean; ×√(2/1) makes their variance the sample variance (2). A group
    with a diverged seed or a single seed adds nothing."""
    pool = pooled_residuals([[1.0, 3.0], [5.0], [2.0, math.inf]])
    assert sorted(pool) == pytest.approx([-math.sqrt(2), math.sqrt(2)])
    assert np.mean(pool**2) == pytest.approx(np.var([1.0, 3.0], ddof=1))


def test_first_crossing_interpolates_between_evaluations():
    """Loss 4 at x=100, 2 at x=200: it reaches 3.5 a quarter of the way, at 125; never reaches 1.5."""
    points = [(0, 5.0), (100, 4.0), (200, 2.0)]
    assert first_crossing(points, 3.5) == pytest.approx(125.0)
    assert first_crossing(points, 5.0) == 0.0
    assert first_crossing(points, 1.5) is None
    assert first_crossing([(0, 5.0), (100, None), (200, 3.0)], 4.0) == pytest.approx(100.0)


def test_paper_measure_is_the_baseline_cost_over_the_crossing():
    """Two seeds cross the target at 125 and 200 of a 400-token baseline: 3.2× and 2×; a third never does."""
    curves = [[(0, 5.0), (100, 4.0), (200, 2.0)], [(0, 5.0), (200, 3.5)], [(0, 5.0), (400, 4.0)]]
    measure = paper_measure(curves, 3.5, 400)
    assert measure.ratios == pytest.approx([3.2, 2.0])
    assert measure.to_target[2] is None and measure.text() == "2.60× (2.00–3.20), 2/3 reached"


def test_an_interval_end_beyond_the_budgets_is_printed_as_a_bound():
    """The fit is read only within the baseline's budgets (here 0.5× to 2× this budget): an interval end
    beyond them is a bound, not a number."""
    assert Speedup(1.5, 1.2, 2.5, None, None, (0.5, 2.0)).text() == "1.50× [1.20, > 2.00]"
    assert Speedup(0.6, 0.4, 0.9, None, None, (0.5, 2.0)).text() == "0.60× [< 0.50, 0.90]"
