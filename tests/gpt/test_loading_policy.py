"""One loader policy for every file a run or a tool reads: an object a checkpoint may not hold is damage (a
warning and the previous checkpoint, as for a bad hash, where there is one; else one line), never a
traceback, never torch's advice to load with weights_only=False. Sharded checkpoints:
tests/gpt/test_sharded_checkpoint.py; a resume under train.py: the planted-pickle case of
tests/integration/test_faults.py::test_damaged_newest_checkpoint_falls_back_with_a_warning."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from gpt.checkpoint import load_state_file
from gpt.eval.pretrained import load_checkpoint, load_pretrained
from gpt.trainer import train
from tests.hydra_compose import compose_train, tiny_run
from tests.planted import Planted, plant_state_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory, byte_data) -> Path:
    """The tiny run, 8 steps, checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("policy") / "run"
    train(compose_train(tiny_run(out, byte_data)))
    return out


@pytest.fixture
def planted_run(run, tmp_path) -> tuple[Path, Path]:
    """A copy of the run whose newest state.pt names code (manifest resealed), and the marker it makes."""
    copy, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(run, copy)
    plant_state_file(copy / "checkpoints" / "step_00000008", marker)
    return copy, marker


def test_evaluating_a_run_skips_a_planted_checkpoint_for_the_previous_one(planted_run, run, caplog):
    """Wrong if the pickle runs, if the evaluation fails instead of falling back, or falls back silently."""
    copy, marker = planted_run
    with caplog.at_level(logging.WARNING):
        loaded = load_checkpoint(copy)
    assert not marker.exists(), "the checkpoint ran code"
    assert loaded.source == str(copy / "checkpoints" / "step_00000004")
    reference = torch.load(run / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(tensor, reference[name]) for name, tensor in loaded.model.state_dict().items())
    warning = caplog.messages[-1]
    assert warning.startswith(f"checkpoint {copy / 'checkpoints' / 'step_00000008'} is unusable (")
    assert "the object posix.system" in warning and "falling back to step_00000004" in warning
    assert "weights_only" not in warning and "\n" not in warning


def test_a_planted_checkpoint_named_directly_is_one_line(planted_run):
    copy, marker = planted_run
    with pytest.raises(UserError) as refused:
        load_checkpoint(copy / "checkpoints" / "step_00000008")
    message = str(refused.value)
    assert not marker.exists() and "\n" not in message and "weights_only" not in message
    assert "holds the object posix.system, which is not checkpoint data: refused unloaded" in message


def test_exporting_a_run_falls_back_and_a_planted_checkpoint_is_one_line(planted_run, tmp_path):
    """scripts/export_checkpoint.py: wrong if it runs the pickle, shows a traceback, or exports the damaged
    checkpoint."""
    copy, marker = planted_run
    env = dict(os.environ, PYTHONPATH=str(REPO))
    export = [sys.executable, str(REPO / "scripts" / "export_checkpoint.py")]
    result = subprocess.run([*export, str(copy), "--out", str(tmp_path / "run.pt")], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported {copy / 'checkpoints' / 'step_00000004'}" in result.stdout
    result = subprocess.run([*export, str(copy / "checkpoints" / "step_00000008"), "--out",
                             str(tmp_path / "step8.pt")], capture_output=True, text=True, timeout=300,
                            env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "refused unloaded" in lines[0], result.stderr
    assert not marker.exists() and not (tmp_path / "step8.pt").exists()


def test_a_hugging_face_folder_whose_weights_name_code_is_one_line(tmp_path):
    """A pytorch_model.bin naming code in a Hugging Face folder (transformers loads it weights-only): wrong
    if that is an UnpicklingError traceback advising weights_only=False."""
    transformers = pytest.importorskip("transformers")
    folder, marker = tmp_path / "hf", tmp_path / "marker"
    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32).save_pretrained(folder)
    torch.save({"transformer.wte.weight": Planted(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError) as refused:
        load_pretrained(str(folder))
    message = str(refused.value)
    assert not marker.exists() and "\n" not in message and "weights_only" not in message
    assert "hold the object posix.system, which is not weight data: refused unloaded" in message


@pytest.mark.parametrize("content", [b"not a torch file", None], ids=["garbage", "a-list"])
def test_a_state_file_that_is_not_a_training_state_is_damage(content, tmp_path):
    """Wrong if a foreign file (its manifest matching) gives a traceback instead of a damaged checkpoint."""
    path = tmp_path / "state.pt"
    if content is None:
        torch.save([1, 2], path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=r"not a readable torch file \(|holds no model, optimizer \(a list"):
        load_state_file(path, ("model", "optimizer"))


def test_eval_loss_on_a_missing_run_names_the_missing_path(tmp_path):
    """The issue: `eval_loss.py /nonexistent/run` asked for --data-dir without saying the run is missing."""
    missing = tmp_path / "nonexistent" / "run"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "eval_loss.py"), str(missing)],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {missing} does not exist (and is no Hugging Face hub name either): pass a run directory, a "
        "checkpoint, a Hugging Face model folder or hub name"], result.stderr
