"""What a run's end means to a study (a result, a divergence, a failure, a stop), and what the study's loop
does with each, with runs faked by a launcher that ends them at once: the logic apart from training."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.errors import UserError
from gpt.study.arms import RunSpec
from gpt.study.driver import run_study
from gpt.study.execute import conclude
from gpt.study.outcome import DIVERGED_FILE, Outcome, read_outcome


def fake_spec(out_dir: Path, steps: int = 8) -> RunSpec:
    arm = SimpleNamespace(model="gpt2_tiny", label="adamw", ladders=())  # nothing tuned
    return RunSpec(arm=arm, budget=0, steps=steps, point=(), seed=0, overrides=(), out_dir=out_dir)


def write_metrics(out_dir: Path, records: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_run_is_finished_when_its_last_step_is_evaluated(tmp_path):
    """Not started, or stopped before its final evaluation: no result yet (it resumes). A NaN final
    evaluation (written as null) is a divergence."""
    run = tmp_path / "run"
    assert read_outcome(run, 8) is None
    write_metrics(run, [{"step": 0, "val_loss": 5.5}, {"step": 4, "val_loss": 4.0},
                        {"step": 7, "train_loss": 3.0}])
    assert read_outcome(run, 8) is None
    write_metrics(run, [{"step": 0, "val_loss": 5.5}, {"step": 8, "val_loss": 3.5}])
    assert read_outcome(run, 8) == Outcome(3.5, False)
    write_metrics(run, [{"step": 0, "val_loss": 5.5}, {"step": 8, "val_loss": None}])
    assert read_outcome(run, 8).diverged and read_outcome(run, 8).final_loss == math.inf


def test_the_trainers_non_finite_error_is_a_divergence_recorded_for_reruns(tmp_path):
    """Exit 2 with the trainer's non-finite error: a result (inf), written down so that a rerun of the study
    does not resume the run into the same divergence."""
    log = tmp_path / "run.log"
    log.write_text("warning: something\nerror: non-finite gradient norm in step 2 (loss 1e8, grad norm inf): "
                   "stopped before its update\n")
    spec = fake_spec(tmp_path / "run")
    (tmp_path / "run").mkdir()
    outcome = conclude(spec, 2, log)
    assert outcome.diverged and outcome.final_loss == math.inf
    assert (tmp_path / "run" / DIVERGED_FILE).read_text().startswith("error: non-finite gradient norm")
    assert read_outcome(spec.out_dir, spec.steps) == outcome


def test_other_failures_are_errors_naming_the_run_and_a_signal_stop_is_no_result(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("error: data.dir holds another corpus; point data.dir at ...\n")
    spec = fake_spec(tmp_path / "run")
    with pytest.raises(UserError, match=r"failed \(exit 2\): error: data.dir holds another corpus"):
        conclude(spec, 2, log)
    log.write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    with pytest.raises(UserError, match=r"failed \(exit 1\): RuntimeError: boom"):
        conclude(spec, 1, log)
    assert conclude(spec, 0, log) is None and conclude(spec, -signal.SIGTERM, log) is None


class FakeState:
    """A study of four independent runs (two budgets), as StudyState presents it to the loop."""

    def __init__(self, tmp_path: Path) -> None:
        self.specs = [fake_spec(tmp_path / f"r{i}", steps) for i, steps in enumerate((8, 16, 8, 16))]
        self.results: dict[Path, Outcome] = {}
        self.running: set[Path] = set()

    def needed(self) -> list[RunSpec]:
        return [s for s in self.specs if s.out_dir not in self.results]


class FakeLauncher:
    """Two slots; a run ends at the next poll with the outcome `ends` gives it."""

    poll_s, stops_runs = 0.0, True

    def __init__(self, ends) -> None:
        self.ends, self.running, self.started = ends, [], []

    def free_slots(self) -> int:
        return 2 - len(self.running)

    def start(self, specs: list[RunSpec]) -> None:
        self.running += specs
        self.started += [s.out_dir.name for s in specs]

    def poll(self):
        ended, self.running = [(s, self.ends(s)) for s in self.running], []
        return ended

    def stop(self) -> None:
        pass


def test_the_loop_runs_each_run_once_longest_first_and_a_divergence_does_not_stop_it(tmp_path):
    state = FakeState(tmp_path)
    launcher = FakeLauncher(lambda s: Outcome(math.inf, True) if s.out_dir.name == "r1"
                            else Outcome(2, False))
    assert run_study(state, launcher) == 4
    assert launcher.started == ["r1", "r3", "r0", "r2"]  # the 16-step runs first, two at a time
    assert state.results[tmp_path / "r1"].diverged and len(state.results) == 4


def test_a_failed_run_stops_new_starts_and_is_reported_after_the_runs_in_progress(tmp_path):
    state = FakeState(tmp_path)
    launcher = FakeLauncher(lambda s: UserError("run r1 failed") if s.out_dir.name == "r1"
                            else Outcome(2, False))
    with pytest.raises(UserError, match="run r1 failed; fix the cause, then rerun the study"):
        run_study(state, launcher)
    assert launcher.started == ["r1", "r3"] and set(state.results) == {tmp_path / "r3"}

