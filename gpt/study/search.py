"""The tuning procedure every optimizer of a study goes through: Wen et al.'s coordinate descent over ladders.

A hyper-parameter's search space is a ladder: the values reference × step^k (log scale), reference + step·k
(linear) or a listed set, indexed by the integer k. A sweep evaluates some rungs with every other
hyper-parameter at its incumbent, and while the best rung sits at an edge of what was evaluated it evaluates
one rung further out, up to the ladder's limits. The first round sweeps each hyper-parameter's declared
points, in the study's order; later rounds sweep each one's neighbours around the incumbent (a line search);
descent stops after a round that changed no incumbent, or after `max_rounds`. `descend` replays the procedure
from the losses known so far, so the tuning state is a pure function of the finished runs: it returns either
the configurations still needed (the whole next sweep at once, so they can run in parallel) or the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

SCALES = ("log", "linear", "values")
SIGNIFICANT_DIGITS = 3  # log-ladder values are rounded, so that 6e-4 / 3 is 2e-4 and run names stay short


@dataclass(frozen=True)
class Ladder:
    """One tuned hyper-parameter: its name in the study, the train.py key it sets, and its rungs."""

    name: str
    key: str
    scale: str
    reference: float
    step: float | None  # log: the ratio between rungs; linear: the difference; values: None
    points: tuple[int, ...]  # the rungs the first sweep evaluates
    limits: tuple[int, int]  # the lowest and highest rung a sweep may extend to
    values: tuple[float, ...] = ()  # scale "values": the rungs themselves

    @property
    def start(self) -> int:
        """The rung of the reference value: the incumbent before any sweep."""
        return self.values.index(self.reference) if self.scale == "values" else 0

    def value(self, rung: int) -> float:
        if self.scale == "values":
            return self.values[rung]
        if self.scale == "log":
            raw = self.reference * self.step**rung
            return float(f"{raw:.{SIGNIFICANT_DIGITS}g}")
        raw = self.reference + self.step * rung
        return int(raw) if float(self.reference).is_integer() and float(self.step).is_integer() else raw


Point = tuple[int, ...]  # one rung per ladder: a configuration of the tuned hyper-parameters


@dataclass
class Sweep:
    """One hyper-parameter's sweep: the configurations it evaluated and the rung it kept."""

    round: int
    name: str
    losses: dict[int, float]  # rung -> final loss (inf: diverged)
    points: dict[int, Point]  # rung -> the configuration evaluated there
    best: int


@dataclass
class Descent:
    """Where the procedure stands: `needed` configurations to run next, or (when empty) the tuned one."""

    incumbent: Point
    sweeps: list[Sweep] = field(default_factory=list)
    needed: list[Point] = field(default_factory=list)
    converged: bool = False  # a round changed nothing (False when stopped by max_rounds)

    @property
    def done(self) -> bool:
        return not self.needed


def _best(losses: Mapping[int, float], start: int) -> int:
    """The rung with the lowest loss; ties go to the rung nearest the reference, then the lower one."""
    return min(losses, key=lambda rung: (losses[rung], abs(rung - start), rung))


def descend(ladders: tuple[Ladder, ...], loss_of: Callable[[Point], float | None], max_rounds: int
            ) -> Descent:
    """Replay coordinate descent with the losses `loss_of` knows (None: not run yet)."""
    descent = Descent(incumbent=tuple(ladder.start for ladder in ladders))
    swept_with: dict[int, Point] = {}  # ladder -> the other ladders' incumbents when it was last swept
    for round_number in range(1, max_rounds + 1):
        changed = False
        for index, ladder in enumerate(ladders):
            current = descent.incumbent[index]
            others = descent.incumbent[:index] + descent.incumbent[index + 1:]
            if swept_with.get(index) == others:
                continue  # nothing else moved since its last sweep: it would evaluate the same runs
            swept_with[index] = others
            low, high = ladder.limits
            if round_number == 1:
                rungs = set(ladder.points)
            else:
                rungs = {rung for rung in (current - 1, current, current + 1) if low <= rung <= high}
            while True:
                points = {rung: (*descent.incumbent[:index], rung, *descent.incumbent[index + 1:])
                          for rung in sorted(rungs)}
                known = {rung: loss_of(point) for rung, point in points.items()}
                missing = [points[rung] for rung, loss in known.items() if loss is None]
                if missing:
                    descent.needed = missing
                    return descent
                best = _best(known, ladder.start)
                if not math.isfinite(known[best]):  # every rung diverged: nothing to follow
                    break
                if best == max(rungs) and best < high:
                    rungs.add(best + 1)
                elif best == min(rungs) and best > low:
                    rungs.add(best - 1)
                else:
                    break
            descent.sweeps.append(Sweep(round_number, ladder.name, dict(known), points, best))
            if best != current and math.isfinite(known[best]):
                descent.incumbent = (*descent.incumbent[:index], best, *descent.incumbent[index + 1:])
                changed = True
        if not changed:
            descent.converged = True
            break
    return descent


def values_of(ladders: tuple[Ladder, ...], point: Point) -> dict[str, float]:
    """The hyper-parameter values of a configuration, by name."""
    return {ladder.name: ladder.value(rung) for ladder, rung in zip(ladders, point, strict=True)}
