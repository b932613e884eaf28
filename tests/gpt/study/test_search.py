"""Coordinate descent over ladders, against brute force and hand-worked sweeps: the tuning every optimizer of
a study goes through, so a fault here makes every comparison unfair in the same silent way."""

from __future__ import annotations

import itertools
import math

import pytest

from gpt.study.search import Ladder, descend, values_of


def log_ladder(name: str = "lr", reference: float = 6e-4, points=(-1, 0, 1, 2), limits=(-3, 3)) -> Ladder:
    return Ladder(name, f"optim.{name}", "log", reference, 3.0, tuple(points), limits)


def run(ladders, loss, max_rounds=3):
    """Descend to the end, 'training' every needed configuration with `loss`; returns the descent and the
    configurations evaluated, in order."""
    evaluated: dict = {}
    while True:
        descent = descend(ladders, evaluated.get, max_rounds)
        if descent.done:
            return descent, list(evaluated)
        for point in descent.needed:
            evaluated[point] = loss(point)


def test_log_ladder_values_are_reference_times_step_powers_rounded_to_3_digits():
    """The CPU study's rates: {1/3, 1, 3, 9, 27} × 6e-4 and 1e-4 / 3 = 3.33e-5, as its report lists them."""
    ladder = log_ladder()
    assert [ladder.value(r) for r in range(-1, 4)] == [2e-4, 6e-4, 1.8e-3, 5.4e-3, 1.62e-2]
    assert log_ladder(reference=1e-4).value(-1) == 3.33e-5
    linear = Ladder("warmup_steps", "schedule.warmup_steps", "linear", 40, 20, (-1, 0, 1), (-2, 2))
    assert [linear.value(r) for r in (-2, 0, 2)] == [0, 40, 80] and isinstance(linear.value(1), int)
    listed = Ladder("beta2", "optim.betas.1", "values", 0.99, None, (0, 1, 2), (0, 2), (0.95, 0.99, 0.995))
    assert listed.start == 1 and listed.value(2) == 0.995


@pytest.mark.parametrize(("best_rung", "evaluated"), [
    (1, [-1, 0, 1, 2]),          # best inside the declared points: no extension
    (2, [-1, 0, 1, 2, 3]),       # best at the top edge: one ×3 step further, which is worse
    (3, [-1, 0, 1, 2, 3]),       # still best at the new edge, but 27× is the limit
    (-3, [-1, 0, 1, 2, -2, -3]),  # best far below: extended one step at a time down to the limit
])
def test_grid_grows_past_the_edge_one_step_at_a_time_up_to_its_limits(best_rung, evaluated):
    """The CPU study's protocol: {1/3, 1, 3, 9} × reference, one ×3 step further while the best is at an edge,
    never beyond 27× either way; the best rung is kept."""
    ladder = log_ladder()
    descent, order = run((ladder,), lambda p: abs(p[0] - best_rung))
    assert [p[0] for p in order] == evaluated
    assert descent.incumbent == (best_rung,) and descent.converged


def test_one_hyper_parameter_needs_one_round():
    """A second round could only re-evaluate the same runs: it is skipped, and the descent has converged."""
    descent, order = run((log_ladder(),), lambda p: abs(p[0] - 1))
    assert len(order) == 4 and [s.round for s in descent.sweeps] == [1]


def test_separable_bowl_reaches_the_brute_force_optimum_of_the_grid():
    """For a loss that is a sum of convex functions of each rung, coordinate descent must end at the grid's
    global minimum (found here by brute force over every configuration) and evaluate far fewer."""
    ladders = (log_ladder("lr", points=(-1, 0, 1)), log_ladder("weight_decay", 0.1, (-1, 0, 1), (-3, 3)))

    def loss(point):
        return (point[0] - 2) ** 2 + 0.5 * (point[1] + 3) ** 2

    descent, order = run(ladders, loss)
    grid = list(itertools.product(range(-3, 4), range(-3, 4)))
    assert descent.incumbent == min(grid, key=loss) == (2, -3)
    assert len(order) < len(grid) and len(order) == len(set(order))


def test_coupled_loss_takes_several_rounds_and_stops_when_a_round_changes_nothing():
    """With lr and weight decay coupled (the best lr depends on the decay), the first round's incumbents
    move in round 2; the descent stops after a round without change, at a point no neighbour improves."""
    ladders = (log_ladder("lr", points=(-1, 0, 1)), log_ladder("weight_decay", 0.1, (-1, 0, 1), (-3, 3)))

    def loss(point):
        lr, wd = point
        return (lr - 0.5 * wd - 1) ** 2 + (wd - 2) ** 2

    descent, _ = run(ladders, loss, max_rounds=10)
    assert descent.converged and max(s.round for s in descent.sweeps) >= 2
    lr, wd = descent.incumbent
    for neighbour in [(lr + 1, wd), (lr - 1, wd), (lr, wd + 1), (lr, wd - 1)]:
        assert loss(neighbour) >= loss(descent.incumbent)


def test_max_rounds_caps_the_descent():
    ladders = (log_ladder("lr", points=(-1, 0, 1)), log_ladder("weight_decay", 0.1, (-1, 0, 1), (-3, 3)))
    descent, _ = run(ladders, lambda p: (p[0] - 0.5 * p[1] - 1) ** 2 + (p[1] - 2) ** 2, max_rounds=1)
    assert not descent.converged and max(s.round for s in descent.sweeps) == 1


def test_diverged_runs_are_never_chosen_and_all_diverged_keeps_the_reference():
    """A diverged run (final loss inf) is a result the descent steps over; when every rung diverges there is
    nothing to follow and the reference stays."""
    ladder = log_ladder()
    descent, _ = run((ladder,), lambda p: math.inf if p[0] >= 2 else -p[0])
    assert descent.incumbent == (1,)
    descent, order = run((ladder,), lambda p: math.inf)
    assert descent.incumbent == (0,) and len(order) == 4


def test_a_sweep_asks_for_all_its_runs_at_once():
    """The runs of one sweep are independent: all of them are needed together, so they can run in parallel."""
    descent = descend((log_ladder(),), lambda point: None, max_rounds=3)
    assert descent.needed == [(-1,), (0,), (1,), (2,)]
    assert values_of((log_ladder(),), (1,)) == {"lr": 1.8e-3}
