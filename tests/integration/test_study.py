"""A tiny study run end to end by `python scripts/study.py`: its report checked against the runs' own
metrics files, a kill in the middle and a rerun, a rerun of a finished study, and the Slurm path through
submitit's local executor, which must give the same numbers as the local launcher."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from gpt.study.local import usable_cores
from tests.gpt.study.tiny_study import TIMEOUT, TINY, environment, run_study, study_command, write_study

pytestmark = pytest.mark.slow


def finished_runs(run_root: Path) -> dict[tuple, dict]:
    """Every run under `run_root`, read from its own files: (optimizer, steps, lr, seed) -> final loss (inf
    when it diverged or never evaluated its last step) and its metrics file."""
    runs = {}
    for config_path in run_root.rglob("config.yaml"):
        run = config_path.parent
        config = yaml.safe_load(config_path.read_text())
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = config["train"]["max_steps"]
        final = [r["val_loss"] for r in records if r["step"] == steps and "val_loss" in r]
        loss = final[0] if final and final[0] is not None else math.inf
        key = (config["optim"]["name"], steps, config["optim"]["lr"], config["train"]["seed"])
        runs[key] = {"loss": loss, "metrics": run / "metrics.jsonl", "records": records}
    return runs


def without_cost(report: dict) -> dict:
    return {key: value for key, value in report.items() if key != "cost"}


@pytest.fixture(scope="module")
def study(tmp_path_factory, byte_data) -> dict:
    """The tiny study, run once without interruption (on the session's prepared sample)."""
    root = tmp_path_factory.mktemp("study")
    write_study(root / "configs", "tiny", TINY, byte_data)
    result = run_study(study_command(root / "configs", "tiny", root / "straight"), root)
    return {"root": root, "data": byte_data, "out": root / "straight", "stdout": result.stdout,
            "report": json.loads((root / "straight" / "study" / "report.json").read_text())}


def test_report_matches_the_runs_own_metrics(study):
    """Per optimizer and budget: the tuned lr is the seed-0 run with the lowest final loss among the three
    rates, the final loss is the mean ± standard error over the seeds at that lr, as read from each run's
    metrics.jsonl and config.yaml; the diverged Lion run is in the report as a result; with two budgets there
    is no fitted speed-up; the paper's target is the baseline's mean final loss."""
    runs = finished_runs(study["out"] / "runs")
    assert len(runs) == 16
    cells = study["report"]["models"]["gpt2_tiny"]["cells"]
    assert len(cells) == 4
    for cell in cells:
        name, steps = cell["optimizer"], cell["steps"]
        sweep = {lr: run["loss"] for (optim, s, lr, seed), run in runs.items()
                 if (optim, s, seed) == (name, steps, 0)}
        assert len(sweep) == 3
        best = min(sweep, key=sweep.get)
        assert cell["tuned"] == {"lr": best}
        losses = [runs[(name, steps, best, seed)]["loss"] for seed in (0, 1)]
        assert cell["final_loss_mean"] == pytest.approx(statistics.fmean(losses), abs=1e-12)
        assert cell["final_loss_sem"] == pytest.approx(statistics.stdev(losses) / math.sqrt(2), abs=1e-12)
        assert cell["speedup"]["value"] is None and "needs three" in cell["speedup"]["reason"]
        (baseline,) = [c for c in cells if c["optimizer"] == "adamw" and c["steps"] == steps]
        assert cell["paper_measure"]["target"] == pytest.approx(baseline["final_loss_mean"], abs=1e-12)
        if name == "lion":
            assert sweep[1e4] == math.inf and best != 1e4
            tuning = cell["tuning"][0]["losses"]
            assert {"value": 1e4, "final_loss": None} in tuning  # diverged: in the report, not chosen
    assert study["report"]["diverged_runs"] == 2  # Lion at 1e4, at both budgets
    events = [line.split()[0] for line in study["stdout"].splitlines() if line.startswith(("start", "done"))]
    assert events[:usable_cores()] == ["start"] * usable_cores()  # as many runs at once as cores
    markdown = (study["out"] / "study" / "report.md").read_text()
    assert "| lion | 4,096 tokens (16 steps" in markdown and "diverged" in markdown
    for figure in ("sensitivity_gpt2_tiny_lr.png", "loss_vs_tokens_gpt2_tiny.png"):
        assert (study["out"] / "study" / "figures" / figure).stat().st_size > 10_000


def test_rerun_of_a_finished_study_trains_nothing_and_reports_the_same(study):
    mtimes = {p: p.stat().st_mtime_ns for p in (study["out"] / "runs").rglob("metrics.jsonl")}
    result = run_study(study_command(study["root"] / "configs", "tiny", study["out"]), study["root"])
    assert not [line for line in result.stdout.splitlines() if line.startswith("start ")]
    assert "(16 runs, 0 started now)" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    report = json.loads((study["out"] / "study" / "report.json").read_text())
    assert without_cost(report) == without_cost(study["report"])


def test_killed_study_resumes_without_repeating_a_finished_run_and_reports_the_same(study, tmp_path):
    """SIGKILL the study once at least five runs have finished: its runs in progress get SIGTERM (they save
    and stop), the rerun finds the finished runs and leaves their files untouched, resumes the rest, and
    reports exactly what the uninterrupted study reported."""
    command = study_command(study["root"] / "configs", "tiny", tmp_path)
    with open(tmp_path / "first.txt", "w") as log:
        process = subprocess.Popen(command, cwd=study["root"], env=environment(), stdout=log,
                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while (tmp_path / "first.txt").read_text().count("done ") < 5:
            assert process.poll() is None, (tmp_path / "first.txt").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(TIMEOUT)
    while any((tmp_path / "runs").rglob(".lock")):  # its runs in progress save and stop
        assert time.monotonic() < deadline
        time.sleep(0.1)
    finished = {key: run for key, run in finished_runs(tmp_path / "runs").items()
                if math.isfinite(run["loss"])}
    assert 5 <= len(finished) < 16
    mtimes = {key: run["metrics"].stat().st_mtime_ns for key, run in finished.items()}
    results_before = len(finished) + sum(1 for _ in (tmp_path / "runs").rglob("diverged.txt"))
    result = run_study(command, study["root"])
    assert f"(16 runs, {16 - results_before} started now)" in result.stdout
    assert {key: finished[key]["metrics"].stat().st_mtime_ns for key in finished} == mtimes
    report = json.loads((tmp_path / "study" / "report.json").read_text())
    assert without_cost(report) == without_cost(study["report"])


def test_slurm_path_through_submitits_local_executor_gives_the_local_numbers(study, tmp_path):
    """launcher=slurm with submitit's local executor: each run a submitit job (an array per batch), its pickle
    and logs in the launcher's folder; the results equal the local launcher's bit for bit (same runs, same
    single thread)."""
    adamw_only = {**TINY, "budgets": TINY["budgets"][:1],
                  "optimizers": {"adamw": TINY["optimizers"]["adamw"]}}
    write_study(tmp_path / "configs", "tiny_slurm", adamw_only, study["data"])
    folder = tmp_path / "submitit"
    run_study(study_command(tmp_path / "configs", "tiny_slurm", tmp_path, "launcher=slurm",
                            "launcher.cluster=local", f"launcher.folder={folder}", "launcher.gpus_per_run=0",
                            "launcher.threads_per_run=1", "launcher.poll_s=0.2"), tmp_path)
    assert len(list(folder.glob("*_submitted.pkl"))) == 4 and list(folder.glob("*_result.pkl"))
    local, submitted = finished_runs(study["out"] / "runs"), finished_runs(tmp_path / "runs")
    assert len(submitted) == 4
    for key, run in submitted.items():
        assert run["records"] == local[key]["records"] or _same_losses(run["records"], local[key]["records"])
    report = json.loads((tmp_path / "study" / "report.json").read_text())
    cell = report["models"]["gpt2_tiny"]["cells"][0]
    straight = study["report"]["models"]["gpt2_tiny"]["cells"][0]
    assert cell["tuned"] == straight["tuned"] and cell["final_loss_mean"] == straight["final_loss_mean"]


def _same_losses(a: list[dict], b: list[dict]) -> bool:
    """The same losses at every step (timing fields aside)."""
    keys = ("step", "train_loss", "val_loss", "lr", "grad_norm")
    return [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]


def test_a_preempted_slurm_job_saves_stops_and_resumes_to_the_straight_result(study, tmp_path):
    """submitit's pre-emption hook (TrainJob.checkpoint, run from its signal handler) stops the trainer at a
    step boundary after a checkpoint and returns the same run to resubmit; running that resumes it to the
    loss the uninterrupted run reached."""
    from gpt.study.arms import resolve_arms, run_spec
    from gpt.study.schema import load_study
    from gpt.study.slurm import TrainJob

    long = {**TINY, "budgets": [{"tokens": 256 * 96}], "optimizers": {"adamw": TINY["optimizers"]["adamw"]}}
    node = {**yaml.safe_load(yaml.safe_dump(long)), "out_dir": str(tmp_path / "study"), "dry_run": False,
            "run_root": str(tmp_path / "runs"), "tuning_seed": 0, "max_rounds": 3, "tune_at": "every_budget",
            "final_lr_fraction": 0.05, "tokens_per_parameter": 20, "bootstrap_samples": 100,
            "confidence": 0.95}
    node["overrides"]["data"]["dir"] = str(study["data"])
    spec_study = load_study(node, "preempt")
    (arm,) = resolve_arms(spec_study)
    spec = run_spec(spec_study, arm, 0, (0,), 0)
    env = {"OMP_NUM_THREADS": "1"}
    os.environ.update(environment())
    job, result = TrainJob(), []
    worker = threading.Thread(target=lambda: result.append(job(spec, tmp_path / "job.log", env, 0)))
    worker.start()
    metrics = spec.out_dir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and '"step": 20' in metrics.read_text()):
        assert worker.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    resubmission = job.checkpoint(spec, tmp_path / "job.log", env, 0)
    worker.join(TIMEOUT)
    assert result == [None]  # stopped before its budget, to be resumed
    assert isinstance(resubmission.function, TrainJob) and resubmission.args[0] == spec
    outcome = resubmission.result()
    straight = run_spec(spec_study, arm, 0, (0,), 0)
    straight_root = tmp_path / "straight"
    node["run_root"] = str(straight_root)
    straight = run_spec(load_study(node, "preempt"), arm, 0, (0,), 0)
    assert TrainJob()(straight, tmp_path / "straight.log", env, 0).final_loss == outcome.final_loss
