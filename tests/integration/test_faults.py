"""Fault injection: kill, stop, corrupt, diverge, misconfigure and fill the disk under a real `train.py`.

Every fault test runs `python train.py` (or `python -m data.prepare`) in a subprocess as a user would,
injects one fault for real — SIGKILL or SIGTERM at a chosen moment, damaged files, an absurd learning rate, a
file-size limit — and checks the outcome against an independent reference: a straight run of the same config
that nothing interrupted. Bad configs and damaged inputs, which fail before or within a few tiny steps, run
train.py's entry function in the test's process instead (two bad configs still start the real CLI).
docs/robustness.md maps each fault to the test here that proves what survives it.

Kill windows are found by watching the run directory, not by hooks in the trainer: half a step time after a
metrics record appears, the next step is being computed; two step times after the record before an
evaluation step, that step is done and its 60-batch evaluation (~10 step times) is running; when a staged
`state.pt` appears, a checkpoint is being written. Each test checks afterwards that the kill landed there.
Subprocesses use one OpenMP thread: on a shared 2-core machine spinning OpenMP threads make runs ~5× slower,
and straight and faulted runs use the same setting, so comparisons stay exact.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.errors import UserError
from data import blocks
from data.loader import TokenData
from data.prepare import prepare
from gpt.checkpoint import CheckpointDir
from gpt.run_lock import RunLock
from tests.determinism import assert_same_numbers
from tests.hydra_compose import run_train_py, tiny_overrides
from tests.planted import plant_state_file

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds for any one subprocess: a hang is a failure, not a stuck suite
# The tests' tiny GPT: 8 steps, an evaluation and a checkpoint every 4 (state.pt ≈ 1.4 MB); its schedule's
# length is set apart from max_steps, so a test may resume it with a larger budget.
TINY = [*tiny_overrides(steps=8, interval=4), "schedule.decay_steps=8"]
# Wide but fed little: cheap steps (2 micro-steps of 2 × 32 tokens), a long evaluation (60 micro-batches)
# and a 38 MB checkpoint, so each kill window lasts long enough to be hit from outside.
KILL = ["model.n_layer=4", "model.n_embd=256", "model.block_size=32", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.log_interval=1", "train.eval_interval=4",
        "train.eval_sequences=120", "train.ckpt_interval=4", "train.max_steps=8"]
COMPARED = ("train_loss", "val_loss", "lr", "grad_norm", "clipped", "tokens")


# ----------------------------------------------------------------------------------------------- helpers

def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}  # users' default error output
    return {**env, "OMP_NUM_THREADS": "1", "CI": "true", "PYTHONDONTWRITEBYTECODE": "1"}


def train_command(out: Path, data: Path, config: list[str], *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "experiment=quickstart", f"out_dir={out}",
            f"data.dir={data}", *config, *extra]


def run(command: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=TIMEOUT, **kwargs)


def run_in_process(command: list[str], capsys: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """A `train_command` through train.py's entry function in this process: what a subprocess would report,
    without the seconds a new interpreter takes to import torch (for runs that fail before training)."""
    capsys.readouterr()
    code = run_train_py(command[2:])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(command, code, captured.out, captured.err)


@pytest.fixture
def train_py(tmp_path, capsys, monkeypatch) -> Callable[[list[str]], subprocess.CompletedProcess]:
    """`run_in_process` from `tmp_path` as the working directory, as `run(command, tmp_path)` would."""
    monkeypatch.chdir(tmp_path)
    return lambda command: run_in_process(command, capsys)


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    """A background run whose output goes to files (a full pipe would stall it)."""
    return subprocess.Popen(command, cwd=cwd, env=environment(), stdout=open(cwd / "stdout.txt", "w"),
                            stderr=open(cwd / "stderr.txt", "w"), text=True)


def signal_when(process: subprocess.Popen, ready: Callable[[], bool], signum: int) -> None:
    """Poll every millisecond until `ready()`, then send `signum` and wait for the process to end."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if process.poll() is not None:
            pytest.fail("the run ended before the fault window was reached")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the fault window was not reached in time")
        time.sleep(0.001)
    process.send_signal(signum)
    process.wait(TIMEOUT)


def logged(out: Path) -> dict[int, dict]:
    """Records of a run that may be writing right now (a torn last line is not a record yet)."""
    records = {}
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        records[record["step"]] = record
    return records


def finished_records(out: Path) -> list[dict]:
    """Every line of a finished run's metrics.jsonl; fails on a torn line or a duplicated step."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"duplicated or out-of-order records: {steps}"
    return records


def curve(out: Path) -> dict[int, dict]:
    """What a resumed run must reproduce bit for bit: losses, lr, gradient norm, clipping, tokens."""
    return {r["step"]: {k: r.get(k) for k in COMPARED} for r in finished_records(out)}


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def complete_steps(out: Path) -> list[int]:
    return CheckpointDir(out / "checkpoints").complete_steps()


def assert_user_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2 with a one-line `error:` message and no traceback; returns the message."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2 and lines[-1].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[-1], (text, lines[-1])
    return lines[-1]


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The shipped Shakespeare sample, byte-level, prepared once for the session."""
    cfg = OmegaConf.load(REPO / "configs" / "data" / "shakespeare.yaml")
    cfg.tokenizer = "byte"
    cfg.dir = str(tmp_path_factory.mktemp("data") / "shakespeare_byte")
    return prepare(cfg)


@pytest.fixture(scope="session")
def tiny_straight(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted TINY run (checkpoints at 4 and 8). Tests that change it work on a copy."""
    cwd = tmp_path_factory.mktemp("tiny_straight")
    result = run(train_command(cwd / "run", data_dir, TINY), cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


@pytest.fixture(scope="session")
def kill_straight(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted KILL run: the reference every killed-and-rerun run must reproduce exactly."""
    cwd = tmp_path_factory.mktemp("kill_straight")
    result = run(train_command(cwd / "run", data_dir, KILL), cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


# ------------------------------------------------------------------------------- kills and clean stops

def step_times_after(step: int, step_times: float) -> Callable[[Path], Callable[[], bool]]:
    """Ready `step_times` step durations after the record of `step` appears, i.e. while the run computes what
    follows that record. A step's duration is the shortest gap between consecutive records so far (longer
    gaps include an evaluation or a checkpoint)."""
    def window(out: Path) -> Callable[[], bool]:
        deadline: list[float] = []

        def ready() -> bool:
            records = logged(out)
            if step not in records:
                return False
            if not deadline:
                elapsed = [records[k]["elapsed_s"] for k in range(1, step + 1)]
                step_time = min(b - a for a, b in itertools.pairwise(elapsed))
                deadline.append(time.monotonic() + step_times * step_time)
            return time.monotonic() >= deadline[0]
        return ready
    return window


def during_checkpoint(step: int) -> Callable[[Path], Callable[[], bool]]:
    """Mid-checkpoint: the staged state.pt of `step` exists; writing, fsync and hashing 38 MB follow."""
    return lambda out: lambda: (out / "checkpoints" / f"step_{step:08d}.tmp" / "state.pt").exists()


def after_checkpoint(step: int, record: int) -> Callable[[Path], Callable[[], bool]]:
    """Once the checkpoint of `step` is complete (renamed, with its manifest) and the record of `record` is
    written: with background saves, the run has trained on while that checkpoint was written."""
    return lambda out: lambda: (checkpoint(out, step) / "manifest.json").exists() and record in logged(out)


BACKGROUND = ["train.async_checkpoint=true"]  # the step-4 checkpoint is written in the background


@pytest.mark.slow
@pytest.mark.parametrize(("window", "resumes_from", "check", "extra"), [
    # half-way through step 3 or 6; during the evaluation of step 8 (1 step to finish step 8, then ~10);
    # while the staged state.pt of step 8 is being written
    pytest.param(step_times_after(2, 0.5), None, "no checkpoint", [], id="mid-step-before-first-checkpoint"),
    pytest.param(step_times_after(5, 0.5), 4, "mid-step", [], id="mid-step"),
    pytest.param(step_times_after(7, 2), 4, "mid-evaluation", [], id="mid-evaluation"),
    pytest.param(during_checkpoint(8), 4, "mid-checkpoint", [], id="mid-checkpoint"),
    # background saves: while the state.pt of step 4 is written behind the training; after it is complete
    pytest.param(during_checkpoint(4), None, "mid-background-checkpoint", BACKGROUND,
                 id="mid-background-checkpoint"),
    pytest.param(after_checkpoint(4, 5), 4, "after-background-checkpoint", BACKGROUND,
                 id="after-background-checkpoint"),
])
def test_sigkill_then_rerun_reproduces_the_straight_run(window, resumes_from, check, extra, tmp_path,
                                                        data_dir, kill_straight):
    """Wrong if a SIGKILL at any moment corrupts the last checkpoint, changes any later loss (resume is not
    exact), or leaves duplicated or torn lines in metrics.jsonl. With background saves
    (`train.async_checkpoint`) also wrong if a checkpoint killed while written behind the training loads as
    complete, or one written so differs from what a synchronous save holds (the reference run's are)."""
    out = tmp_path / "run"
    command = train_command(out, data_dir, KILL, *extra)
    process = start(command, tmp_path)
    signal_when(process, window(out), signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL

    # The kill landed where it was meant to.
    steps = logged(out)
    if check == "no checkpoint":
        assert complete_steps(out) == [] and max(steps) < 4
    elif check == "mid-step":
        assert complete_steps(out) == [4] and max(steps) == 5
    elif check == "mid-evaluation":
        assert complete_steps(out) == [4] and max(steps) == 7, "killed after the evaluation of step 8"
        assert not (out / "checkpoints" / "step_00000008.tmp").exists()
    elif check == "mid-checkpoint":
        assert complete_steps(out) == [4] and (out / "checkpoints" / "step_00000008.tmp").is_dir()
    elif check == "mid-background-checkpoint":
        staged = out / "checkpoints" / "step_00000004.tmp"
        assert complete_steps(out) == [] and staged.is_dir() and not (staged / "manifest.json").exists()
    else:
        assert complete_steps(out) == [4] and max(steps) >= 5

    result = run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if resumes_from is not None:
        assert f"resumed from {checkpoint(out, resumes_from)}" in result.stdout
    assert_same_numbers(curve(out), curve(kill_straight))
    assert complete_steps(out) == [8, 4]
    assert not list((out / "checkpoints").glob("*.tmp")), "a staging directory was left behind"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_finishes_the_step_saves_and_exits_cleanly(signum, tmp_path, data_dir, kill_straight):
    """Wrong if a polite stop (Slurm preemption, Ctrl-C) loses the steps since the last checkpoint, exits
    non-zero, or resumes to different losses."""
    out = tmp_path / "run"
    command = train_command(out, data_dir, KILL)
    process = start(command, tmp_path)
    signal_when(process, step_times_after(5, 0.5)(out), signum)
    stdout = (tmp_path / "stdout.txt").read_text()
    assert process.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    name = signal.Signals(signum).name
    stopped = re.search(rf"stopped by {name} after step (\d+), checkpoint saved", stdout)
    assert stopped, stdout[-2000:]
    step = int(stopped.group(1))
    assert step == max(logged(out)) and complete_steps(out)[0] == step and 5 < step < 8

    result = run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint(out, step)}" in result.stdout
    assert_same_numbers(curve(out), curve(kill_straight))


def during_first_evaluation(out: Path) -> Callable[[], bool]:
    """config.yaml is written just before the step-0 evaluation starts; 300 micro-batches follow."""
    seen: list[float] = []

    def ready() -> bool:
        if not seen and (out / "config.yaml").exists():
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() > seen[0] + 0.5
    return ready


@pytest.mark.slow
@pytest.mark.parametrize("window", ["step-0", "step-4"])
def test_stop_signal_abandons_a_long_evaluation(window, tmp_path, data_dir):
    """A validation set of 600 sequences (300 micro-batches, ~10 s on the KILL model) and SIGTERM during
    the evaluation of step 0 or step 4. Wrong if the run finishes the evaluation (and then a step) before
    honouring the signal, as a pre-emption grace would not allow; at step 4 the checkpoint of step 4 must
    still be saved, and its record has no val_loss."""
    out = tmp_path / "run"
    process = start(train_command(out, data_dir, KILL, "train.eval_sequences=600"), tmp_path)
    ready = during_first_evaluation(out) if window == "step-0" else step_times_after(3, 2)(out)
    signal_when(process, ready, signal.SIGTERM)
    stdout = (tmp_path / "stdout.txt").read_text()
    assert process.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert "evaluation abandoned for the stop signal" in (tmp_path / "stderr.txt").read_text() + stdout
    if window == "step-0":
        assert "nothing trained, nothing to save" in stdout
        assert logged(out) == {} and complete_steps(out) == []
    else:
        records = logged(out)
        assert max(records) == 4 and "val_loss" not in records[4] and complete_steps(out) == [4]
        assert "stopped by SIGTERM after step 4, checkpoint saved" in stdout


# ------------------------------------------------------------------------------------ steps too long to wait

@pytest.mark.slow
def test_stop_signal_abandons_a_step_longer_than_the_grace_and_the_rerun_resumes(tmp_path, data_dir,
                                                                                tiny_straight):
    """Step 3 takes 10 minutes (slow_step_train.py delays its batches; as a huge context or a first
    compilation would) and SIGTERM comes during it, with train.stop_grace_s=3. Wrong if the run waits for
    the step (the issue: a first step that ignored SIGTERM and two SIGINTs for ten minutes), exits without
    saying why and from where a rerun resumes, keeps the out_dir locked, or if the rerun does not resume
    from the last checkpoint and reproduce the straight run."""
    out = tmp_path / "run"
    overrides = [*TINY, "train.max_steps=4", "train.ckpt_interval=1", "train.stop_grace_s=3"]
    command = train_command(out, data_dir, overrides)
    slow = [sys.executable, str(Path(__file__).parent / "slow_step_train.py"), *command[2:]]
    process = subprocess.Popen(slow, cwd=tmp_path, env={**environment(), "SLOW_STEP_S": "600",
                                                        "SLOW_FROM_STEP": "2"},
                               stdout=open(tmp_path / "stdout.txt", "w"),
                               stderr=open(tmp_path / "stderr.txt", "w"))
    deadline = time.monotonic() + TIMEOUT
    while not (checkpoint(out, 2) / "manifest.json").exists():  # step 3 starts right after
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.01)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the run did not stop within 60 s of SIGTERM: it waited for its 10-minute step")
    took = time.monotonic() - signalled
    stdout = (tmp_path / "stdout.txt").read_text()
    assert process.returncode == 0 and 3 <= took < 60, (process.returncode, took)
    assert (f"stopped by SIGTERM during step 3, which did not finish within train.stop_grace_s=3 s of the "
            f"signal; nothing of it is saved: rerun to resume from {checkpoint(out, 2)}") in stdout, stdout
    assert not (out / ".lock").exists(), "the abandoned run kept the out_dir locked"
    assert [r["step"] for r in finished_records(out)] == [0, 1, 2]

    result = run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint(out, 2)} (step 2)" in result.stdout
    straight = {step: values for step, values in curve(tiny_straight).items() if step <= 4}
    assert_same_numbers(curve(out), straight)


@pytest.mark.slow
def test_a_context_too_long_to_stop_warns_first_and_honours_sigterm(tmp_path, data_dir):
    """model.block_size=100000, which the data can serve: one step is hours of CPU. Wrong if the run starts
    without saying so (with the plan's FLOPs and a rate), or if SIGTERM during its first evaluation (one
    forward of 100,000 tokens, no Python code to notice a flag) is not honoured within the grace."""
    out = tmp_path / "run"
    command = train_command(out, data_dir, TINY, "model.block_size=100000", "train.global_batch_size=1",
                            "train.micro_batch_size=1", "train.eval_sequences=1", "train.stop_grace_s=5")
    process = start(command, tmp_path)
    config_seen: list[float] = []

    def evaluating() -> bool:  # 2 s after config.yaml: the step-0 evaluation's one forward is under way
        if not config_seen and (out / "config.yaml").exists():
            config_seen.append(time.monotonic())
        return bool(config_seen) and time.monotonic() > config_seen[0] + 2

    signal_when(process, evaluating, signal.SIGTERM)
    output = (tmp_path / "stdout.txt").read_text()
    warning = next(line for line in output.splitlines() if line.startswith("warning: one step"))
    assert "FLOP per rank, at least" in warning and "longer than train.stop_grace_s=5 s" in warning, warning
    assert output.index("plan:") < output.index(warning), "the warning must come before the run starts"
    assert process.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert ("stopped by SIGTERM during the evaluation of step 0, which did not finish within "
            "train.stop_grace_s=5 s of the signal; nothing of it is saved: rerun to start over") in output


# ------------------------------------------------------------------------- windowed diagnostics on resume

# The KILL model with records every 4 steps and clipping at 3.0, which (measured) clips steps 1-6 and not 7-8:
# the record of step 8 covers a window (5-8) half clipped. Checkpoints every 3 steps: not a multiple of 4.
WINDOW = [*KILL, "train.log_interval=4", "train.eval_interval=8", "train.ckpt_interval=3",
          "train.grad_clip=3.0", "schedule.decay_steps=8"]


@pytest.fixture(scope="session")
def window_reference(data_dir, tmp_path_factory) -> dict[int, dict]:
    """The WINDOW run straight with a record at every step: the independent reference for each window (a
    log interval changes which steps are recorded, never the training)."""
    cwd = tmp_path_factory.mktemp("window_reference")
    result = run(train_command(cwd / "run", data_dir, WINDOW, "train.log_interval=1"), cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return {r["step"]: r for r in finished_records(cwd / "run")}


def expected_window(reference: dict[int, dict], first: int, last: int) -> dict:
    """What the record of step `last` reports for the window of steps `first`..`last`."""
    clipped = [reference[step]["clipped"] for step in range(first, last + 1)]
    return {"clip_fraction": sum(clipped) / len(clipped), "window_steps": len(clipped),
            **{key: reference[last].get(key) for key in ("train_loss", "lr", "grad_norm", "clipped")}}


def window_of(record: dict) -> dict:
    return {key: record.get(key) for key in ("clip_fraction", "window_steps", "train_loss", "lr", "grad_norm",
                                             "clipped")}


@pytest.mark.slow
def test_windowed_diagnostics_after_a_sigterm_mid_window_equal_the_straight_runs(tmp_path, data_dir,
                                                                               window_reference):
    """SIGTERM during step 5-7, inside the window 5-8. Wrong if the stop writes no record of the steps since
    the last one (a run never resumed would lose them), if that record is not marked partial or does not say
    how many steps it covers, or if after the rerun the record of step 8 covers another window than 5-8 (the
    issue's 4/7 instead of 5/10) or the partial record is left next to it."""
    reference = window_reference
    assert 0 < expected_window(reference, 5, 8)["clip_fraction"] < 1, "the window must be partly clipped"
    out = tmp_path / "run"
    command = train_command(out, data_dir, WINDOW)
    process = start(command, tmp_path)
    signal_when(process, lambda: 4 in logged(out), signal.SIGTERM)  # step 5 is under way
    assert process.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    records = logged(out)
    stopped = max(records)
    assert 5 <= stopped <= 7 and complete_steps(out)[0] == stopped, records.keys()
    assert records[stopped]["partial"] is True
    assert_same_numbers(window_of(records[stopped]), expected_window(reference, 5, stopped))

    result = run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint(out, stopped)} (step {stopped})" in result.stdout
    records = {r["step"]: r for r in finished_records(out)}
    assert sorted(records) == [0, 4, 8], "the partial record was not replaced by the whole window's"
    assert_same_numbers(window_of(records[8]), expected_window(reference, 5, 8))
    assert_same_numbers(window_of(records[4]), expected_window(reference, 1, 4))


@pytest.mark.slow
def test_windowed_diagnostics_after_a_sigkill_between_records_equal_the_straight_runs(tmp_path, data_dir,
                                                                                     window_reference):
    """SIGKILL once the checkpoint of step 6 exists (mid-window: records every 4 steps, checkpoints every 3).
    Wrong if the resumed run's record of step 8 covers only the steps since the checkpoint (7-8) instead of
    the window 5-8, because the checkpoint did not hold the window's counters."""
    out = tmp_path / "run"
    command = train_command(out, data_dir, WINDOW)
    process = start(command, tmp_path)
    signal_when(process, lambda: (checkpoint(out, 6) / "manifest.json").exists(), signal.SIGKILL)
    assert complete_steps(out) == [6, 3] and max(logged(out)) == 4, "the kill missed its window"

    result = run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint(out, 6)} (step 6)" in result.stdout
    records = {r["step"]: r for r in finished_records(out)}
    assert sorted(records) == [0, 4, 8]
    assert_same_numbers(window_of(records[8]), expected_window(window_reference, 5, 8))


# ------------------------------------------------------------------------------------------ checkpoints

def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def foreign_state(path: Path) -> None:
    torch.save({"model": {"weight": torch.ones(3)}}, path)


MARKER = Path("/tmp") / f"sophia-gpt-planted-pickle-{os.getpid()}"


def planted_pickle(path: Path) -> None:
    """A state.pt that names code, its manifest entry recomputed to match: only the loader can tell."""
    plant_state_file(path.parent, MARKER)


def future_format(path: Path) -> None:
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.parametrize(("damage", "reason"), [
    (flip_bytes, "state.pt fails its SHA-256 check"),
    (truncate, "state.pt has"),
    (foreign_state, "state.pt has"),
    (future_format, "format version 99, expected 1"),
    (planted_pickle, "{state} holds the object posix.system, which is not checkpoint data: refused unloaded"),
], ids=["flipped-bytes", "truncated", "foreign-file", "unknown-format-version", "planted-pickle"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(damage, reason, tmp_path, tiny_straight,
                                                            data_dir):
    """Wrong if a damaged checkpoint is loaded, crashes the resume, or is skipped silently; the run must
    resume from the previous one, say which, and reproduce the straight run. A state.pt holding a pickle
    that names code (its manifest recomputed) must not run it, and is damage like a bad hash: one warning
    line, never a traceback or torch's advice to load with weights_only=False."""
    out = copy_run(tiny_straight, tmp_path)
    damage(checkpoint(out, 8) / "state.pt")
    MARKER.unlink(missing_ok=True)
    result = run(train_command(out, data_dir, TINY), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not MARKER.exists(), "the checkpoint ran code"
    assert "Traceback" not in result.stderr and "weights_only" not in result.stdout + result.stderr
    reason = reason.format(state=checkpoint(out, 8) / "state.pt")
    warning = f"checkpoint {checkpoint(out, 8)} is unusable ({reason}"
    assert warning in result.stdout and "falling back to step_00000004" in result.stdout, result.stdout
    assert f"resumed from {checkpoint(out, 4)}" in result.stdout
    assert_same_numbers(curve(out), curve(tiny_straight))
    assert CheckpointDir(out / "checkpoints").verify(checkpoint(out, 8)) is None  # re-saved whole


@pytest.mark.slow
def test_no_verifiable_checkpoint_is_refused_not_restarted(tmp_path, tiny_straight, data_dir):
    """Wrong if a run whose every checkpoint is damaged silently trains again from step 0 over them."""
    out = copy_run(tiny_straight, tmp_path)
    for step in (4, 8):
        flip_bytes(checkpoint(out, step) / "state.pt")
    result = run(train_command(out, data_dir, TINY), tmp_path)
    assert_user_error(result, "no checkpoint in", "verifies")
    assert complete_steps(out) == [8, 4]


@pytest.mark.slow
def test_checkpoint_records_its_config_and_refuses_another_model(tmp_path, tiny_straight, data_dir):
    """Wrong if a checkpoint made with one model shape or optimizer is loaded into another, or if a changed
    step budget or cadence (which do not change what is trained) is refused."""
    out = copy_run(tiny_straight, tmp_path)
    (out / "config.yaml").unlink()  # only the checkpoint's own record of its config is left to check
    result = run(train_command(out, data_dir, TINY, "model.n_layer=3", "optim=lion"), tmp_path)
    message = assert_user_error(result, f"checkpoint {checkpoint(out, 8)} holds a different experiment")
    assert "model.n_layer: 2 -> 3" in message and "optim.name: 'adamw' -> 'lion'" in message
    result = run(train_command(out, data_dir, TINY, "train.max_steps=10", "train.eval_interval=5",
                               "train.log_interval=2"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint(out, 8)}" in result.stdout
    assert [r["step"] for r in finished_records(out)][-2:] == [8, 10]


# ------------------------------------------------------------------------------------------- divergence

# The warm-up ramps the learning rate towards an absurd peak: a few sane steps (and a checkpoint), then the
# loss explodes and turns non-finite. Slow ramp: spikes first, then divergence at ~step 17; fast: ~step 6.
SLOW_DIVERGENCE = ["optim.lr=3e3", "schedule.warmup_steps=1000", "train.max_steps=40"]
FAST_DIVERGENCE = ["optim.lr=3e4", "schedule.warmup_steps=1000", "train.max_steps=40",
                   "train.ckpt_interval=2"]


@pytest.mark.slow
def test_divergence_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    """Wrong if a non-finite loss or gradient reaches the optimizer, a checkpoint is written after it, the
    exit code is 0, or the reported last good checkpoint does not load into finite weights. Also wrong if a
    loss spike (> 5× the median of the recent losses) goes unrecorded or a normal step is flagged."""
    out = tmp_path / "run"
    result = run(train_command(out, data_dir, TINY, *SLOW_DIVERGENCE), tmp_path)
    message = assert_user_error(result, "non-finite", "stopped before its update (train.on_nonfinite=stop;")
    failed_step = int(re.search(r"in step (\d+)", message).group(1))
    last_good = Path(re.search(r"Last good checkpoint: (\S+)\.", message).group(1))
    assert last_good == checkpoint(out, complete_steps(out)[0])
    assert complete_steps(out)[0] < failed_step, "a checkpoint was written at or after the failed step"
    assert CheckpointDir(out / "checkpoints").verify(last_good) is None
    state = torch.load(last_good / "state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())

    records = finished_records(out)
    assert records[-1]["step"] == failed_step - 1  # nothing logged for the step that was not applied
    history: list[float] = []
    for r in (r for r in records if "train_loss" in r):
        spike = len(history) >= 10 and r["train_loss"] > 5 * statistics.median(history[-100:])
        assert r.get("loss_spike", False) == spike, r
        history.append(r["train_loss"])
    assert any(r.get("loss_spike") for r in records), "this run's losses explode: a spike must be recorded"


@pytest.mark.slow
def test_skip_policy_counts_skipped_updates_and_stops_after_max_skipped(tmp_path, data_dir):
    """Wrong if skipped steps are not recorded, the streak is miscounted, or the run goes on past
    train.max_skipped non-finite steps in a row."""
    out = tmp_path / "run"
    result = run(train_command(out, data_dir, TINY, *FAST_DIVERGENCE, "train.on_nonfinite=skip",
                               "train.max_skipped=3"), tmp_path)
    message = assert_user_error(result, "3 in a row = train.max_skipped")
    skipped = [r for r in finished_records(out) if r.get("skipped_update")]
    assert [r["skipped_in_row"] for r in skipped] == [1, 2]  # the third stops the run before it is logged
    assert skipped[1]["step"] == skipped[0]["step"] + 1
    assert f"in step {skipped[1]['step'] + 1}" in message
    assert "skipped (1 in a row)" in result.stdout and "skipped (2 in a row)" in result.stdout


def test_non_finite_weights_are_never_saved(tmp_path, data_dir, train_py):
    """optim.lr=inf turns the weights NaN in step 1 while its loss and gradient were finite. Wrong if that
    state is written as a checkpoint (a resume would load garbage) or named as the last good one."""
    out = tmp_path / "run"
    result = train_py(train_command(out, data_dir, TINY, "optim.lr=inf", "train.ckpt_interval=1"))
    assert_user_error(result, "after step 1, ", "is not finite: its checkpoint was not written",
                      "Last good checkpoint: none")
    assert complete_steps(out) == [] and not list((out / "checkpoints").glob("*"))


# ------------------------------------------------------------------------------------------ bad input

BAD_CONFIGS = [
    (["model=nope"], ["unknown model=nope; valid:", "gpt2_tiny"]),
    (["optim=nope"], ["unknown optim=nope; valid:", "sophia_g"]),
    (["data=nope"], ["unknown data=nope; valid:", "shakespeare"]),
    (["train.max_stpes=5"], ["train.max_stpes is not a config key"]),
    (["+train.max_stpes=5"], ["Key 'max_stpes' not in 'TrainSettings'"]),
    (["+data.tokeniser=byte"], ["unknown data key(s) tokeniser"]),
    (["+optim.lrr=1"], ["lrr"]),
    (["train.max_steps=["], ["cannot parse the override"]),
    (["train.seed=abc"], ["train", "abc"]),
    (["train.on_nonfinite=maybe"], ["train.on_nonfinite='maybe' must be 'stop' or 'skip'"]),
    (["train.micro_batch_size=3"], ["global_batch_size=8 is not divisible by train.micro_batch_size=3"]),
    (["model.block_size=200000"], ["fewer than block_size + 1 = 200001"]),
    (["model.vocab_size=100"], ["'byte' with 256 tokens but model.vocab_size=100"]),
    (["data.tokenizer=gpt2", "data.auto_prepare=false"],
     ["prepared with other settings", "tokenizer", "python -m data.prepare"]),
    (["data.dir={tmp}/absent", "data.auto_prepare=false"],
     ["absent does not exist", "data.prepare data=shakespeare data.tokenizer=byte data.dir={tmp}/absent"]),
    (["model.n_layer=0"], ["model.n_layer must be at least 1 (got 0)"]),
    (["model.n_embd=0"], ["model.n_embd must be at least 1 (got 0)"]),
    (["model.dropout=2.0"], ["model.dropout=2.0 must be in [0, 1)"]),
    (["train.grad_clip=nan"], ["train.grad_clip=nan must be a finite number >= 0 (0 disables clipping)"]),
    (["schedule.min_lr=nan"], ["schedule.min_lr=nan must be a finite number >= 0"]),
    (["schedule.decay_steps=-5"], ["schedule.decay_steps=-5 must be at least 1"]),
    # 2^33 × 64 embedding weights alone need 2^39 × 16 bytes = 8,192 GiB with AdamW, so at least that
    (["model.vocab_size=8589934592"], ["this plan needs at least ", "GiB per rank (549,755,", "GiB of RAM"]),
    # a path that does not exist is named as such, not passed to the Hugging Face hub as a "repo id"
    (["train.init_from={tmp}/nonexistent/run"], ["train.init_from={tmp}/nonexistent/run does not exist"]),
    (["train.stop_grace_s=0"], ["train.stop_grace_s=0.0 must be a number of seconds > 0"]),
]


# These cases also start the real `python train.py` (one caught while Hydra composes, one by the trainer);
# the others run train.py's entry function in the test's process.
REAL_CLI = {"model=nope", "model.vocab_size=100"}


@pytest.mark.parametrize(("overrides", "expected"),
                         [pytest.param(*case, id=" ".join(case[0])) for case in BAD_CONFIGS])
def test_bad_config_is_one_line_and_exit_2(overrides, expected, tmp_path, data_dir, train_py):
    """Wrong if a config mistake shows a traceback, takes more than two lines, exits 0 or 1, or does not
    say what is wrong (with the valid choices or the command that fixes it), or leaves behind an out_dir
    that looks like a run (Hydra creates it before the job starts)."""
    command = train_command(tmp_path / "run", data_dir, TINY, *(o.format(tmp=tmp_path) for o in overrides))
    result = run(command, tmp_path) if " ".join(overrides) in REAL_CLI else train_py(command)
    assert_user_error(result, *(e.format(tmp=tmp_path) for e in expected))
    assert not (tmp_path / "run").exists()


def not_json(path: Path) -> None:
    path.write_text('{"splits": ')


def not_an_object(path: Path) -> None:
    path.write_text("[1, 2]")


@pytest.mark.parametrize(("where", "damage", "expected"), [
    ("data", not_json, "meta.json is not valid JSON"),
    ("data", not_an_object, "meta.json holds a JSON list, not an object"),
    ("run", lambda path: path.write_text("model: [unclosed"), "config.yaml is not readable YAML"),
    ("run", lambda path: path.write_text("- just a list"), "config.yaml holds a list, not a mapping"),
], ids=["meta-not-json", "meta-not-object", "config-not-yaml", "config-not-mapping"])
def test_damaged_meta_or_config_file_is_one_line(where, damage, expected, tmp_path, data_dir, train_py):
    """Wrong if a damaged meta.json (read by train.py and by data.prepare) or run-directory config.yaml
    gives a traceback instead of one line naming the file."""
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data_dir, data)
    if where == "data":
        damage(data / "meta.json")
    else:
        out.mkdir()
        damage(out / "config.yaml")
    result = train_py(train_command(out, data, TINY))
    assert_user_error(result, expected)
    if where == "data":
        prepared = run([sys.executable, "-m", "data.prepare", "data=shakespeare", "data.tokenizer=byte",
                        f"data.dir={data}"], REPO)
        assert_user_error(prepared, expected)


@pytest.mark.parametrize(("out_dir", "expected"), [
    ("{tmp}/file", "cannot create out_dir {tmp}/file (File exists)"),
    ("{tmp}/file/run", "cannot create out_dir {tmp}/file/run (Not a directory)"),
    ("''", "out_dir is empty"),
], ids=["a-file", "below-a-file", "empty"])
def test_unusable_out_dir_is_one_line(out_dir, expected, tmp_path, data_dir, train_py):
    """Wrong if an out_dir that cannot hold a run gives a traceback, or an empty one trains into the
    working directory."""
    (tmp_path / "file").write_text("")
    command = [*train_command(tmp_path / "unused", data_dir, TINY), f"out_dir={out_dir.format(tmp=tmp_path)}"]
    command.remove(f"out_dir={tmp_path / 'unused'}")
    result = train_py(command)
    assert_user_error(result, expected.format(tmp=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "something was written"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_out_dir_without_write_permission_is_one_line(tmp_path, data_dir, train_py):
    """Wrong if an out_dir below a directory the user cannot write gives a traceback."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = train_py(train_command(locked / "run", data_dir, TINY))
    assert_user_error(result, f"cannot create out_dir {locked / 'run'} (Permission denied)")


@pytest.mark.slow
def test_out_dir_of_another_experiment_is_refused(tmp_path, tiny_straight, data_dir):
    """Wrong if a second experiment can write into (and mix with) another's run directory."""
    out = copy_run(tiny_straight, tmp_path)
    result = run(train_command(out, data_dir, TINY, "model.n_embd=128"), tmp_path)
    assert_user_error(result, f"out_dir {out} holds a different experiment", "model.n_embd: 64 -> 128")


def test_truncated_token_file_is_refused(tmp_path, data_dir, train_py):
    """Wrong if the loader trains on a token file shorter than meta.json promises."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    truncate(data / "train.bin")
    result = train_py(train_command(tmp_path / "run", data, TINY, "data.auto_prepare=false"))
    assert_user_error(result, f"{data / 'train.bin'} has", "truncated or replaced", "rebuild it with")
    with pytest.raises(UserError, match="truncated or replaced"):
        TokenData(data)


def test_second_train_py_on_a_held_out_dir_refuses_naming_the_holder(tmp_path, data_dir):
    """Wrong if a run starts in (and writes into) an out_dir another live run holds, e.g. a requeue racing
    a still-running job: metrics.jsonl would hold every step twice."""
    out = tmp_path / "run"
    lock = RunLock(out)  # held by this (live) process, as by a running job
    lock.acquire()
    try:
        result = subprocess.run(train_command(out, data_dir, TINY), cwd=tmp_path, env=environment(),
                                capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert_user_error(result, f"out_dir {out} is in use by another run", f"host {socket.gethostname()}",
                      f"pid {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [], "the refused run wrote into the out_dir"


RACE_ROUNDS = 50


@pytest.mark.slow
def test_two_starts_racing_for_a_new_out_dir_never_touch_each_others_files(tmp_path, data_dir):
    """Two train.py started together on a new out_dir, 50 times (race_starts.py beside this file: the holder
    of the lock waits in its data loading until the other has exited, as a slow preparation or CUDA start
    would keep it there). Wrong if the refused run removes or writes any file of the live one (the issue:
    its train.log and plan.txt deleted, the winner then logging into a deleted file), if both run, or if
    the refusal is not one line naming the holder."""
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "race_starts.py"), str(tmp_path),
                             str(data_dir), str(RACE_ROUNDS)], cwd=tmp_path, env=environment(),
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rounds) == RACE_ROUNDS
    for outcome in rounds:
        out = Path(outcome["out_dir"])
        assert sorted(outcome["exit"]) == [0, 2], outcome
        loser = outcome["stderr"][outcome["exit"].index(2)]
        assert "Traceback" not in loser and loser.strip().splitlines()[-1].startswith(
            f"error: out_dir {out} is in use by another run"), loser
        assert sorted(p.name for p in out.iterdir()) == [
            "checkpoints", "config.yaml", "metrics.jsonl", "plan.txt", "train.log"], outcome
        log = (out / "train.log").read_text()
        assert "plan:" in log and f"run directory: {out}" in log, "the winner's log lost its beginning or end"
        assert [r["step"] for r in finished_records(out)] == [0, 1] and complete_steps(out) == [1]


def rewrite_tokens(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """Rewrite a token file in place, keeping its size (what meta.json's size check cannot see)."""
    path.write_bytes(change(np.fromfile(path, dtype="<u2")).astype("<u2").tobytes())


@pytest.mark.slow
def test_data_changed_under_a_run_is_refused_at_resume(tmp_path, tiny_straight, data_dir):
    """Wrong if a resume trains on other data than its checkpoint was trained on without saying so: train.bin
    shuffled in place (same size), the data re-prepared with other content, or another validation split;
    also wrong if data that merely moved to another data.dir is refused."""
    data = tmp_path / "moved"
    shutil.copytree(data_dir, data)
    out = copy_run(tiny_straight, tmp_path)
    result = run(train_command(out, data, TINY, "train.max_steps=9"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint(out, 8)}" in result.stdout and "holds the same data" in result.stdout

    original = (data / "train.bin").read_bytes()
    rewrite_tokens(data / "train.bin", np.random.default_rng(0).permutation)
    result = run(train_command(out, data, TINY, "train.max_steps=10"), tmp_path)
    assert_user_error(result, "train.bin block 0", "differs from the hash recorded when it was prepared")

    (data / "train.bin").write_bytes(original)  # a re-preparation that tokenised one byte differently
    rewrite_tokens(data / "train.bin", lambda tokens: np.where(np.arange(len(tokens)) == 5, 7, tokens))
    meta = json.loads((data / "meta.json").read_text())
    meta["blocks"]["train"] = blocks.block_hashes(data / "train.bin", meta["blocks"]["block_bytes"])
    (data / "meta.json").write_text(json.dumps(meta))
    result = run(train_command(out, data, TINY, "train.max_steps=10"), tmp_path)
    assert_user_error(result, f"checkpoint {checkpoint(out, 9)} was trained on other data", "content: ")

    result = run(train_command(out, tmp_path / "resplit", TINY, "data.val_fraction=0.2"), tmp_path)
    assert_user_error(result, "holds a different experiment (data.val_fraction: 0.1 -> 0.2)")


def test_token_ids_beyond_the_vocabulary_are_one_line(tmp_path, data_dir, train_py):
    """Wrong if a token file holding ids the model has no embedding for (damaged, or data prepared without
    block hashes and then overwritten) crashes with an IndexError traceback instead of one line."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    del meta["blocks"]  # as data adopted or prepared before block hashes existed
    (data / "meta.json").write_text(json.dumps(meta))
    rewrite_tokens(data / "val.bin", lambda tokens: np.full_like(tokens, 300))
    result = train_py(train_command(tmp_path / "run", data, TINY, "data.auto_prepare=false"))
    assert_user_error(result, "val.bin holds token id 300 >= the model's vocabulary of 256")


# ------------------------------------------------------------------------------------- data preparation

def write_corpus(path: Path) -> None:
    """~23 MB of deterministic text: preparing it takes several seconds, long enough to be interrupted."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    with open(path, "w") as f:
        for doc in range(4000):
            f.write(json.dumps({"text": " ".join(words[(doc * 7 + i * i) % 10] for i in range(1000))}) + "\n")


def prepare_command(corpus: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "data.prepare", "data=text", f"data.files={corpus}", "data.tokenizer=byte",
            f"data.dir={out}", f"data.cache_dir={cache}", "data.num_proc=1"]


@pytest.fixture(scope="module")
def prepared_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """The corpus and its uninterrupted preparation (own datasets cache): the reference output."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "corpus.jsonl")
    result = run(prepare_command(root / "corpus.jsonl", root / "reference", root / "hf"), REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "corpus.jsonl", root / "reference"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["loading", "writing"])
def test_killed_preparation_is_refused_then_rerun_to_completion(phase, tmp_path, prepared_corpus):
    """Wrong if a killed `data.prepare` leaves files the loader accepts, or if the rerun cannot finish or
    writes anything but the uninterrupted preparation's bytes (a stale datasets cache must not leak in)."""
    corpus, reference = prepared_corpus
    out, cache = tmp_path / "out", tmp_path / "hf"
    command = prepare_command(corpus, out, cache)
    process = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    if phase == "loading":  # datasets converts the corpus into its cache (tokens then stream to .tmp)
        def ready() -> bool:
            # datasets renames files and `.incomplete` directories while we walk them: look again next poll
            with contextlib.suppress(FileNotFoundError):
                return any(path.is_file() for path in cache.rglob("*"))
            return False
    else:
        def ready() -> bool:
            return (out / "train.bin.tmp").exists()
    signal_when(process, ready, signal.SIGKILL)
    assert (out / "train.bin.tmp").exists() == (phase == "writing") and not (out / "train.bin").exists()

    with pytest.raises(UserError, match=re.escape("python -m data.prepare")):
        TokenData(out)
    result = run(command, REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert json.loads((out / "meta.json").read_text())["splits"] == json.loads(
        (reference / "meta.json").read_text())["splits"]
    TokenData(out)


# ------------------------------------------------------------------------------------------- full disk

def limit_file_size(limit: int) -> Callable[[], None]:
    """In the child: writing past `limit` bytes into any file fails with EFBIG (OSError), as on a full disk,
    instead of killing the process with SIGXFSZ."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_while_auto_preparing_is_one_line(tmp_path):
    """Wrong if train.py's automatic preparation dies on a full disk (here a file-size limit below
    train.bin's size) with SIGBUS or a traceback, or leaves its partial token file behind."""
    data = tmp_path / "data"
    result = subprocess.run(train_command(tmp_path / "run", data, TINY), cwd=tmp_path, env=environment(),
                            capture_output=True, text=True, timeout=TIMEOUT,
                            preexec_fn=limit_file_size(100_000))
    assert_user_error(result, f"cannot write {data / 'train.bin.tmp'} (File too large)")
    assert sorted(p.name for p in data.iterdir()) == []


@pytest.mark.slow
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_straight, data_dir):
    """Wrong if a failed checkpoint write damages or removes the previous checkpoint, leaves its partial
    files, exits 0, or does not name the checkpoint a rerun will resume from."""
    out = copy_run(tiny_straight, tmp_path)
    before = (checkpoint(out, 8) / "state.pt").read_bytes()
    command = train_command(out, data_dir, TINY, "train.max_steps=12")
    state_size = len(before)
    result = subprocess.run(command, cwd=tmp_path, env=environment(), capture_output=True, text=True,
                            timeout=TIMEOUT, preexec_fn=limit_file_size(state_size // 3))
    assert_user_error(result, "could not write the checkpoint of step 12", "File too large",
                      f"Last good checkpoint: {checkpoint(out, 8)}")
    assert complete_steps(out) == [8, 4]
    assert not list((out / "checkpoints").glob("*.tmp")), "the partial checkpoint was left behind"
    assert (checkpoint(out, 8) / "state.pt").read_bytes() == before
    assert CheckpointDir(out / "checkpoints").verify(checkpoint(out, 8)) is None

    result = run(command, tmp_path)  # the disk has space again
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint(out, 8)}" in result.stdout
    steps = [r["step"] for r in finished_records(out)]
    assert steps == [0, *range(1, 13)]
    assert complete_steps(out) == [12, 8, 4]


def run_with_file_size_limit(command: list[str], cwd: Path, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=TIMEOUT, preexec_fn=limit_file_size(limit))


# Sizes the limits sit between (measured on the TINY run): plan.txt < 1,150 bytes (with its CPU estimate);
# config.yaml ≥ 1,200 bytes (it holds the paths too); a metrics record ≈ 250 bytes; the lock < 300 bytes.
@pytest.mark.parametrize(("limit", "file"), [(350, "plan.txt"), (1150, "config.yaml")],
                         ids=["plan", "config"])
def test_full_disk_while_recording_the_run_is_one_line_and_leaves_nothing(limit, file, tmp_path, data_dir):
    """A file-size limit below plan.txt (then config.yaml) fails their writes as a full disk does. Wrong if
    that is a traceback, leaves a `.tmp` (the issue: a 0-byte plan.txt.tmp) or a half-written file, or leaves
    a run directory behind for a run that never started."""
    out = tmp_path / "run"
    result = run_with_file_size_limit(train_command(out, data_dir, TINY), tmp_path, limit)
    assert_user_error(result, f"cannot write {out / file} (File too large)", "free disk space")
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_full_disk_while_appending_metrics_keeps_whole_lines_and_stops_in_one_line(tmp_path, data_dir):
    """A limit of 3,000 bytes is reached by metrics.jsonl first, in the middle of a record (~step 11), as a
    full disk writes what fits and then fails. Wrong if the run dies with a traceback, leaves a torn last
    line, or a rerun with space does not complete the run."""
    out = tmp_path / "run"
    command = train_command(out, data_dir, TINY, "train.max_steps=20", "train.ckpt_interval=100")
    result = run_with_file_size_limit(command, tmp_path, 3000)
    message = assert_user_error(result, "cannot append the record of step", "metrics.jsonl (File too large)",
                                "the file keeps its whole lines")
    failed = int(re.search(r"record of step (\d+)", message).group(1))
    assert [r["step"] for r in finished_records(out)] == list(range(failed)), "a torn or lost line"
    assert (out / "metrics.jsonl").read_bytes().endswith(b"\n")

    result = run(command, tmp_path)  # the disk has space again
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in finished_records(out)] == list(range(21))


def test_full_disk_while_logging_keeps_whole_lines_and_the_console(tmp_path):
    """train.log's handler under a 2,000-byte limit: wrong if the file gets a torn line, if the failure is a
    logging traceback ("--- Logging error ---") instead of one warning, or if the console stops logging."""
    log_file = tmp_path / "train.log"
    program = ("import logging, sys; from pathlib import Path; from gpt.run_dir import setup_logging; "
               "setup_logging(Path(sys.argv[1]), True); "
               "[logging.getLogger('test').info('line %03d %s', i, 'x' * 80) for i in range(60)]")
    result = subprocess.run([sys.executable, "-c", program, str(log_file)], cwd=REPO, env=environment(),
                            capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=limit_file_size(2000))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    console = result.stdout.splitlines()
    warnings = [line for line in console if line.startswith("warning: ")]
    assert warnings == [f"warning: cannot write {log_file} (File too large): the log continues on the "
                        "console only"], warnings
    assert console[-1] == f"line 059 {'x' * 80}", "the console stopped logging"
    lines = log_file.read_text().split("\n")
    assert lines[-1] == "" and 0 < len(lines) - 1 < 60, "a torn last line, or nothing was limited"
    assert all(line.endswith(f"line {i:03d} {'x' * 80}") for i, line in enumerate(lines[:-1]))
