"""Checkpoints that cannot be half-read: written aside, verified by a manifest, renamed into place.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` holding the state file(s) and `manifest.json`, which
lists every file's size and SHA-256 and is written last. The digests are taken by the ranks that wrote the
files, a single file's while it is written, so no rank reads the whole checkpoint back. It is built under
`step_XXXXXXXX.tmp/` and renamed only when complete, so a kill or a full disk at any moment leaves the
previous checkpoints untouched. Loading verifies the manifest and falls back to the next newest checkpoint,
with a warning, when it does not match. Old checkpoints are pruned only after a new one is complete, and only
those older than it: a newer one that failed verification is replaced when the run reaches its step again, so
the run directory always keeps the checkpoint it just wrote. Removal renames to a `.tmp` name first, so an
interrupted prune leaves no half-deleted directory that looks complete. Files are read as data by one policy
(`safe_loading`): a checkpoint holding anything else is damaged, and skipped like one whose hash fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.optim import Optimizer

from common.errors import UserError
from common.files import fsync_path, write_atomic
from gpt.checkpoint.safe_loading import DamagedCheckpoint, load_state_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
log = logging.getLogger(__name__)
T = TypeVar("T")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest entry of a complete file (made durable first): its size and SHA-256."""
    fsync_path(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


class _HashingFile:
    """A write-only file that hashes what passes through it, so that a file's digest costs no second read."""

    def __init__(self, file: Any) -> None:
        self.file, self.digest, self.bytes = file, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.digest.update(data)
        self.bytes += memoryview(data).nbytes
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


class CheckpointDir:
    """The `checkpoints/` folder of a run: save, find the newest complete one, prune."""

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep
        self.unusable: dict[Path, str] = {}  # checkpoints found damaged (hash, format or content) and why
        self._reported: set[Path] = set()

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

    def commit(self, step: int, meta: dict[str, Any], files: dict[str, dict[str, Any]] | None = None) -> Path:
        """Seal the staged checkpoint with its manifest, rename it into place, then prune old ones.

        `files` are the entries the writers took (`file_entry`, `write_state_file`), which must name every
        staged file with its size; None hashes them here."""
        final, tmp = self._final(step), self.staging(step)
        try:
            staged = {str(p.relative_to(tmp)): p for p in sorted(tmp.rglob("*")) if p.is_file()}
            if files is None:
                files = {name: file_entry(path) for name, path in staged.items()}
            if staged.keys() != files.keys():
                raise OSError(f"the files staged in {tmp} ({', '.join(staged) or 'none'}) are not those "
                              f"written and hashed ({', '.join(files) or 'none'})")
            for name, path in staged.items():
                if path.stat().st_size != files[name]["bytes"]:
                    raise OSError(f"{path} has {path.stat().st_size} bytes, its writer wrote "
                                  f"{files[name]['bytes']}")
            files = dict(sorted(files.items()))
            manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files, **meta}
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            if final.exists():  # one that failed verification, reached again after the fallback
                self._remove(step)
            os.replace(tmp, final)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(step)
        return final

    def discard(self, step: int) -> None:
        """Remove the staging directory of a save that failed (e.g. on a full disk)."""
        shutil.rmtree(self.staging(step), ignore_errors=True)

    def _remove(self, step: int) -> None:
        """Rename out of the complete set first: a kill during rmtree leaves only a `.tmp` leftover."""
        doomed = self.root / f"step_{step:08d}.removing.tmp"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(self._final(step), doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self, newest: int) -> None:
        for step in [s for s in self.complete_steps() if s <= newest][self.keep :]:
            self._remove(step)

    def remove_partial(self) -> None:
        """Delete leftovers of interrupted saves and prunes (never loaded, but they take disk space)."""
        for path in self.root.glob("step_*.tmp"):
            shutil.rmtree(path, ignore_errors=True)

    def last_complete(self) -> str:
        """The newest checkpoint with a manifest, for error messages: a path, or a sentence saying none."""
        steps = self.complete_steps()
        return str(self._final(steps[0])) if steps else "none (no checkpoint was completed yet)"

    def verify(self, path: Path) -> str | None:
        """None if the checkpoint at `path` matches its manifest, else why not."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            return f"unreadable manifest ({e})"
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            version = manifest.get("format_version") if isinstance(manifest, dict) else None
            return f"format version {version!r}, expected {FORMAT_VERSION}"
        named_step = path.name.removeprefix("step_")
        if named_step.isdigit() and manifest.get("step") != int(named_step):
            return f"its manifest is for step {manifest.get('step')!r}"
        files = manifest.get("files")
        if not isinstance(files, dict) or not any(
            name == STATE_FILE or name.startswith(SHARDED_DIR + "/") for name in files
        ):
            return "its manifest lists no model state"
        for name, expected in files.items():
            file = path / name
            if not isinstance(expected, dict) or not {"bytes", "sha256"} <= expected.keys():
                return f"its manifest entry for {name} has no size and checksum"
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != expected["bytes"]:
                return f"{name} has {file.stat().st_size} bytes, manifest says {expected['bytes']}"
            if sha256_file(file) != expected["sha256"]:
                return f"{name} fails its SHA-256 check"
        return None

    def newest_valid(self) -> Path | None:
        """The newest checkpoint that verifies and is not known damaged; each one skipped is reported once,
        with the one used instead."""
        skipped = []
        for step in self.complete_steps():
            path = self._final(step)
            problem = self.unusable[path] if path in self.unusable else self.verify(path)
            if problem is None:
                self._report(skipped, f"falling back to {path.name}")
                return path
            self.unusable[path] = problem
            skipped.append(path)
        self._report(skipped, "no older checkpoint verifies")
        return None

    def _report(self, skipped: list[Path], outcome: str) -> None:
        for path in skipped:
            if path not in self._reported:
                self._reported.add(path)
                log.warning("checkpoint %s is unusable (%s); %s", path, self.unusable[path], outcome)

    def mark_unusable(self, path: Path, problem: str) -> None:
        """A checkpoint that verified but did not load (a `DamagedCheckpoint`): skipped from now on."""
        self.unusable[path] = problem

    def newest_loadable(self, load: Callable[[Path], T]) -> tuple[Path, T] | None:
        """The newest checkpoint that verifies and that `load` reads without finding it damaged, and what
        `load` returned; a damaged one is reported and the next older one tried, as for a bad hash."""
        while (path := self.newest_valid()) is not None:
            try:
                return path, load(path)
            except DamagedCheckpoint as e:
                self.mark_unusable(path, str(e))
        return None

    def resume_point(self) -> Path | None:
        """The checkpoint to resume from; None for a fresh run. Checkpoints that all fail verification are
        an error, not a fresh start: retraining from step 0 over them would hide the damage."""
        path = self.newest_valid()
        if path is None and self.complete_steps():
            raise UserError(f"no checkpoint in {self.root} verifies and loads (see the warnings above); move "
                            "them away to start the run over")
        return path


def first_nonfinite(model: nn.Module, optimizer: Optimizer) -> str | None:
    """The name of a weight or optimizer-state tensor holding NaN or inf on this rank (its local shard under
    FSDP), or None when all are finite: a checkpoint of such state would resume into garbage."""
    named = [(f"weight {name}", tensor) for name, tensor in model.state_dict().items()]
    names = {id(p): name for name, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        named += [(f"optimizer state {key} of {names.get(id(param), '?')}", value)
                  for key, value in state.items()]
    named = [(name, t.to_local() if hasattr(t, "to_local") else t) for name, t in named
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    # The largest magnitude is finite iff every element is (NaN propagates): one pass, no mask allocated.
    largest = [torch.linalg.vector_norm(t, float("inf")).float() for _, t in named]
    if not named or bool(torch.isfinite(torch.stack(largest)).all()):
        return None
    return next(name for (name, _), value in zip(named, largest, strict=True) if not torch.isfinite(value))


def write_state_file(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """torch.save `state` to `path`, durably; returns its manifest entry, hashed while it was written."""
    with open(path, "wb") as f:
        hashing = _HashingFile(f)
        try:
            torch.save(state, hashing)
        except RuntimeError as e:  # torch reports a failed write (e.g. a full disk) as RuntimeError
            if isinstance(e.__context__, OSError):
                raise e.__context__ from e
            raise
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": hashing.bytes, "sha256": hashing.digest.hexdigest()}


def hash_own_files(directory: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Manifest entries of this rank's files under `directory` (names relative to its parent), once every
    rank's writes are complete: the shards it wrote itself (DCP names them `__<rank>_<n>`) and, on rank 0
    (DCP's coordinator), every other file (`.metadata`). Every file is hashed by exactly one rank, and each
    hashes only files it wrote, which a shared filesystem shows it without delay."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    writers = [int(m.group(1)) if (m := re.match(r"__(\d+)_", p.name)) else None for p in files]
    mine = [p for p, writer in zip(files, writers, strict=True)
            if writer == rank or (rank == 0 and (writer is None or writer >= world_size))]
    return {str(p.relative_to(directory.parent)): file_entry(p) for p in mine}


def _sharded_state(model: nn.Module, optimizer: Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state, **extra}


def save_training_state(directory: Path, model: nn.Module, optimizer: Optimizer, extra: dict[str, Any],
                        sharded: bool, is_main: bool) -> dict[str, dict[str, Any]]:
    """Model and optimizer state into `directory`: one `state.pt` written by rank 0, or (FSDP) one shard per
    rank through torch.distributed.checkpoint, which `scripts/export_checkpoint.py` merges into one file.
    Returns the manifest entries of the files this rank hashed (gather every rank's for the manifest)."""
    return start_training_state_save(directory, model, optimizer, extra, sharded, is_main, background=False)()


def start_training_state_save(directory: Path, model: nn.Module, optimizer: Optimizer, extra: dict[str, Any],
                              sharded: bool, is_main: bool, background: bool = True,
                              group: Any = None) -> Callable[[], dict[str, dict[str, Any]]]:
    """Begin `save_training_state`; the function returned completes it and returns what it returns.

    With `background`, the state is first copied to CPU memory (what DCP's `async_save` and its stager do),
    so the training may change it while the returned function writes the copy, in another thread; under FSDP
    that write's own collectives run on `group`, a process group apart from the training's (a CPU one)."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if sharded:
        import torch.distributed.checkpoint as dcp

        target = directory / SHARDED_DIR
        state = _sharded_state(model, optimizer, extra)
        written = dcp.async_save(state, checkpoint_id=target, process_group=group) if background else None

        def finish_sharded() -> dict[str, dict[str, Any]]:
            if written is None:
                dcp.save(state, checkpoint_id=target)
            else:
                written.result()  # async_save staged the state before returning; this waits for the write
            return hash_own_files(target, rank, world)

        return finish_sharded
    if not is_main:
        return dict
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}
    if background:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                              use_async_staging=False, use_non_blocking_copy=False))
        try:
            state = stager.stage(state)  # a deep copy on CPU that keeps shared storages shared (tied weights)
        finally:
            stager.close()
    return lambda: {STATE_FILE: write_state_file(state, directory / STATE_FILE)}


def load_training_state(directory: Path, model: nn.Module, optimizer: Optimizer, extra: dict[str, Any],
                        sharded: bool, device: torch.device) -> dict[str, Any]:
    """Load what `save_training_state` wrote into model and optimizer; returns the `extra` entries.

    `sharded` is whether this run is FSDP-sharded. A sharded checkpoint loads into any layout: DCP reshards
    it to this run's ranks, whether FSDP on another number of ranks, DDP or one process (`model` is the
    unwrapped module). A single-file checkpoint loads into one process or DDP on any number of ranks, not
    into FSDP."""
    if (directory / SHARDED_DIR).is_dir():
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from gpt.checkpoint.safe_loading import load_into

        state = _sharded_state(model, optimizer, extra)
        load_into(state, directory / SHARDED_DIR)  # never unpickles code
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return {k: state[k] for k in extra}
    if sharded:
        raise UserError(f"{directory} is a single-file checkpoint (written by one process or DDP), which "
                        "cannot be resumed sharded; resume it with train.strategy=ddp (any number of ranks) "
                        "or as one process")
    path = directory / STATE_FILE
    state = load_state_file(path, ("model", "optimizer"), map_location=device)
    with _as_damage(path):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    return {k: state[k] for k in extra if k in state}


@contextlib.contextmanager
def _as_damage(path: Path) -> Iterator[None]:
    """A state that loads as data but does not fit this run's model and optimizer (whose config matches the
    checkpoint's): the file is not what its checkpoint says, a damaged checkpoint."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpoint(f"{path} does not fit this model and optimizer ({first})") from None


def load_model_weights(directory: Path, model: nn.Module) -> None:
    """Load only the model weights of a checkpoint of either format into a plain (unwrapped) model in one
    process, for evaluation and export: a sharded checkpoint's shards are merged, its optimizer state is not
    read, and a single-file one is memory-mapped rather than read whole."""
    if (directory / SHARDED_DIR).is_dir():
        # Tied weights are asked for once: the tensors are filled in place, so one name fills both.
        weights, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() not in seen:
                weights[name] = tensor
                seen.add(tensor.data_ptr())
        from gpt.checkpoint.safe_loading import load_into

        load_into({"model": weights}, directory / SHARDED_DIR)  # only the keys named; never unpickles code
    else:
        path = directory / STATE_FILE
        state = load_state_file(path, ("model",), mmap=True)
        with _as_damage(path):
            model.load_state_dict(state["model"])


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())
