"""The run directory: its `config.yaml`, its `train.log`, and the rule for what may change on resume.

Rerunning with the same `out_dir` resumes; rerunning with a different model, optimizer, data or seed into
the same `out_dir` would silently mix two experiments, so it is refused with the list of differences.
Settings that do not change what is trained (eval and log cadence, checkpointing) may, and so may the step
budget when the schedule's length is set apart from it (`schedule.decay_steps`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError
from common.files import write_atomic
from gpt.config import ModelSettings, ProtocolSettings, as_plain
from gpt.model import FAMILY_FIELDS

CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
PLAN_FILE = "plan.txt"
# Prefixes of config keys that define the experiment: a resume must not change them.
IDENTITY_KEYS = ("model.", "optim.", "data.name", "data.tokenizer", "data.val_fraction", "data.split_seed",
                 "train.seed", "train.init_from", "train.global_batch_size", "schedule.name",
                 "schedule.warmup_steps", "schedule.min_lr", "schedule.decay_steps", "protocol.")
log = logging.getLogger(__name__)


def setup_logging(out_dir: Path, is_main: bool) -> None:
    """Rank 0 logs to the console and train.log; other ranks only report warnings."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(out_dir / LOG_FILE)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file)


def is_empty(out_dir: str | Path) -> bool:
    """True when out_dir does not exist or holds nothing (Hydra creates it before the job starts)."""
    path = Path(out_dir)
    return not path.is_dir() or not any(path.iterdir())


def discard_unstarted(out_dir: str | Path) -> None:
    """Remove a run directory that was empty when this job began and in which no run started (no
    config.yaml): a config error or a dry run must not leave a directory that looks like a run. Only the files
    the start-up writes are removed; anything else keeps the directory."""
    path = Path(out_dir)
    if (path / CONFIG_FILE).exists():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == path.resolve():
            root.removeHandler(handler)
            handler.close()
    for name in (LOG_FILE, PLAN_FILE):
        (path / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples so values can be compared and hashed."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}


# Experiment-defining keys added after runs existed, with the values those runs were trained with.
_ADDED_KEYS = {"model.scale_attn_by_inverse_layer_idx": ModelSettings.scale_attn_by_inverse_layer_idx,
               **{f"model.{name}": getattr(ModelSettings, name) for name in FAMILY_FIELDS},  # GPT-2's
               **flatten({"protocol": as_plain(asdict(ProtocolSettings()))})}


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable `key: old -> new` lines for every experiment-defining key that differs. A key that an
    older run's config lacks because it predates the key compares as the default it was trained with."""
    flat_old, flat_new = {**_ADDED_KEYS, **flatten(old)}, flatten(new)
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        if key.startswith(IDENTITY_KEYS) and flat_old.get(key) != flat_new.get(key):
            lines.append(f"{key}: {flat_old.get(key)!r} -> {flat_new.get(key)!r}")
    return lines


def check_compatible(old: dict[str, Any], new: dict[str, Any], where: str) -> None:
    differences = identity_differences(old, new)
    if differences:
        hint, horizon = "", flatten(old).get("schedule.decay_steps")
        if horizon is not None and any(line.startswith("schedule.decay_steps:") for line in differences):
            hint = (" (schedule.decay_steps defaults to train.max_steps; to train on at the final learning "
                    f"rate, set schedule.decay_steps={horizon})")
        raise UserError(
            f"{where} holds a different experiment ({'; '.join(differences)}); "
            f"use another out_dir, or the original settings to resume it{hint}"
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


def read_config(out_dir: Path) -> dict[str, Any] | None:
    """The config.yaml of a run directory; None if it has none. A damaged one is an error, not ignored:
    it is what a resume checks the experiment against."""
    path = out_dir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not readable YAML ({first}); restore it, or move it away to resume "
                        "from the checkpoints' own record of the config") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a {type(config).__name__}, not a mapping of settings; restore it, or "
                        "move it away to resume from the checkpoints' own record of the config")
    return config


def write_config(out_dir: Path, config: dict[str, Any]) -> None:
    write_atomic(out_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
