"""The training loop's own state survives a checkpoint: what it decides after a resume is what the straight
run decides."""

import json
import statistics

import numpy as np

from gpt.trainer import LoopState


def losses_with_spikes(n: int) -> list[float]:
    rng = np.random.default_rng(0)
    values = 3.0 + 0.1 * rng.standard_normal(n)
    values[[12, 40, 130]] = [30.0, 16.0, 40.0]  # 40: below 5× once the window has absorbed step 12
    return [float(v) for v in values]


def test_spikes_follow_the_median_of_the_last_100_applied_losses_across_a_resume():
    """Wrong if a spike is flagged against another window than the last 100 applied losses (skipped steps
    excluded), or if a state restored from its JSON-saved state_dict decides differently from the straight
    run's."""
    losses = losses_with_spikes(200)
    skipped = {50, 51, 140}
    history: list[float] = []  # the reference: the rule written out
    expected = []
    for step, loss in enumerate(losses):
        is_skipped = step in skipped
        expected.append(not is_skipped and len(history) >= 10
                        and loss > 5 * statistics.median(history[-100:]))
        if not is_skipped:
            history.append(loss)

    straight = LoopState()
    assert [straight.end_step(loss, step in skipped) for step, loss in enumerate(losses)] == expected
    assert any(expected)

    first = LoopState()
    decided = [first.end_step(loss, step in skipped) for step, loss in enumerate(losses[:120])]
    first.skipped_in_row, first.wandb_id = 2, "abc"
    resumed = LoopState()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as the manifest stores it
    assert (resumed.step, resumed.skipped_in_row, resumed.wandb_id) == (120, 2, "abc")
    decided += [resumed.end_step(loss, step in skipped) for step, loss in enumerate(losses[120:], 120)]
    assert decided == expected
    assert resumed.clock() >= first.state_dict()["elapsed_s"]  # elapsed time continues, never restarts
