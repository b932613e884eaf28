"""A trained model for evaluation, export and sampling: a run directory, one of its checkpoints (single-file
or FSDP-sharded) or Hugging Face weights (GPT-2, GPT-NeoX or Llama; a folder or a hub name), loaded into this
project's GPT together with the tokenizer it was trained with. Every evaluation script starts here, so they
all read a run the same way: a run directory stands for its newest checkpoint that verifies against its
manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

from common.errors import UserError
from data.tokenizers import Tokenizer, get_tokenizer
from gpt.checkpoint import MANIFEST, CheckpointDir, load_model_weights, read_manifest
from gpt.model import GPT, GPTConfig

T = TypeVar("T")


@dataclass
class Pretrained:
    model: GPT
    tokenizer: Tokenizer
    source: str  # the checkpoint directory, Hugging Face folder or hub name the weights came from
    run_config: dict[str, Any] | None  # the run's resolved config; None for Hugging Face weights


def resolve_checkpoint(path: Path, load: Callable[[Path], T] = lambda checkpoint: None) -> tuple[Path, T]:
    """A checkpoint directory, or the newest one of a run directory that verifies against its manifest and
    that `load` reads (a damaged one is skipped with a warning, as a resume does); and what `load` gave."""
    if (path / MANIFEST).is_file():
        problem = CheckpointDir(path.parent).verify(path)
        if problem:
            raise UserError(f"{path} is unusable: {problem}")
        return path, load(path)
    found = CheckpointDir(path / "checkpoints").newest_loadable(load)
    if found is None:
        raise UserError(f"{path} is neither a checkpoint nor a run directory with a complete checkpoint; "
                        "train it further (rerun its command) or pass another run")
    return found


def is_project_checkpoint(path: Path) -> bool:
    """True for a run directory or one of its checkpoints; False for anything else (e.g. a Hugging Face
    folder or hub name)."""
    return (path / MANIFEST).is_file() or (path / "checkpoints").is_dir()


def check_exists_or_hub_name(source: str, named: str = "") -> None:
    """A path that does not exist is named as such, not passed to the hub as a "repo id" it cannot be (hub
    names are `name` or `org/name`)."""
    path = Path(source)
    if (path.is_absolute() or source.startswith(".") or source.count("/") > 1) and not path.exists():
        raise UserError(f"{named}{path} does not exist (and is no Hugging Face hub name either): pass a run "
                        "directory, a checkpoint, a Hugging Face model folder or hub name")


def gpt_config(model_settings: dict[str, Any]) -> GPTConfig:
    """The model's shapes from a run's `model` config section (its `name` and any key this code's model does
    not have are dropped)."""
    names = {f.name for f in fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in model_settings.items() if k in names})


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Pretrained:
    def load(checkpoint: Path) -> tuple[GPT, dict[str, Any]]:
        run_config = read_manifest(checkpoint)["config"]
        model = GPT(gpt_config(run_config["model"]))
        load_model_weights(checkpoint, model)
        return model, run_config

    checkpoint, (model, run_config) = resolve_checkpoint(path, load)
    tokenizer = get_tokenizer(run_config["data"]["tokenizer"])
    return Pretrained(model.to(device).eval(), tokenizer, str(checkpoint), run_config)


def load_pretrained(source: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """Load a run directory, a checkpoint, a Hugging Face folder or hub name (e.g. `gpt2`) for evaluation."""
    path = Path(source)
    if is_project_checkpoint(path):
        return load_checkpoint(path, device)
    check_exists_or_hub_name(str(source))
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{path} is neither a run directory, a checkpoint nor a Hugging Face model folder "
                        "(no checkpoints/, manifest.json or config.json)")
    from gpt.eval.hf import load_hf

    model, tokenizer = load_hf(str(source))
    return Pretrained(model.to(device).eval(), tokenizer, str(source), None)


def init_weights(model: GPT, source: str) -> None:
    """`train.init_from`: overwrite a freshly built model's weights with those of a run, a checkpoint, or a
    Hugging Face model (folder or hub name); shapes that do not match the model config are one error."""
    if not is_project_checkpoint(Path(source)):
        from gpt.eval.hf import init_from_hf

        check_exists_or_hub_name(source, "train.init_from=")
        init_from_hf(model, source)
        return
    loaded = load_checkpoint(Path(source))
    keys = [f.name for f in fields(GPTConfig) if f.name != "dropout"]
    theirs, ours = ({key: getattr(config, key) for key in keys}
                    for config in (loaded.model.config, model.config))
    problems = [f"{key}={theirs[key]} (model.{key}={ours[key]})" for key in keys if theirs[key] != ours[key]]
    if problems:
        raise UserError(f"train.init_from={source} does not fit the model config: {'; '.join(problems)}; "
                        "use its model settings")
    model.load_state_dict(loaded.model.state_dict())

