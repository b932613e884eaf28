"""The trainer's checkpoint component: when a save is due, a save every rank takes part in, and the resume.

What is saved are the run's stateful parts: the model and optimizer (one `state.pt`, or one shard per rank
under FSDP) at the optimizer's evaluation weights (schedule-free: the average), the gradient scaler, and the
loop's own state (step, elapsed time, recent losses, skip streak, wandb id), which is small and the same on
every rank and so goes into the manifest next to the config and the identity of the data trained on. The
on-disk format, its verification and pruning are `gpt.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim import Optimizer

from common.errors import UserError
from gpt.checkpoint import (
    CheckpointDir,
    first_nonfinite,
    load_training_state,
    read_manifest,
    save_training_state,
)
from gpt.distributed import Runtime
from gpt.run_dir import check_compatible, check_same_data

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """Saves every `interval` steps, at `max_steps` and when the run is asked to stop; resumes the newest
    checkpoint that verifies and was written by the same experiment (`config`) on the same data.

    `evaluation_weights` is a context in which the model holds the weights a checkpoint stores (leaving it
    switches back to the training weights); `data_identity` says what data the run trains on."""

    def __init__(self, root: Path, runtime: Runtime, config: dict[str, Any], *, interval: int, keep: int,
                 max_steps: int, model: nn.Module, optimizer: Optimizer, scaler: torch.amp.GradScaler,
                 loop: Stateful, evaluation_weights: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.dir = CheckpointDir(root, keep=keep)
        self.rt, self.config = runtime, config
        self.interval, self.max_steps = interval, max_steps
        self.model, self.optimizer, self.scaler, self.loop = model, optimizer, scaler, loop
        self.evaluation_weights = evaluation_weights
        self.sharded = runtime.strategy == "fsdp"
        self.data_identity: dict[str, Any] | None = None  # set once the data is open

    def due(self, step: int, stopping: bool) -> bool:
        """Whether the state after `step` optimizer steps is to be saved."""
        return step % self.interval == 0 or step == self.max_steps or stopping

    def last_complete(self) -> str:
        return self.dir.last_complete()

    # ------------------------------------------------------------------------------------------ resume

    def resume(self) -> bool:
        """Load the newest complete checkpoint (rank 0 chooses, all ranks load) into the stateful parts;
        False for a fresh run. Leftovers of interrupted saves are removed first."""
        path, manifest = self.rt.on_main(self._resume_point)
        if path is None:
            return False
        with self.evaluation_weights():  # a checkpoint holds them; leaving switches to the training weights
            extra = load_training_state(path, self.model, self.optimizer,
                                        {"scaler": self.scaler.state_dict()}, self.sharded, self.rt.device)
        self.scaler.load_state_dict(extra["scaler"])
        loop = manifest["loop"]
        if "step" not in loop:  # a checkpoint from before the loop state held these three itself
            loop = {**loop, "step": manifest["step"], "elapsed_s": manifest["elapsed_s"],
                    "wandb_id": manifest["wandb_id"]}
        self.loop.load_state_dict(loop)
        log.info("resumed from %s (step %d)", path, manifest["step"])
        return True

    def _resume_point(self) -> tuple[Path | None, dict[str, Any]]:
        """Run by rank 0 alone: the checkpoint to resume and its manifest, checked against this run."""
        self.dir.remove_partial()
        path = self.dir.resume_point()
        if path is None:
            return None, {}
        manifest = read_manifest(path)
        check_compatible(manifest["config"], self.config, f"checkpoint {path}")
        check_same_data(manifest, self.data_identity, self.config, f"checkpoint {path}")
        return path, manifest

    # -------------------------------------------------------------------------------------------- save

    def save(self, step: int) -> None:
        """Save the state after `step` steps at the evaluation weights. Every rank takes part (FSDP writes a
        shard per rank); rank 0 seals and renames.

        State that is not finite is never written: the run stops, naming the tensor, and the last good
        checkpoint stays the newest. A write that fails (a full disk, a quota) stops the run on every rank:
        the partial checkpoint is removed and the previous one is intact. Training on would only add steps
        that cannot be saved, and a full disk rarely empties itself; the lost work is bounded by
        train.ckpt_interval.
        """
        with self.evaluation_weights():
            self._save(step)

    def _save(self, step: int) -> None:
        is_main = self.rt.is_main
        problem = first_nonfinite(self.model, self.optimizer)
        if not self.rt.all_ranks(problem is None):
            raise UserError(f"after step {step}, {problem or 'a tensor on another rank'} is not finite: its "
                            f"checkpoint was not written. Last good checkpoint: {self.last_complete()}. A "
                            "lower optim.lr is another experiment: give it a new out_dir", echo=is_main)
        meta = {"config": self.config, "loop": self.loop.state_dict(), "data": self.data_identity}
        phases: list[Callable[[], object]] = [
            lambda: self.dir.begin(step) if is_main else None,
            lambda: save_training_state(self.dir.staging(step), self.model, self.optimizer,
                                        {"scaler": self.scaler.state_dict()}, self.sharded, is_main),
            lambda: log.info("saved %s", self.dir.commit(step, meta)) if is_main else None,
        ]
        error: OSError | None = None
        for phase in phases:
            try:
                phase()
            except OSError as e:
                error = e
            if not self.rt.all_ranks(error is None):  # also the barrier between the phases
                break
        else:
            return
        if is_main:
            self.dir.discard(step)
        cause = f"{type(error).__name__}: {error}" if error else "the write failed on another rank"
        raise UserError(f"could not write the checkpoint of step {step} ({cause}); its partial files were "
                        f"removed. Last good checkpoint: {self.last_complete()}. Free disk space and "
                        "rerun to resume from it")
