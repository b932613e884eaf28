"""Read prepared token files; draw training, Hessian and validation batches as pure functions of their index.

A batch has no hidden RNG state: for (seed, stream, step) the *global* batch's window offsets are drawn with
`numpy.random.default_rng([seed, stream, step])`, and rank r at micro-step k takes rows
`(k * world_size + r) * micro_batch_size` onwards. Resuming is therefore exact, runs with the same seed see
the same tokens whatever the optimizer, and 1 process × 2 micro-steps sees the same sequences as 2 ranks × 1
micro-step. The validation set is fixed: sequence j is drawn from `default_rng([VAL_SEED, VAL_STREAM, j])`,
independent of the training seed, the micro-batch size and the world size. The official scripts' estimate
(`protocol.eval_batches`) draws fresh windows instead, the evaluation after `step` steps from
`default_rng([seed, SAMPLED_VAL_STREAM, step])`: new ones at every evaluation, the same ones after a resume.
Every batch's blocks are verified against the hashes preparation recorded before the batch is returned
(`data/blocks.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from data import blocks
from data.prepare import DTYPES, FORMAT_VERSION, damaged_split, read_meta

TRAIN_STREAM, HESSIAN_STREAM, VAL_STREAM, SAMPLED_VAL_STREAM = 0, 1, 2, 3
VAL_SEED = 1234  # constant on purpose: every run is evaluated on the same sequences


class TokenData:
    """The prepared files of one dataset folder: `meta.json` plus a read-only memmap per split."""

    def __init__(self, dir: str | Path, *, tokenizer: str | None = None, vocab_size: int | None = None):
        self.dir = Path(dir)
        meta_path = self.dir / "meta.json"
        if not self.dir.exists():
            raise UserError(f"data folder {self.dir} does not exist: prepare it with: python -m data.prepare "
                            f"data=<name> data.dir={self.dir}, or point at the folder it was prepared in")
        if not meta_path.is_file():
            raise UserError(
                f"{self.dir} holds no prepared data (no meta.json; a preparation may have been interrupted). "
                f"Run: python -m data.prepare data=<name> data.dir={self.dir}"
            )
        self._meta: dict[str, Any] = read_meta(self.dir)
        if self._meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{meta_path} has format version {self._meta.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}; prepare the data again into a new data.dir"
            )
        for key, expected in (("tokenizer", tokenizer), ("vocab_size", vocab_size)):
            if expected is not None and self._meta[key] != expected:
                raise UserError(
                    f"{self.dir} was prepared with {key} {self._meta[key]!r} but {expected!r} is expected; "
                    "set data.tokenizer to match, or prepare the data for it"
                )
        damage = damaged_split(self.dir, self._meta)
        if damage is not None:
            raise UserError(f"{damage}; delete {self.dir} and prepare it again")
        dtype = DTYPES[self._meta["dtype"]]
        self._splits = {name: np.memmap(self.dir / f"{name}.bin", dtype=dtype, mode="r")
                        for name in self._meta["splits"]}
        recorded = self._meta.get("blocks")  # None for data prepared before block hashes existed
        self._verifiers = {name: blocks.BlockVerifier(self.dir / f"{name}.bin", recorded[name],
                                                      recorded["block_bytes"])
                           for name in self._meta["splits"]} if recorded else {}
        self._background: blocks.BackgroundVerification | None = None

    @property
    def meta(self) -> dict[str, Any]:
        return self._meta

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records of the data it was trained on (see data/blocks.py)."""
        return {"fingerprint": self._meta.get("fingerprint"),
                "tokens": {name: counts["tokens"] for name, counts in self._meta["splits"].items()},
                "content": blocks.content_digest(self._meta.get("blocks"))}

    def verify_sampled_blocks(self) -> None:
        """Verify block 0 and a random sample of blocks of each split now (the start-up check; a no-op for
        data prepared without hashes); they are not hashed again when a batch reads them."""
        for verifier in self._verifiers.values():
            verifier.require(blocks.sampled_blocks(len(verifier.hashes)))

    def verify_in_background(self) -> None:
        """Start verifying every block ahead of the batches (once; see data/blocks.py)."""
        if self._verifiers and self._background is None:
            self._background = blocks.BackgroundVerification(list(self._verifiers.values()))

    def require_verified(self, name: str, offsets: np.ndarray, length: int) -> None:
        """Verify the blocks holding tokens [o, o + length) of split `name` for each offset o."""
        verifier = self._verifiers.get(name)
        if verifier is not None:
            itemsize = self._splits[name].itemsize
            verifier.require_bytes(offsets * itemsize, (offsets + length) * itemsize)

    def close(self) -> None:
        """Stop the background verification (it also stops by itself at exit)."""
        if self._background is not None:
            self._background.stop()

    @property
    def vocab_size(self) -> int:
        return self._meta["vocab_size"]

    @property
    def eot_id(self) -> int:
        return self._meta["eot_id"]

    @property
    def tokenizer(self) -> str:
        return self._meta["tokenizer"]

    def split(self, name: str) -> np.memmap:
        return self._splits[name]


@dataclass(frozen=True)
class BatchLayout:
    """How a step's batch is laid out: `global_batch_size` sequences of `block_size` tokens over `world_size`
    ranks, `micro_batch_size` per forward on one rank. The trainer's `gpt.config.BatchPlan` adds the checks
    with the config's names and the curvature pass's sizes; here a size that does not divide is a bug."""

    global_batch_size: int
    micro_batch_size: int
    block_size: int
    world_size: int = 1


class BatchLoader:
    """Deterministic (x, y) batches of `plan.block_size` tokens for one rank; see the module docstring."""

    def __init__(self, data: TokenData, plan: BatchLayout, *, rank: int = 0, seed: int,
                 device: str | torch.device = "cpu", vocab_limit: int | None = None):
        """`vocab_limit`: token ids must be below it (the model's vocabulary); each batch is checked, so a
        damaged file is one clear error instead of an out-of-range embedding lookup."""
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} is outside world_size {plan.world_size}")
        if seed < 0:
            raise ValueError(f"seed {seed} is negative")
        self.data, self.plan = data, plan
        self.block_size = plan.block_size
        self.rank = rank
        self.seed = seed
        self.device = torch.device(device)
        self.vocab_limit = vocab_limit
        for name in ("train", "val"):
            if len(data.split(name)) < self.block_size + 1:
                raise UserError(
                    f"the {name} split of {data.dir} has {len(data.split(name))} tokens, fewer than "
                    f"block_size + 1 = {self.block_size + 1}; use a smaller block_size or a larger corpus"
                )
        data.verify_in_background()

    def train_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._global_batch_rows(TRAIN_STREAM, step, micro_step, self.plan.global_batch_size)

    def hessian_batch(
        self, step: int, micro_step: int, global_batch_size: int | None = None,
        micro_batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences for Sophia's curvature estimate: their own stream over the train split, so they are not
        the sequences of `step`'s training batch. The global batch (default: the training one's size) does
        not depend on `micro_batch_size` (default: the training one), only its split into micro-steps."""
        return self._global_batch_rows(HESSIAN_STREAM, step, micro_step,
                                       global_batch_size or self.plan.global_batch_size, micro_batch_size)

    def val_batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences first … first + count − 1 of the fixed validation set."""
        high = len(self.data.split("val")) - self.block_size
        offsets = [
            np.random.default_rng([VAL_SEED, VAL_STREAM, j]).integers(0, high)
            for j in range(first, first + count)
        ]
        return self._windows("val", np.array(offsets))

    def val_schedule(self, sequences: int) -> list[tuple[int, int, float]]:
        """This rank's share of a `sequences`-long validation set: (first, count, weight) per micro-batch,
        micro-batches of `micro_batch_size` handed to the ranks in turn (`rank_share`)."""
        micro = self.plan.micro_batch_size
        schedule = []
        for index, counts in self.rank_share(math.ceil(sequences / micro)):
            first = index * micro
            count = min(micro, sequences - first)
            schedule.append((first, count, float(count) if counts else 0.0))
        return schedule

    def rank_share(self, batches: int) -> list[tuple[int, bool]]:
        """This rank's batches of `batches` handed to the ranks in turn: (index, whether it counts). Every
        rank gets the same number (a rank past the end repeats the last batch, not counted), so that
        collective forwards stay matched."""
        world = self.plan.world_size
        turns = range(self.rank, math.ceil(batches / world) * world, world)
        return [(min(index, batches - 1), index < batches) for index in turns]

    def sampled_val_batch(self, step: int, index: int, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of the `batches` drawn for the evaluation after `step` steps, as the official scripts
        draw them: `micro_batch_size` windows at uniformly random offsets of the whole val split, new at every
        evaluation. The draw is a pure function of (seed, step), so a resumed run evaluates the windows the
        straight run did; it does not depend on the world size (batch `index` is the same on any rank)."""
        micro = self.plan.micro_batch_size
        if not 0 <= index < batches:
            raise ValueError(f"batch {index} of {batches}")
        high = len(self.data.split("val")) - self.block_size
        offsets = np.random.default_rng([self.seed, SAMPLED_VAL_STREAM, step]).integers(
            0, high, size=batches * micro)
        return self._windows("val", offsets[index * micro : (index + 1) * micro])

    def _global_batch_rows(
        self, stream: int, step: int, micro_step: int, global_batch_size: int,
        micro_batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        micro_batch_size = micro_batch_size or self.plan.micro_batch_size
        per_pass = micro_batch_size * self.plan.world_size
        if global_batch_size % per_pass or not 0 <= micro_step < global_batch_size // per_pass:
            raise ValueError(f"micro_step {micro_step} of {global_batch_size} sequences in micro-batches of "
                             f"{micro_batch_size} over {self.plan.world_size} ranks")
        high = len(self.data.split("train")) - self.block_size
        offsets = np.random.default_rng([self.seed, stream, step]).integers(0, high, size=global_batch_size)
        first = (micro_step * self.plan.world_size + self.rank) * micro_batch_size
        return self._windows("train", offsets[first : first + micro_batch_size])

    def _windows(self, split: str, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x = tokens[o : o+T], y = tokens[o+1 : o+T+1] for each offset o, as int64 tensors on the device;
        the blocks they come from are verified first."""
        self.data.require_verified(split, offsets, self.block_size + 1)
        rows = self.data.split(split)[offsets[:, None] + np.arange(self.block_size + 1)]
        if self.vocab_limit is not None and rows.max() >= self.vocab_limit:  # damaged or foreign file
            row, column = np.unravel_index(np.argmax(rows >= self.vocab_limit), rows.shape)
            raise UserError(f"{self.data.dir / (split + '.bin')} holds token id {rows[row, column]} >= the "
                            f"model's vocabulary of {self.vocab_limit} at token {offsets[row] + column}: the "
                            "file is damaged or from another tokenizer; prepare the data again")
        x = torch.from_numpy(rows[:, :-1].astype(np.int64))
        y = torch.from_numpy(rows[:, 1:].astype(np.int64))
        if self.device.type == "cuda":  # pinned host memory makes the copy asynchronous
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
