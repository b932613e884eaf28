"""The `python -m data.prepare ...` command line that prepares exactly a given data config.

Error messages suggest it, so it must work when pasted: every setting that changes the files' content and
differs from the config group's own file (`configs/data/<name>.yaml`) is repeated, `data.files` above all,
and each override is quoted for the shell (globs, lists) and for Hydra's grammar (spaces, commas).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# Keys that change what the prepared files contain (the rest: parallelism, caches, the trainer's switch).
CONTENT_KEYS = ("source", "hf_path", "hf_name", "hf_revision", "hf_split", "hf_val_split", "files",
                "text_field", "val_fraction", "split_seed", "val_tokens", "train_tokens")
_PLAIN = re.compile(r"[A-Za-z_/.][\w./*?+@%-]*")  # a Hydra string that needs no quotes
_RESERVED = {"true", "false", "null", "nan", "inf"}


def prepare_command(data_cfg: Mapping[str, Any], directory: str | Path | None = None) -> str:
    """The command that prepares `data_cfg` into `directory` (default: its own `data.dir`)."""
    group = _group_defaults(data_cfg["name"])
    overrides = [f"data={data_cfg['name']}", _override("tokenizer", data_cfg["tokenizer"])]
    for key in CONTENT_KEYS:
        value = _plain(data_cfg.get(key))
        if group is None or value != group.get(key):
            overrides.append(_override(key, value))
    overrides.append(_override("dir", str(directory if directory is not None else data_cfg["dir"])))
    return "python -m data.prepare " + " ".join(overrides)


def _group_defaults(name: str) -> dict[str, Any] | None:
    """The group file's values, or None for a name that is not a group (then every key is repeated)."""
    path = resources.files("configs") / "data" / f"{name}.yaml"
    if not path.is_file():
        return None
    return {k: _plain(v) for k, v in OmegaConf.to_container(OmegaConf.load(str(path))).items()
            if k in CONTENT_KEYS}


def _plain(value: Any) -> Any:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float):  # 0.1 and 1e-1 are one value; compare them as such
        return float(value)
    return value


def _override(key: str, value: Any) -> str:
    return shlex.quote(f"data.{key}={_hydra_value(value)}")


def _hydra_value(value: Any) -> str:
    """`value` written in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
