"""Learning-rate schedules against values computed by hand from nanoGPT's formulas."""

import itertools
import math

import pytest

from common.errors import UserError
from optim import SCHEDULES, lr_at

PAPER = dict(lr=6e-4, warmup_steps=2000, decay_steps=100_000, min_lr=1.5e-5)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 6e-4 * 1 / 2001),  # warmup never starts at exactly 0
        (999, 6e-4 * 1000 / 2001),
        (1999, 6e-4 * 2000 / 2001),
        (2000, 6e-4),  # cosine starts at the peak
        (51_000, 1.5e-5 + 0.5 * (6e-4 - 1.5e-5)),  # halfway through the decay: cos(π/2) = 0
        (2000 + 98_000 // 4, 1.5e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * (6e-4 - 1.5e-5)),
        (100_000, 1.5e-5),
        (250_000, 1.5e-5),  # held after decay_steps
    ],
)
def test_cosine_matches_hand_computed_values(step, expected):
    assert lr_at("cosine", step, **PAPER) == pytest.approx(expected, rel=1e-12)


def test_cosine_is_continuous_at_both_ends_and_decreasing():
    values = [lr_at("cosine", s, **PAPER) for s in range(1990, 100_010)]
    assert all(b <= a for a, b in itertools.pairwise(values[10:]))
    assert lr_at("cosine", 99_999, **PAPER) - 1.5e-5 < 1e-12


def test_constant_warms_up_then_holds():
    schedule = dict(lr=1e-3, warmup_steps=3, decay_steps=10, min_lr=0.0)
    assert lr_at("constant", 0, **schedule) == pytest.approx(1e-3 / 4)
    assert lr_at("constant", 3, **schedule) == 1e-3
    assert lr_at("constant", 10**6, **schedule) == 1e-3


def test_no_warmup_starts_at_the_peak():
    assert lr_at("cosine", 0, lr=1.0, warmup_steps=0, decay_steps=10, min_lr=0.0) == 1.0


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(UserError, match="unknown schedule 'linear'; valid: cosine, constant"):
        lr_at("linear", 0, **PAPER)
    assert set(SCHEDULES) == {"cosine", "constant"}


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # the official scripts' warm-up starts at exactly 0
        (1, 6e-4 / 2000),
        (1000, 6e-4 / 2),
        (1999, 6e-4 * 1999 / 2000),
        (2000, 6e-4),  # the cosine part is the same as nanoGPT's
        (51_000, 1.5e-5 + 0.5 * (6e-4 - 1.5e-5)),
        (100_000, 1.5e-5),  # the official loop's last iteration (max_iters) is at min_lr
    ],
)
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_official_warmup_from_zero(schedule, step, expected):
    """The official protocol's warm-up lr·s/W (0 at step 0): wrong if the flag is ignored (step 0 would be
    lr/2001) or if it changes the schedule after the warm-up."""
    if schedule == "constant" and step >= 2000:
        expected = 6e-4
    value = lr_at(schedule, step, **PAPER, warmup_from_zero=True)
    assert value == pytest.approx(expected, rel=1e-12, abs=0.0)
    if step >= 2000:
        assert value == lr_at(schedule, step, **PAPER)
