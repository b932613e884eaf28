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


def test_the_metrics_window_and_a_pending_record_survive_a_checkpoint():
    """A record covers the steps since the previous one. Wrong if a state restored from its JSON-saved
    state_dict counts the window from its own step instead of where the window began (the issue: 4/7 instead
    of 5/10 after a resume mid-window), or loses the record whose evaluation a stop abandoned."""
    clipped = [True, False, True, True, False, False, True, False, True, True]
    first = LoopState()
    for flag in clipped[:3]:
        first.end_step(1.0, False, flag)
    first.pending_record = {"step": 3, "train_loss": 1.0, "partial": True}
    resumed = LoopState()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as the manifest stores it
    for flag in clipped[3:]:
        resumed.end_step(1.0, False, flag)
    assert (resumed.window_steps, resumed.window.clipped) == (10, sum(clipped))
    assert resumed.pending_record == {"step": 3, "train_loss": 1.0, "partial": True}
    resumed.new_window()
    assert (resumed.window_steps, resumed.window.clipped, resumed.window.start_step) == (0, 0, 10)


def test_a_checkpoint_older_than_the_window_starts_one_at_its_step():
    """Manifests written before the window was saved: wrong if they fail to load, or count a window from 0."""
    state = LoopState()
    state.load_state_dict({"step": 7, "elapsed_s": 3.5, "recent_losses": [], "skipped_in_row": 0,
                           "wandb_id": None})
    assert (state.window.start_step, state.window.clipped, state.window.start_s) == (7, 0, 3.5)
    assert state.pending_record is None
