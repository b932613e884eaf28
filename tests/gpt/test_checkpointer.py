"""Checkpoint saves written in the background (`train.async_checkpoint`), in one process: what they write,
when they are complete, and what becomes of a failed write. References are independent: a synchronous save
of the same state, `hashlib` over the files, and the tensors as they were at the save.

The background writer is held back by a gate in these tests, so that the training really changes the weights
before the copy is written (on a fast disk the write could otherwise end first and prove nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import gpt.checkpoint.storage
from common.errors import UserError
from gpt.checkpoint import CheckpointDir, hash_own_files
from gpt.checkpoint.checkpointer import Checkpointer
from gpt.config import ProtocolSettings
from gpt.distributed import Runtime
from gpt.model import GPT, GPTConfig

MAX_STEPS = 10
CONFIG = {"model": {"scale_attn_by_inverse_layer_idx": False},
          "protocol": dataclasses.asdict(ProtocolSettings())}


class Loop:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {"step": 0}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


def trained(seed: int = 0) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer)
    return model, optimizer


def train_step(model: GPT, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randint(0, 64, (2, 8))
    model(x, x)[1].backward()
    optimizer.step()
    optimizer.zero_grad()


def checkpointer(root: Path, model: GPT, optimizer: torch.optim.Optimizer, async_saves: bool,
                 loop: Loop | None = None) -> Checkpointer:
    return Checkpointer(root, Runtime(0, 0, 1, torch.device("cpu"), "single"), CONFIG, interval=2,
                        keep=3, max_steps=MAX_STEPS,
                        states={"model": model, "optimizer": optimizer,
                                "scaler": torch.amp.GradScaler("cpu", enabled=False)},
                        records={"loop": loop or Loop()},
                        evaluation_weights=contextlib.nullcontext, async_saves=async_saves)


@pytest.fixture
def gate(monkeypatch) -> threading.Event:
    """Holds every state-file write until the test sets the event (set again at the end, so none hangs)."""
    opened = threading.Event()
    write = gpt.checkpoint.storage.write_state_file

    def gated(state: dict[str, Any], path: Path) -> dict[str, Any]:
        assert opened.wait(60), "the gate was never opened"
        return write(state, path)

    monkeypatch.setattr(gpt.checkpoint.storage, "write_state_file", gated)
    yield opened
    opened.set()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_background_save_holds_the_state_of_its_step_and_resumes_it_exactly(tmp_path, gate):
    """A background save returns before writing, the training then changes every weight and moment, and the
    checkpoint still holds the state at the save: byte for byte the file a synchronous save of that state
    writes, with manifest digests equal to an independent SHA-256 of each file, and a resume restores those
    tensors exactly. Wrong if the background wrote live tensors (a torn mix of two steps), hashed something
    other than what is on disk, or committed before the write ended."""
    model, optimizer = trained()
    gate.set()
    checkpointer(tmp_path / "sync", model, optimizer, async_saves=False).save(2)
    gate.clear()
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    saving = checkpointer(tmp_path / "async", model, optimizer, async_saves=True)
    saving.save(2)
    assert CheckpointDir(tmp_path / "async").complete_steps() == [], "complete before it was written"
    train_step(model, optimizer)  # changes the live tensors while the copy waits to be written
    assert not torch.equal(model.state_dict()["lm_head.weight"], expected["lm_head.weight"])
    gate.set()
    saving.wait()

    sync, background = tmp_path / "sync" / "step_00000002", tmp_path / "async" / "step_00000002"
    assert (background / "state.pt").read_bytes() == (sync / "state.pt").read_bytes()
    for directory in (sync, background):
        files = json.loads((directory / "manifest.json").read_text())["files"]
        on_disk = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.name != "manifest.json"}
        assert files.keys() == on_disk
        for name, entry in files.items():
            path = directory / name
            assert entry == {"bytes": path.stat().st_size, "sha256": sha256_of(path)}

    fresh, fresh_optimizer = trained(seed=1)
    assert checkpointer(tmp_path / "async", fresh, fresh_optimizer, async_saves=True).resume()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_failed_background_write_is_raised_at_the_next_save(tmp_path, monkeypatch):
    """A background write that fails (here: a full disk) is not lost: the next save stops the run with the
    step, the cause and the last good checkpoint, the partial files are removed, and the previous checkpoint
    is intact. Wrong if training went on past a save that silently never happened."""
    model, optimizer = trained()
    saving = checkpointer(tmp_path, model, optimizer, async_saves=True)
    saving.save(2)
    saving.wait()
    write = gpt.checkpoint.storage.write_state_file

    def full_disk(state: dict[str, Any], path: Path) -> dict[str, Any]:
        write(state, path)  # the file is written, then the disk is full: a partial checkpoint is left
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gpt.checkpoint.storage, "write_state_file", full_disk)
    saving.save(4)
    with pytest.raises(UserError, match=r"could not write the checkpoint of step 4 \(OSError: \[Errno 28\] "
                                        r"No space left on device\).*Last good checkpoint: .*step_00000002"):
        saving.save(6)
    assert CheckpointDir(tmp_path).complete_steps() == [2]
    assert not list(tmp_path.glob("*.tmp"))
    assert CheckpointDir(tmp_path).verify(tmp_path / "step_00000002") is None


@pytest.mark.parametrize("why", ["stop signal", "last step"])
def test_stop_and_final_saves_are_complete_when_save_returns(tmp_path, gate, why):
    """With background saves on, the save for a stop signal and the one at max_steps are still written before
    `save` returns (a pre-emption's grace period ends the process right after), and they wait for an earlier
    background save first. Wrong if either returned with the checkpoint still being written."""
    model, optimizer = trained()
    saving = checkpointer(tmp_path, model, optimizer, async_saves=True)
    saving.save(2)
    gate.set()  # the background save of step 2 may now finish; the next save waits for it
    if why == "stop signal":
        saving.save(3, stopping=True)
    else:
        saving.save(MAX_STEPS)
    done = MAX_STEPS if why == "last step" else 3
    assert CheckpointDir(tmp_path).complete_steps() == [done, 2]


def test_every_sharded_file_is_hashed_by_exactly_one_rank(tmp_path):
    """Under FSDP each rank hashes its share of the files: together the ranks cover every file once, each rank
    takes the shards it wrote, and the entries equal an independent SHA-256. Wrong if a file went unhashed
    (it would be unverified), were hashed twice, or a rank read another's shard while its own waited."""
    directory = tmp_path / "sharded"
    directory.mkdir()
    for i, name in enumerate(["__0_0.distcp", "__1_0.distcp", "__1_1.distcp", "__2_0.distcp", ".metadata"]):
        (directory / name).write_bytes(bytes([i]) * (100 + i))
    shares = [hash_own_files(directory, rank, 2) for rank in range(2)]
    assert not shares[0].keys() & shares[1].keys()
    assert {"sharded/__0_0.distcp"} <= shares[0].keys()
    assert {"sharded/__1_0.distcp", "sharded/__1_1.distcp"} <= shares[1].keys()
    merged = shares[0] | shares[1]
    assert merged.keys() == {f"sharded/{p.name}" for p in directory.iterdir()}
    for name, entry in merged.items():
        path = tmp_path / name
        assert entry == {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
