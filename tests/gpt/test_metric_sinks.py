"""The loggers beside metrics.jsonl: wandb honours its WANDB_* environment and fails in one line leaving no
run behind; TensorBoard event files and the CSV file hold exactly the records of metrics.jsonl, across a
resume that redoes steps."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from gpt.metric_sinks import CSV_FILE, TENSORBOARD_DIR, WandbSink
from gpt.metrics import read_metrics
from gpt.trainer import train
from tests.hydra_compose import compose_train, run_train_py, tiny_run


class FakeWandb:
    """Records what wandb.init is given."""

    def __init__(self) -> None:
        self.kwargs: dict = {}

    def init(self, **kwargs):
        self.kwargs = kwargs
        return SimpleNamespace(id="fake")


def test_wandb_gets_only_what_the_config_sets_and_no_variable_overrides(tmp_path, monkeypatch):
    """Wrong if a null wandb.mode were passed (WANDB_MODE would be overridden: the issue's traceback), or a
    set WANDB_PROJECT / WANDB_DIR lost to the config's default."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for variable in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "WANDB_MODE"):
        monkeypatch.delenv(variable, raising=False)
    settings = SimpleNamespace(project="sophia-gpt", name=None, mode=None)
    WandbSink(settings, {}, None, tmp_path)
    assert "mode" not in fake.kwargs and "name" not in fake.kwargs
    assert fake.kwargs["project"] == "sophia-gpt" and fake.kwargs["dir"] == str(tmp_path)
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    WandbSink(SimpleNamespace(project="sophia-gpt", name="n", mode="offline"), {}, "id1", tmp_path)
    assert "project" not in fake.kwargs and "dir" not in fake.kwargs
    assert (fake.kwargs["mode"], fake.kwargs["name"], fake.kwargs["id"]) == ("offline", "n", "id1")


def test_wandb_offline_from_the_environment_writes_an_offline_run(tmp_path, byte_data, monkeypatch):
    """The issue's "Done when": `WANDB_MODE=offline python train.py ... wandb.enabled=true`. Wrong if the
    config's mode overrode the variable (an online run needing an API key)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "run"
    assert run_train_py(tiny_run(out, byte_data, "wandb.enabled=true", steps=2, interval=2)) == 0
    assert list((out / "wandb").glob("offline-run-*")), list((out / "wandb").iterdir())
    assert yaml.safe_load((out / "config.yaml").read_text())["wandb"]["mode"] is None


def test_a_wandb_that_cannot_start_is_one_line_and_leaves_no_run(tmp_path, byte_data, monkeypatch, capsys):
    """Wrong if the failure were a traceback, or left a run directory holding only config, plan and log
    (which a rerun would take for a run)."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb keeps the settings it read first (an earlier test's WANDB_MODE) per process
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc key
    for variable in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(variable, raising=False)
    out = tmp_path / "run"
    assert run_train_py(tiny_run(out, byte_data, "wandb.enabled=true", steps=2, interval=2)) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert [line for line in errors if line.startswith("error:")] == errors[-1:]
    assert "wandb could not start" in errors[-1] and "WANDB_MODE=offline" in errors[-1]
    assert "Traceback" not in "\n".join(errors)
    assert not out.exists() or not any(out.iterdir())


def tensorboard_series(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_and_csv_hold_the_records_of_metrics_jsonl_across_a_resume(tmp_path, byte_data):
    """Wrong if a logger dropped, duplicated or altered a record, or kept the steps of a session that the
    resume redid (the newest checkpoint is removed, so steps 5-8 are trained twice)."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    overrides = tiny_run(out, byte_data, "tensorboard.enabled=true", "csv.enabled=true")
    train(compose_train(overrides))
    shutil.rmtree(out / "checkpoints" / "step_00000008")
    train(compose_train(overrides))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(9))

    with open(out / CSV_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert set(row) >= set(record)
        for key, cell in row.items():
            value = record.get(key)
            expected = "" if value is None else str(value)
            assert cell == expected, (key, cell, value)

    series = tensorboard_series(out / TENSORBOARD_DIR)
    for key in ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "elapsed_s"):
        expected = {r["step"]: r[key] for r in records if r.get(key) is not None}
        assert set(series[key]) == set(expected), key
        for step, value in expected.items():
            assert series[key][step] == pytest.approx(value, rel=1e-6), (key, step)
