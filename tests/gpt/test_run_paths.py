"""Run folders that travel: a run moved to another path, with the commands called from another working
directory, still evaluates, samples and resumes; runs recorded with relative paths are read from the folder
they were started in; data that is missing is reported as missing."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from common.errors import UserError
from gpt.run_paths import resolve_recorded, start_folder, with_resolved_identity_paths
from gpt.trainer import train
from tests.hydra_compose import compose_train, tiny_overrides, train_resumed


def script(name: str, *args: object) -> None:
    importlib.import_module(f"gpt.cli.{name}").main([str(arg) for arg in args])


def test_start_folder_is_the_run_path_minus_its_relative_out_dir(tmp_path):
    """Wrong if an older run's relative records were read against anything but the folder it started in."""
    assert start_folder(tmp_path / "runs" / "a", "runs/a") == tmp_path
    assert start_folder(tmp_path / "runs" / "a", "./runs/a") == tmp_path
    assert start_folder(tmp_path / "moved", "runs/a") is None  # renamed: cannot be told
    assert start_folder(tmp_path / "runs" / "a", str(tmp_path / "runs" / "a")) is None  # absolute record


def test_relative_records_resolve_from_the_start_folder_then_the_working_directory(tmp_path, monkeypatch,
                                                                                   caplog):
    """Wrong if a relative data.dir of an older run were read against the working directory alone (the
    issue's "holds no prepared data" from another folder), or the reader did not say which folder it used."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    (start / "data_cache" / "d").mkdir(parents=True)
    (elsewhere / "only_here").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    config = {"out_dir": "runs/a", "data": {"dir": "data_cache/d"}}
    with caplog.at_level(logging.INFO, logger="gpt.run_paths"):
        found = resolve_recorded("data_cache/d", start / "runs" / "a", config, "data.dir")
    assert found == start / "data_cache" / "d"
    assert "the folder the run was started in" in caplog.text
    assert resolve_recorded("only_here", start / "runs" / "a", config, "x") == elsewhere / "only_here"
    assert resolve_recorded("/abs/path", start / "runs" / "a", config, "x") == Path("/abs/path")
    old = {"out_dir": "runs/a", "train": {"init_from": "data_cache/d"}}
    assert with_resolved_identity_paths(old, start / "runs" / "a")["train"]["init_from"] == str(
        start / "data_cache" / "d")
    assert old["train"]["init_from"] == "data_cache/d"  # the caller's record is not changed


def test_a_moved_run_evaluates_samples_and_resumes_from_another_folder(tmp_path, monkeypatch, capsys):
    """The issue's "Done when": wrong if any command read a path of the run relative to the working
    directory, or relative to where the run folder used to be."""
    start, other = tmp_path / "start", tmp_path / "other"
    start.mkdir(), other.mkdir()
    monkeypatch.chdir(start)  # relative out_dir and data.dir, as a user types them
    overrides = ["experiment=quickstart", "out_dir=runs/r", "data.dir=data_cache/bytes",
                 *tiny_overrides(4, 4), "schedule.decay_steps=8"]
    train(compose_train(overrides))
    recorded = yaml.safe_load((start / "runs" / "r" / "config.yaml").read_text())
    assert recorded["data"]["dir"] == str(start / "data_cache" / "bytes")
    assert recorded["out_dir"] == str(start / "runs" / "r")
    moved = tmp_path / "moved" / "run"
    moved.parent.mkdir()
    shutil.move(start / "runs" / "r", moved)
    monkeypatch.chdir(other)

    script("eval_loss", moved, "--json", other / "loss.json")
    records = [json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((other / "loss.json").read_text())["loss"] == pytest.approx(records[-1]["val_loss"],
                                                                                rel=1e-6)
    capsys.readouterr()
    script("sample", moved, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "1", "--no-stream")
    assert capsys.readouterr().out.startswith("ROMEO:")
    # The resume names no data.dir: the default (under this other folder) does not exist, and the run's own
    # record is used; the checkpoint's data fingerprint is still checked.
    resumed = ["experiment=quickstart", f"out_dir={moved}", *tiny_overrides(8, 4), "schedule.decay_steps=8"]
    assert train_resumed(resumed, from_step=4)["step"] == 8
    assert not (other / "data_cache").exists()

    shutil.rmtree(start / "data_cache")
    with pytest.raises(UserError, match=r"data folder .*bytes does not exist.*pass --data-dir"):
        script("eval_loss", moved)
