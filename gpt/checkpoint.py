"""Checkpoints that cannot be half-read: written aside, verified by a manifest, renamed into place.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding the state file(s) and `manifest.json`, which
lists every file's size and SHA-256 and is written last. It is built under `step_XXXXXXXX.tmp/` and renamed
only when complete, so a kill or a full disk at any moment leaves the previous checkpoints untouched. Loading
verifies the manifest and falls back to the next newest checkpoint, with a warning, when it does not match.
Old checkpoints are pruned only after a new one is complete. Files are loaded with `weights_only=True`:
a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from data.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a temporary name, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointDir:
    """The `checkpoints/` folder of a run: save, find the newest complete one, prune."""

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep

    def _final(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete_steps(self) -> list[int]:
        """Steps of the checkpoints whose manifest exists (newest first); contents are checked on load."""
        steps = []
        for path in self.root.glob("step_*"):
            if path.is_dir() and not path.name.endswith(".tmp") and (path / MANIFEST).exists():
                try:
                    steps.append(int(path.name.removeprefix("step_")))
                except ValueError:
                    continue
        return sorted(steps, reverse=True)

    def staging(self, step: int) -> Path:
        return self.root / f"step_{step:08d}.tmp"

    def begin(self, step: int) -> Path:
        """A fresh staging directory for the checkpoint of `step` (on one rank; others write into it)."""
        tmp = self.staging(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, meta: dict[str, Any]) -> Path:
        """Seal the staged checkpoint with its manifest, rename it into place, then prune old ones."""
        final, tmp = self._final(step), self.staging(step)
        try:
            files = {}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                files[str(path.relative_to(tmp))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files, **meta}
            write_json_atomic(tmp / MANIFEST, manifest)
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def _prune(self) -> None:
        for step in self.complete_steps()[self.keep :]:
            shutil.rmtree(self._final(step), ignore_errors=True)

    def remove_partial(self) -> None:
        """Delete leftovers of interrupted saves (they are never loaded, but they take disk space)."""
        for path in self.root.glob("step_*.tmp"):
            shutil.rmtree(path, ignore_errors=True)

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint at `path` matches its manifest, else why not."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            return f"unreadable manifest ({e})"
        if manifest.get("format_version") != FORMAT_VERSION:
            return f"format version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        for name, expected in manifest.get("files", {}).items():
            file = path / name
            if not file.exists():
                return f"{name} is missing"
            if file.stat().st_size != expected["bytes"]:
                return f"{name} has {file.stat().st_size} bytes, manifest says {expected['bytes']}"
            if _sha256(file) != expected["sha256"]:
                return f"{name} fails its SHA-256 check"
        return None

    def newest_valid(self) -> Path | None:
        """The newest checkpoint that verifies; each one skipped is reported with the fallback."""
        for step in self.complete_steps():
            path = self._final(step)
            problem = self.verify(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is unusable (%s); falling back to an older one", path, problem)
        return None


def save_training_state(directory: Path, model: nn.Module, optimizer: Optimizer, extra: dict[str, Any],
                        sharded: bool, is_main: bool) -> None:
    """Model and optimizer state into `directory`: one `state.pt` written by rank 0, or (FSDP) one shard per
    rank through torch.distributed.checkpoint, which `scripts/export_checkpoint.py` merges into one file."""
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state, **extra}
        dcp.save(state, checkpoint_id=directory / SHARDED_DIR)
    elif is_main:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra},
                   directory / STATE_FILE)


def load_training_state(directory: Path, model: nn.Module, optimizer: Optimizer, extra: dict[str, Any],
                        sharded: bool, device: torch.device) -> dict[str, Any]:
    """Load what `save_training_state` wrote into model and optimizer; returns the `extra` entries."""
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (directory / SHARDED_DIR).is_dir():
            raise UserError(f"{directory} is a single-file checkpoint; resume it with train.strategy=ddp")
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state, **extra}
        dcp.load(state, checkpoint_id=directory / SHARDED_DIR)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return {k: state[k] for k in extra}
    if not (directory / STATE_FILE).is_file():
        raise UserError(f"{directory} is a sharded (FSDP) checkpoint; resume it with train.strategy=fsdp or "
                        "export it with scripts/export_checkpoint.py")
    state = torch.load(directory / STATE_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return {k: state[k] for k in extra if k in state}


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())
