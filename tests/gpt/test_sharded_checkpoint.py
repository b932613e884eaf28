"""Sharded (torch.distributed.checkpoint) checkpoints are data: a planted pickle never runs, at resume or
at export, even when the manifest's sizes and SHA-256 are recomputed to match it.

The checkpoints are written in one process (DCP needs no process group), exactly as the trainer writes an
FSDP checkpoint, through `save_training_state(sharded=True)` and `CheckpointDir.commit`. The attack is the
one a shared run directory invites: a `.metadata` (or a non-tensor value) replaced by a pickle whose
`__reduce__` calls `os.system`, which would create a marker file.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from gpt.checkpoint import CheckpointDir, load_training_state, save_training_state
from gpt.model import GPT, GPTConfig
from tests.planted import Planted, reseal
from tests.tiny_model import stepped

REPO = Path(__file__).resolve().parents[2]


def sharded_checkpoint(root: Path, scale: object = 2.0) -> Path:
    """A complete, manifest-sealed sharded checkpoint of step 1, its scaler's `scale` being `scale`."""
    model, optimizer = stepped()
    ckpts = CheckpointDir(root)
    staging = ckpts.begin(1)
    save_training_state(staging, model, optimizer, {"scaler": {"scale": scale}}, sharded=True, is_main=True)
    return ckpts.commit(1, {"config": {}})


def planted_metadata(tmp_path: Path, marker: Path) -> Path:
    checkpoint = sharded_checkpoint(tmp_path / "checkpoints")
    (checkpoint / "sharded" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    reseal(checkpoint)
    return checkpoint


def planted_value(tmp_path: Path, marker: Path) -> Path:
    return sharded_checkpoint(tmp_path / "checkpoints", scale=Planted(marker))  # a consistent manifest


@pytest.mark.parametrize("plant", [planted_metadata, planted_value], ids=["metadata", "byte-item"])
def test_planted_pickle_is_refused_at_resume_without_running(plant, tmp_path):
    """Wrong if resuming a sharded checkpoint unpickles an arbitrary object (the marker file appears) or
    fails with anything but one line saying the checkpoint was refused."""
    marker = tmp_path / "marker"
    checkpoint = plant(tmp_path, marker)
    assert CheckpointDir(checkpoint.parent).verify(checkpoint) is None  # the manifest cannot tell
    model, optimizer = stepped()
    with pytest.raises(UserError, match="refused unloaded") as caught:
        load_training_state(checkpoint, model, optimizer, {"scaler": {"scale": 0.0}}, sharded=True,
                            device=torch.device("cpu"))
    assert not marker.exists(), "the checkpoint ran code"
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("plant", [planted_metadata, planted_value], ids=["metadata", "byte-item"])
def test_planted_pickle_is_refused_by_the_export(plant, tmp_path):
    """Wrong if scripts/export_checkpoint.py runs a planted pickle or reports it with a traceback."""
    marker = tmp_path / "marker"
    checkpoint = plant(tmp_path, marker)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "export_checkpoint.py"), str(checkpoint),
                             "--out", str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert not marker.exists(), "the export ran code"
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused unloaded" in lines[0], lines
    assert not (tmp_path / "out.pt").exists()


def test_honest_sharded_checkpoint_still_loads_and_exports(tmp_path):
    """Wrong if the allow-list refuses what DCP itself writes, or the safe loading changes a value: the
    loaded and exported weights, optimizer moments and non-tensor values equal the saved ones."""
    checkpoint = sharded_checkpoint(tmp_path / "checkpoints")
    saved_model, saved_optimizer = stepped()
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5.0)
    model(torch.zeros(1, 8, dtype=torch.long))[0].sum().backward()
    optimizer.step()  # creates the state tensors the load fills
    extra = load_training_state(checkpoint, model, optimizer, {"scaler": {"scale": 0.0}}, sharded=True,
                                device=torch.device("cpu"))
    assert extra == {"scaler": {"scale": 2.0}}
    assert optimizer.param_groups[0]["lr"] == 1e-3
    for (name, tensor), expected in zip(model.state_dict().items(), saved_model.state_dict().values(),
                                        strict=True):
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)
    for state, expected in zip(optimizer.state.values(), saved_optimizer.state.values(), strict=True):
        torch.testing.assert_close(state["exp_avg_sq"], expected["exp_avg_sq"], rtol=0, atol=0)

    out = tmp_path / "model.pt"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "export_checkpoint.py"), str(checkpoint),
                             "--out", str(out), "--model-only"], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = torch.load(out, weights_only=True)
    for name, expected in saved_model.state_dict().items():
        torch.testing.assert_close(exported[name], expected, rtol=0, atol=0, msg=name)
