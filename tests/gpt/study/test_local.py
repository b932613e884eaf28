"""The local launcher's share of the machine: how many runs go at once, and what each run's process gets."""

from __future__ import annotations

import pytest

from common.errors import UserError
from gpt.study.local import LocalLauncher, LocalSettings, local_settings, usable_cores

DEFAULTS = {"threads_per_run": 1, "parallel": None, "gpus_per_run": 0, "poll_s": 1}


def test_parallel_defaults_to_the_cores_each_run_threads_fill():
    """Otherwise a study either leaves cores idle or oversubscribes them (two runs of two threads on two
    cores run slower than one after another)."""
    assert local_settings(DEFAULTS).parallel == usable_cores()
    assert local_settings({**DEFAULTS, "threads_per_run": 2}).parallel == max(1, usable_cores() // 2)
    assert local_settings({**DEFAULTS, "parallel": 3}).parallel == 3


def test_each_slot_has_its_own_threads_and_gpus(tmp_path):
    """A run's torch threads come from OMP_NUM_THREADS (and MKL's); on a GPU machine each slot gets its own
    devices, so two runs never share a GPU."""
    cpu = LocalLauncher(LocalSettings(threads_per_run=3, parallel=2, gpus_per_run=0, poll_s=1), tmp_path)
    assert cpu._env(1) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    gpu = LocalLauncher(LocalSettings(threads_per_run=1, parallel=2, gpus_per_run=2, poll_s=1), tmp_path)
    assert gpu._env(0)["CUDA_VISIBLE_DEVICES"] == "0,1" and gpu._env(1)["CUDA_VISIBLE_DEVICES"] == "2,3"


@pytest.mark.parametrize(("change", "expected"), [
    ({"threads_per_run": 0}, "launcher.threads_per_run must be an integer >= 1"),
    ({"parallel": 0}, "launcher.parallel must be null"),
    ({"gpus_per_run": -1}, "launcher.gpus_per_run must be auto or an integer >= 0"),
    ({"poll_s": 0}, "launcher.poll_s must be a number of seconds > 0"),
])
def test_bad_launcher_settings_are_refused(change, expected):
    with pytest.raises(UserError, match=expected):
        local_settings({**DEFAULTS, **change})
