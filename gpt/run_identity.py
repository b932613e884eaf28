"""What a run is: every setting that shapes its trajectory is fixed for the run's life.

Rerunning with the same `out_dir` resumes. Identity is the default: every key of the resolved config is part
of the experiment, and a resume that changes one is refused naming it, except the keys of one explicit list,
`MAY_CHANGE_ON_RESUME`, which do not change what is trained (bookkeeping and cadences, evaluation, loggers,
where and in how many pieces the same arithmetic runs, where the data lives). A key added to the schema is
therefore fixed from the day it exists; a run written before it existed compares as the value it was trained
with (`ADDED_KEYS`, the one table of such keys), and a key this code no longer has is ignored (nothing here
can act on it). The data a run trains on is checked by content as well (`check_same_data`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from common.errors import UserError
from gpt.config import ModelSettings, ProtocolSettings, as_plain
from gpt.model import FAMILY_FIELDS

log = logging.getLogger(__name__)

# Keys that may change when a run resumes (exact keys, or every key under a prefix ending in "."). Each
# entry says why it cannot change the trajectory; docs/training.md lists them for users.
MAY_CHANGE_ON_RESUME: dict[str, str] = {
    "out_dir": "the run directory itself (a run moved elsewhere)",
    "train.max_steps": "the budget: the schedule's length is schedule.decay_steps, recorded resolved",
    "train.log_interval": "a cadence",
    "train.eval_interval": "a cadence",
    "train.ckpt_interval": "a cadence",
    "train.keep_checkpoints": "how many checkpoints stay on disk",
    "train.async_checkpoint": "how a checkpoint is written, not what it holds",
    "train.stop_grace_s": "how long a stop signal waits for a step",
    "train.eval_sequences": "evaluation only",
    "train.hellaswag_interval": "evaluation only",
    "train.hellaswag_data": "evaluation only",
    "train.hellaswag_limit": "evaluation only",
    "protocol.eval_batches": "evaluation only",
    "train.dry_run": "prints the plan only",
    "train.gpu": "the plan's time estimate",
    "train.assumed_mfu": "the plan's time estimate",
    # The same arithmetic in other pieces or places: equal up to floating-point rounding (docs/scaling.md).
    "train.device": "where the same arithmetic runs",
    "train.strategy": "how the same batch is split over ranks",
    "train.micro_batch_size": "how the same batch is split into forwards (the official protocol records "
                              "the micro-steps it sums: protocol.summed_micro_steps)",
    "train.hessian_micro_batch_size": "how the same curvature batch is split into forwards",
    "train.activation_checkpointing": "recomputes the same activations",
    "train.compile": "the same model, compiled",
    "data.dir": "where the data lives; its content is checked against the checkpoint's record",
    "data.auto_prepare": "whether missing data is prepared",
    "data.num_proc": "preparation threads",
    "data.cache_dir": "the download cache",
    "wandb.": "a logger",
    "tensorboard.": "a logger",
    "csv.": "a logger",
}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples so values can be compared and hashed."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}


# Keys added to the schema after runs existed, with the values those runs were trained with.
ADDED_KEYS: dict[str, Any] = {
    "model.scale_attn_by_inverse_layer_idx": ModelSettings.scale_attn_by_inverse_layer_idx,
    **{f"model.{name}": getattr(ModelSettings, name) for name in FAMILY_FIELDS},  # GPT-2's
    **flatten({"protocol": as_plain(asdict(ProtocolSettings()))}),
    "train.init_from": None,
}


def may_change_on_resume(key: str) -> bool:
    return key in MAY_CHANGE_ON_RESUME or any(
        key.startswith(entry) for entry in MAY_CHANGE_ON_RESUME if entry.endswith("."))


def defines_experiment(key: str) -> bool:
    """Whether a flattened config key is part of what a run is (everything not allowed to change)."""
    return not may_change_on_resume(key)


def experiment_keys(config: dict[str, Any], *, predates: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flattened experiment-defining keys of a config; a key that `predates` (a newer config) has but
    this one lacks is filled in from `ADDED_KEYS` where the table knows it."""
    flat = flatten(config)
    if predates is not None:
        flat = {**{k: v for k, v in ADDED_KEYS.items() if k in flatten(predates)}, **flat}
    return {key: value for key, value in flat.items() if defines_experiment(key)}


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable `key: old -> new` lines for every experiment-defining key that differs. A key an older
    run's config lacks compares as the value it was trained with; a key only the older config has is one
    this code no longer has, and is ignored."""
    flat_old, flat_new = experiment_keys(old, predates=new), experiment_keys(new)
    return [f"{key}: {flat_old[key]!r} -> {flat_new[key]!r}" if key in flat_old
            else f"{key}: not recorded -> {flat_new[key]!r}"
            for key in sorted(flat_new) if key not in flat_old or flat_old[key] != flat_new[key]]


def check_compatible(old: dict[str, Any], new: dict[str, Any], where: str) -> None:
    differences = identity_differences(old, new)
    if differences:
        hint, horizon = "", flatten(old).get("schedule.decay_steps")
        if horizon is not None and any(line.startswith("schedule.decay_steps:") for line in differences):
            hint = (" (schedule.decay_steps defaults to train.max_steps; to train on at the final learning "
                    f"rate, set schedule.decay_steps={horizon})")
        raise UserError(
            f"{where} holds a different experiment ({'; '.join(differences)}); "
            f"use another out_dir, or the original settings to resume it (docs/training.md lists the "
            f"settings that may change on resume){hint}"
        )


def check_same_data(manifest: dict[str, Any], data: dict[str, Any], config: dict[str, Any],
                    where: str) -> None:
    """A resume must read the data its checkpoint was trained on: the same preparation (fingerprint), sizes
    and content (digest of the block hashes, data/blocks.py). `data.dir` may change (data moved to another
    disk) as long as what it holds is the same; checkpoints older than this record are not checked."""
    recorded = manifest.get("data")
    if recorded is None:
        return
    old_dir, new_dir = manifest["config"]["data"].get("dir"), config["data"].get("dir")
    differences = [f"{key}: {recorded.get(key)!r} -> {data.get(key)!r}" for key in sorted(recorded)
                   if recorded.get(key) != data.get(key)]
    if differences:
        moved = f" (data.dir {old_dir} -> {new_dir})" if old_dir != new_dir else ""
        raise UserError(f"{where} was trained on other data than data.dir holds now{moved}: "
                        f"{'; '.join(differences)}; point data.dir at the data it was trained on, or use "
                        "another out_dir")
    if old_dir != new_dir:
        log.info("data.dir changed from %s to %s; it holds the same data (fingerprint and content)", old_dir,
                 new_dir)
