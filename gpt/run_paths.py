"""The paths a run records, made to resolve from any working directory and after the run folder moves.

A run records its paths absolute, as they were where it started (`absolute_settings`, called by
`gpt.settings.load_settings`): `out_dir`, `data.dir`, `data.cache_dir`, `train.hellaswag_data`, and
`train.init_from` when it names a local path (a hub name stays a name). What lives inside the run folder
(checkpoints, metrics, logs) is always found relative to the folder itself, so a moved or copied run folder
keeps working. Runs recorded before this kept relative paths; `resolve_recorded` reads them relative to the
folder the run was started in (the run folder's path minus its recorded relative `out_dir`), then relative to
the working directory, and says which it used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpt.config import Settings

log = logging.getLogger(__name__)

# Recorded paths that are experiment-defining, compared on resume (gpt.run_identity) after resolving.
IDENTITY_PATH_KEYS = (("train", "init_from"),)


def absolute(path: str) -> str:
    """`path` absolute against the working directory (`~` expanded; symbolic links kept as written)."""
    return os.path.abspath(os.path.expanduser(path))


def _local_or_name(source: str | None) -> str | None:
    """A local path made absolute; a Hugging Face hub name (nothing of that name here) left as it is."""
    if source is None or not Path(os.path.expanduser(source)).exists():
        return source
    return absolute(source)


def absolute_settings(settings: Settings) -> Settings:
    """The settings with every path they hold absolute, as config.yaml and the checkpoints record them."""
    from gpt.config import ReadOnlyDict

    data = dict(settings.data)
    data["dir"] = absolute(str(data["dir"]))
    if data.get("cache_dir"):
        data["cache_dir"] = absolute(str(data["cache_dir"]))
    train = settings.train
    train = replace(train, init_from=_local_or_name(train.init_from),
                    hellaswag_data=absolute(train.hellaswag_data) if train.hellaswag_data else None)
    return replace(settings, out_dir=absolute(settings.out_dir), train=train, data=ReadOnlyDict(data))


def start_folder(run_dir: str | Path, recorded_out_dir: str | None) -> Path | None:
    """The folder a run was started in, for a run that recorded its `out_dir` relative: the run folder's path
    minus that relative tail. None when it cannot be told (an absolute record, or a run folder moved or
    renamed since)."""
    if not recorded_out_dir or Path(recorded_out_dir).is_absolute():
        return None
    here, tail = Path(absolute(str(run_dir))).parts, Path(os.path.normpath(recorded_out_dir)).parts
    if len(tail) >= len(here) or here[len(here) - len(tail):] != tail:
        return None
    return Path(*here[:len(here) - len(tail)])


def resolve_recorded(path: str, run_dir: str | Path | None, config: Mapping[str, Any], what: str) -> Path:
    """A path a run recorded, as this process should read it: an absolute one as it is; a relative one (runs
    recorded before paths were absolute) against the run's start folder, then against the working
    directory, whichever exists first, saying which was used. When neither exists the start folder's reading
    is returned (cwd's when unknown), for the caller to report as missing."""
    if Path(path).is_absolute():
        return Path(path)
    start = start_folder(run_dir, config.get("out_dir")) if run_dir is not None else None
    candidates = [(folder, why) for folder, why in ((start, "the folder the run was started in"),
                                                    (Path.cwd(), "the working directory"))
                  if folder is not None]
    for folder, why in candidates:
        if (folder / path).exists():
            if len(candidates) > 1 or folder != Path.cwd():
                log.info("%s %s was recorded relative: read relative to %s, %s", what, path, why, folder)
            return folder / path
    return candidates[0][0] / path


def with_resolved_identity_paths(old: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """An older run's config with its relative experiment-defining paths (`train.init_from`) resolved as
    `resolve_recorded` reads them, so that a resume compares them with today's absolute record."""
    resolved = {name: dict(values) if isinstance(values, dict) else values for name, values in old.items()}
    for section, key in IDENTITY_PATH_KEYS:
        value = resolved[section].get(key) if isinstance(resolved.get(section), dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            found = resolve_recorded(value, run_dir, old, f"{section}.{key}")
            if found.exists():
                resolved[section][key] = str(found)
    return resolved


def prefer_recorded_data(settings: Settings, run_dir: Path) -> Settings:
    """A resume whose `data.dir` does not exist (started from another folder, or the run folder moved with its
    data elsewhere) reads the data folder the run recorded instead, when that holds data prepared with these
    settings; the checkpoint's record of the data is still checked against it (`check_same_data`)."""
    from data.prepare import unprepared_reason
    from gpt.config import ReadOnlyDict
    from gpt.run_dir import read_config

    configured = settings.data["dir"]
    previous = None if Path(configured).exists() else read_config(run_dir)
    if previous is None or not isinstance(previous.get("data"), dict) or not previous["data"].get("dir"):
        return settings
    recorded = str(resolve_recorded(previous["data"]["dir"], run_dir, previous, "data.dir"))
    if recorded == configured or unprepared_reason({**settings.data, "dir": recorded}) is not None:
        return settings
    log.info("data.dir %s does not exist: resuming with the data folder the run recorded, %s", configured,
             recorded)
    return replace(settings, data=ReadOnlyDict({**settings.data, "dir": recorded}))
