"""The trainer's checkpoint component: when a save is due, a save every rank takes part in, and the resume.

What is saved are the run's stateful parts: the model and optimizer (one `state.pt`, or one shard per rank
under FSDP) at the optimizer's evaluation weights (schedule-free: the average), the gradient scaler, and the
loop's own state (step, elapsed time, recent losses, skip streak, wandb id), which is small and the same on
every rank and so goes into the manifest next to the config and the identity of the data trained on. The
on-disk format, its verification and pruning are `gpt.checkpoint.storage`'s.

With `async_saves`, a periodic save copies the state to CPU memory and returns; a background thread writes
the copy, hashes it (each rank its own files) and commits it, so a checkpoint becomes complete only once
written. The next save, and the end of the run, wait for it and raise its failure. A save for a stop signal
and the final one are written before the run goes on or ends.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

from common.errors import UserError
from gpt.checkpoint.safe_loading import DamagedCheckpoint
from gpt.checkpoint.storage import (
    CheckpointDir,
    first_nonfinite,
    load_training_state,
    read_manifest,
    start_training_state_save,
)
from gpt.distributed import Runtime
from gpt.run_identity import check_compatible, check_same_data
from gpt.run_paths import with_resolved_identity_paths

log = logging.getLogger(__name__)
T = TypeVar("T")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# Manifests written before the loop state held its step, elapsed time and wandb id kept them at the top level.
_LOOP_KEYS_ONCE_AT_TOP = ("step", "elapsed_s", "wandb_id")


class Checkpointer:
    """Saves every `interval` steps, at `max_steps` and when the run is asked to stop; resumes the newest
    checkpoint that verifies and was written by the same experiment (`config`) on the same data.

    `states` name the parts saved in the state file: "model" and "optimizer" (sharded under FSDP) and any
    others; `records` name the small parts saved in the manifest. `evaluation_weights` is a context in which
    the model holds the weights a checkpoint stores (leaving it switches back to the training weights);
    `data_identity` says what data the run trains on; `async_saves` writes periodic saves in the
    background."""

    def __init__(self, root: Path, runtime: Runtime, config: dict[str, Any], *, interval: int, keep: int,
                 max_steps: int, states: Mapping[str, Stateful], records: Mapping[str, Stateful],
                 evaluation_weights: Callable[[], contextlib.AbstractContextManager],
                 async_saves: bool = False) -> None:
        self.dir = CheckpointDir(root, keep=keep)
        self.rt, self.config = runtime, config
        self.interval, self.max_steps = interval, max_steps
        self.model, self.optimizer = states["model"], states["optimizer"]
        self.others = {name: part for name, part in states.items() if name not in ("model", "optimizer")}
        self.records = dict(records)
        self.evaluation_weights = evaluation_weights
        self.sharded = runtime.strategy == "fsdp"
        self.data_identity: dict[str, Any] | None = None  # set once the data is open
        self.async_saves = async_saves
        self._group: Any = None  # the CPU process group of background sharded writes, made at the first
        self._pending: _BackgroundSave | None = None

    def due(self, step: int, stopping: bool) -> bool:
        """Whether the state after `step` optimizer steps is to be saved."""
        return step % self.interval == 0 or step == self.max_steps or stopping

    def last_complete(self) -> str:
        """The newest complete checkpoint, once a save in the background has ended (this rank only)."""
        if self._pending is not None:
            self._pending.join()
        return self.dir.last_complete()

    # ------------------------------------------------------------------------------------------ resume

    def resume(self) -> bool:
        """Load the newest complete checkpoint (rank 0 chooses, all ranks load) into the stateful parts;
        False for a fresh run. Leftovers of interrupted saves are removed first. A checkpoint that verifies
        but does not load as a training state (an object not allowed, a foreign state: `DamagedCheckpoint`)
        on any rank is skipped with a warning, as for a bad hash, and the next older one is tried."""
        self.rt.on_main(self.dir.remove_partial)
        while True:
            path, manifest = self.rt.on_main(self._resume_point)
            if path is None:
                return False
            problem = self._load(path)
            if problem is None:
                break
            self.rt.on_main(functools.partial(self.dir.mark_unusable, path, problem))
        for name, part in self.records.items():
            record = manifest[name]
            if name == "loop" and "step" not in record:
                record = {**record, **{key: manifest[key] for key in _LOOP_KEYS_ONCE_AT_TOP}}
            part.load_state_dict(record)
        log.info("resumed from %s (step %d)", path, manifest["step"])
        return True

    def _load(self, path: Path) -> str | None:
        """Load the checkpoint at `path` into the stateful parts on every rank; None, or why it is damaged
        (on this rank or another: every rank agrees)."""
        problem = None
        try:
            with self.evaluation_weights():  # a checkpoint holds them; leaving switches to the training ones
                others = load_training_state(path, self.model, self.optimizer, self._other_states(),
                                             self.sharded, self.rt.device)
            for name, part in self.others.items():
                part.load_state_dict(others[name])
        except DamagedCheckpoint as e:
            problem = str(e)
        if self.rt.all_ranks(problem is None):
            return None
        return problem or "it does not load on another rank"

    def _other_states(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.others.items()}

    def _resume_point(self) -> tuple[Path | None, dict[str, Any]]:
        """Run by rank 0 alone: the checkpoint to resume and its manifest, checked against this run."""
        path = self.dir.resume_point()
        if path is None:
            return None, {}
        manifest = read_manifest(path)
        recorded = with_resolved_identity_paths(manifest["config"], self.dir.root.parent)
        check_compatible(recorded, self.config, f"checkpoint {path}")
        check_same_data(manifest, self.data_identity, self.config, f"checkpoint {path}")
        return path, manifest

    # -------------------------------------------------------------------------------------------- save

    def save(self, step: int, stopping: bool = False) -> None:
        """Save the state after `step` steps at the evaluation weights. Every rank takes part (FSDP writes a
        shard per rank, each rank hashes its own files); rank 0 seals and renames. A save in the background
        is waited for first. With `async_saves`, this one is written in the background too, unless it is for
        a stop (`stopping`) or the last step.

        State that is not finite is never written: the run stops, naming the tensor, and the last good
        checkpoint stays the newest. A write that fails (a full disk, a quota) stops the run on every rank:
        the partial checkpoint is removed and the previous one is intact. Training on would only add steps
        that cannot be saved, and a full disk rarely empties itself; the lost work is bounded by
        train.ckpt_interval.
        """
        self.wait()
        background = self.async_saves and not stopping and step != self.max_steps
        with self.evaluation_weights():
            self._save(step, background)

    def wait(self) -> None:
        """Let a save in the background end; every rank calls this, and each raises its failure."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.join()
        if self.rt.all_ranks(pending.error is None):
            return
        if self.rt.is_main:
            self.dir.discard(pending.step)
        self._failed(pending.step, pending.error)

    def _save(self, step: int, background: bool) -> None:
        is_main = self.rt.is_main
        problem = first_nonfinite(self.model, self.optimizer)
        if not self.rt.all_ranks(problem is None):
            raise UserError(f"after step {step}, {problem or 'a tensor on another rank'} is not finite: its "
                            f"checkpoint was not written. Last good checkpoint: {self.last_complete()}. A "
                            "lower optim.lr is another experiment: give it a new out_dir", echo=is_main)
        meta = {"config": self.config, "data": self.data_identity,
                **{name: part.state_dict() for name, part in self.records.items()}}
        if background and self.sharded and self._group is None:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # every rank, at the same save
        self._together(step, lambda: self.dir.begin(step) if is_main else None)
        finish = self._together(step, lambda: start_training_state_save(
            self.dir.staging(step), self.model, self.optimizer, self._other_states(), self.sharded, is_main,
            background=background, group=self._group))
        if background:
            self._pending = _BackgroundSave(step, lambda: self._finish(step, meta, finish))
            return
        files = self._together(step, finish)
        self._together(step, lambda: self._commit(step, meta, self._gathered(files, None)))

    def _together(self, step: int, action: Callable[[], T]) -> T:
        """`action`'s result once every rank has done its part (the agreement is also the barrier between
        a save's phases). A write that failed on any rank fails the save on every rank: its partial files
        are removed and the run stops, naming the last good checkpoint."""
        error: OSError | None = None
        try:
            result = action()
        except OSError as e:
            error = e
        if self.rt.all_ranks(error is None):
            return result
        if self.rt.is_main:
            self.dir.discard(step)
        self._failed(step, error)

    def _gathered(self, files: dict[str, Any] | None, group: Any) -> dict[str, Any]:
        """Every rank's manifest entries on rank 0 (under FSDP each rank hashed its own files)."""
        if not self.sharded:
            return files or {}
        import torch.distributed as dist

        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, files, group=group)
        if any(entries is None for entries in everyone):
            raise OSError("the write failed on another rank")
        return {name: entry for entries in everyone for name, entry in entries.items()}

    def _finish(self, step: int, meta: dict[str, Any], write: Callable[[], dict[str, Any]]) -> None:
        """A background save's end: write, hash, then (every rank's files written) commit. Under FSDP the
        ranks meet in one gather on the save's own process group even when a write failed on some."""
        try:
            files = write()
        except Exception:
            if self.sharded:
                with contextlib.suppress(Exception):
                    self._gathered(None, self._group)  # tells the others
            raise
        self._commit(step, meta, self._gathered(files, self._group))

    def _commit(self, step: int, meta: dict[str, Any], files: dict[str, Any]) -> None:
        if self.rt.is_main:
            log.info("saved %s", self.dir.commit(step, meta, files))

    def _failed(self, step: int, error: BaseException | None) -> NoReturn:
        cause = f"{type(error).__name__}: {error}" if error else "the write failed on another rank"
        raise UserError(f"could not write the checkpoint of step {step} ({cause}); its partial files were "
                        f"removed. Last good checkpoint: {self.last_complete()}. Free disk space and "
                        "rerun to resume from it")


class _BackgroundSave:
    """A save's write, hashing and commit in a daemon thread: a run that fails elsewhere exits without
    waiting for it (its staging directory is removed at the next start)."""

    def __init__(self, step: int, work: Callable[[], None]) -> None:
        self.step, self.error = step, None
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"checkpoint-{step}",
                                        daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as e:  # any failure means no checkpoint; `Checkpointer.wait` reports it
            self.error = e

    def join(self) -> None:
        self._thread.join()
