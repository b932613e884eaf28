"""Speed-ups over the baseline: Wen et al.'s end-of-training measure with a bootstrap interval, and the Sophia
paper's mid-run measure beside it.

Wen et al.'s measure: fit the baseline's final loss against its budget D (tokens) as L(D) = a·D^(−b) + c over
its budgets, then for an optimizer that ends at loss ℓ with budget D, the speed-up is the data the baseline
would need to reach ℓ, L⁻¹(ℓ) = ((ℓ − c)/a)^(−1/b), divided by D. It needs three budgets (three parameters),
and it is only read inside the budgets the baseline ran: where L⁻¹(ℓ) lies beyond them the estimate is a bound
(> largest / D, or < smallest / D), and where ℓ ≤ c the baseline never gets there on this curve.

The fit is a hand-written least squares: for a given b the model is linear in (a, c), so the residual is
profiled over b (a log grid over [B_MIN, B_MAX], then golden-section refinement); b at a bound means the
losses do not flatten as a power law with a floor would, and the fit is not used.

The interval is a residual bootstrap over seeds: every seed's deviation from its group's mean (group: one
optimizer at one budget), pooled over the study's groups and scaled by √(n/(n−1)) to undo the shrinkage of
a deviation from a mean of n, is resampled with replacement to redraw each group's mean; the fit and the
speed-up are recomputed each time and the interval is the percentiles. Pooling is what makes an interval
from 3 seeds usable: a group's own 3 seeds yield only 10 distinct bootstrap means, and a spread √(2/3) of the
true one. It assumes that seed noise is about the same for every optimizer and budget of a study.

The paper's measure: the step at which a run's validation loss first reaches the baseline's final loss at the
same budget (interpolated between evaluations), and the baseline's steps divided by it. It reads the middle
of a run, where a run with a longer schedule is still at a high learning rate, so it favours whichever
optimizer decays first; the report prints it next to Wen et al.'s, labelled as the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

B_MIN, B_MAX = 0.01, 4.0
GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class PowerLaw:
    """L(D) = a·(D/d0)^(−b) + c, with D in tokens and d0 the smallest budget (for numerical scale)."""

    a: float
    b: float
    c: float
    d0: float

    def loss(self, tokens: float) -> float:
        return self.a * (tokens / self.d0) ** -self.b + self.c

    def tokens_for(self, loss: float) -> float:
        """The data at which the curve reaches `loss` (inf if it never does: loss at or below c)."""
        if loss <= self.c:
            return math.inf
        return self.d0 * ((loss - self.c) / self.a) ** (-1 / self.b)

    @property
    def degenerate(self) -> bool:
        return self.a <= 0 or not (B_MIN * 1.001 < self.b < B_MAX / 1.001)


def _profile(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares lines y = a·x + c, row by row of x and y (..., K): (a, c, residual sum of squares)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    sxx = (xc * xc).sum(axis=-1)
    sxy = (xc * yc).sum(axis=-1)
    a = sxy / sxx
    c = y.mean(axis=-1) - a * x.mean(axis=-1)
    return a, c, np.maximum((yc * yc).sum(axis=-1) - sxy * a, 0.0)


def fit_power_laws(tokens: Sequence[float], losses: np.ndarray) -> list[PowerLaw]:
    """Least-squares a·D^(−b) + c through each row of `losses` (samples × budgets) at the budgets `tokens`
    (at least three distinct ones), all rows at once."""
    ratios = np.asarray(tokens, dtype=float) / min(tokens)
    y = np.atleast_2d(np.asarray(losses, dtype=float))
    grid = np.geomspace(B_MIN, B_MAX, 400)
    _, _, rss = _profile(ratios[None, None, :] ** -grid[None, :, None], y[:, None, :])  # samples × grid
    best = rss.argmin(axis=1)
    low, high = grid[np.maximum(best - 1, 0)], grid[np.minimum(best + 1, len(grid) - 1)]

    def residual(b: np.ndarray) -> np.ndarray:
        return _profile(ratios[None, :] ** -b[:, None], y)[2]

    for _ in range(50):  # golden-section search inside each row's bracket around its best grid point
        left, right = high - GOLDEN * (high - low), low + GOLDEN * (high - low)
        go_left = residual(left) < residual(right)
        high, low = np.where(go_left, right, high), np.where(go_left, low, left)
    b = (low + high) / 2
    a, c, _ = _profile(ratios[None, :] ** -b[:, None], y)
    d0 = float(min(tokens))
    return [PowerLaw(float(ai), float(bi), float(ci), d0) for ai, bi, ci in zip(a, b, c, strict=True)]


def fit_power_law(tokens: Sequence[float], losses: Sequence[float]) -> PowerLaw:
    """Least-squares a·D^(−b) + c through (tokens, loss) points."""
    return fit_power_laws(tokens, np.asarray([losses], dtype=float))[0]


@dataclass(frozen=True)
class Speedup:
    """Wen et al.'s speed-up of one optimizer at one budget, or why there is no number."""

    value: float | None  # the estimate, when the fit can say
    low: float | None  # the bootstrap interval (None: no interval)
    high: float | None
    bound: str | None  # "> x" or "< x" when the data needed lies beyond the baseline's budgets
    reason: str | None  # why there is no number (None when there is one)
    readable: tuple[float, float] | None = None  # the speed-ups the fit can give: its budgets over this one

    def text(self) -> str:
        if self.value is None:
            return f"{self.bound} ({self.reason})" if self.bound else f"n/a ({self.reason})"
        if self.low is None:
            return f"{self.value:.2f}×"
        least, most = self.readable
        # an end beyond what the baseline's budgets can say is a bound
        low = f"< {least:.2f}" if self.low < least else f"{self.low:.2f}"
        high = f"> {most:.2f}" if self.high > most else f"{self.high:.2f}"
        return f"{self.value:.2f}× [{low}, {high}]"


def pooled_residuals(groups: Sequence[Sequence[float]]) -> np.ndarray:
    """Every seed's deviation from its group's mean, scaled by √(n/(n−1)), over the groups with 2+ finite
    seeds: the noise the bootstrap resamples."""
    pool = []
    for losses in groups:
        values = np.asarray([v for v in losses if math.isfinite(v)], dtype=float)
        if len(values) >= 2 and len(values) == len(losses):
            pool.extend((values - values.mean()) * math.sqrt(len(values) / (len(values) - 1)))
    return np.asarray(pool, dtype=float)


def wen_speedup(baseline: dict[float, Sequence[float]], losses: Sequence[float], tokens: float,
                residuals: np.ndarray, samples: int, confidence: float, seed: int = 0) -> Speedup:
    """The speed-up of an optimizer whose seeds end at `losses` with `tokens` of data, against the baseline's
    final losses per budget (tokens -> seed losses)."""
    usable = {d: v for d, v in baseline.items() if v and all(math.isfinite(x) for x in v)}
    if len(usable) < 3:
        return Speedup(None, None, None, None, f"the baseline has {len(usable)} budget(s) with finite final "
                       "losses; fitting a·D^(−b) + c needs three")
    if not all(math.isfinite(x) for x in losses):
        return Speedup(None, None, None, None, "a seed diverged")
    budgets = sorted(usable)
    means = np.array([np.mean(usable[d]) for d in budgets])
    fit = fit_power_law(budgets, means)
    if fit.degenerate:
        shown = ", ".join(f"{m:.4f}" for m in means)
        return Speedup(None, None, None, None, f"the baseline's losses {shown} do not follow "
                       f"a·D^(−b) + c with a > 0 and b inside ({B_MIN}, {B_MAX}): they do not flatten with "
                       "data as the fit assumes")
    loss = float(np.mean(losses))
    needed = fit.tokens_for(loss)
    low_end, high_end = budgets[0] / tokens, budgets[-1] / tokens
    interval = (None, None)
    if len(residuals) and samples:
        rng = np.random.default_rng(seed)
        counts = [len(usable[d]) for d in budgets]
        redrawn = means + np.stack([rng.choice(residuals, (samples, n)).mean(axis=1) for n in counts], axis=1)
        sample_losses = loss + rng.choice(residuals, (samples, len(losses))).mean(axis=1)
        curves = fit_power_laws(budgets, redrawn)
        draws = np.array([curve.tokens_for(value) / tokens if curve.a > 0 else math.inf
                          for curve, value in zip(curves, sample_losses, strict=True)])
        tail = (1 - confidence) / 2 * 100
        interval = tuple(float(np.percentile(draws, q, method="inverted_cdf")) for q in (tail, 100 - tail))
    readable = (low_end, high_end)
    if needed > budgets[-1]:
        return Speedup(None, *interval, f"> {high_end:.2f}×", "the baseline would need more data than its "
                       "largest budget: the fit is not read beyond it", readable)
    if needed < budgets[0]:
        return Speedup(None, *interval, f"< {low_end:.2f}×", "the baseline would need less data than its "
                       "smallest budget: the fit is not read below it", readable)
    return Speedup(needed / tokens, *interval, None, None, readable)


def first_crossing(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The x at which y first falls to `target`, interpolated linearly between points (x ascending); None if
    it never does."""
    previous = None
    for x, y in points:
        if y is not None and y <= target:
            if previous is None:
                return float(x)
            (x0, y0) = previous
            return x0 + (y0 - target) / (y0 - y) * (x - x0)
        previous = (x, y) if y is not None else previous
    return None


@dataclass(frozen=True)
class PaperMeasure:
    """Data (tokens: steps × tokens/step) to reach the baseline's final loss, per seed of an optimizer at one
    budget; with the same batch for both, the ratio is the paper's ratio of steps."""

    target: float
    to_target: list[float | None]  # per seed; None: never reached
    ratios: list[float]  # the baseline's tokens / tokens to the target, for the seeds that reached it

    def text(self) -> str:
        reached = len(self.ratios)
        if not reached:
            return f"not reached (0/{len(self.to_target)})"
        mean = sum(self.ratios) / reached
        spread = f" ({min(self.ratios):.2f}–{max(self.ratios):.2f})" if reached > 1 else ""
        return f"{mean:.2f}×{spread}, {reached}/{len(self.to_target)} reached"


def paper_measure(curves: Sequence[Sequence[tuple[float, float]]], target: float, baseline_tokens: float
                  ) -> PaperMeasure:
    """The paper's mid-run measure for the seeds' validation curves (tokens, loss) against `target`."""
    crossings = [first_crossing(curve, target) for curve in curves]
    return PaperMeasure(target, crossings, [baseline_tokens / c for c in crossings if c])
