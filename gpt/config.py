"""Typed schema of the training config, checked at start-up, before any data work.

Hydra composes plain YAML; this module checks it against dataclasses (a misspelt key, a missing key or a
wrong type fails before any work, as a `UserError`). The dataclasses hold no defaults: every value comes from
configs/, and the model's fields are `GPTConfig`'s own (the protocol's defaults are the values of runs made
before the protocol group existed, see `gpt.run_dir`). The `optim` and `data` groups have per-choice keys:
the optimizer registry checks `optim`'s, and `data`'s must be among the keys the data package reads. Hydra's
own composition errors (an unknown `model=`, a misspelt key) are turned into one line here too, so every
config mistake reads the same way. The batch arithmetic derived from it is a `BatchPlan` (`batch_plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from common.errors import UserError
from data.loader import BatchPlan
from data.prepare import CONFIG_KEYS as DATA_KEYS
from data.prepare import check_names as check_data_names
from gpt.model import GPTConfig
from optim import OPTIMIZERS, schedule_named

DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("auto", "single", "ddp", "fsdp")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class ModelSettings(GPTConfig):
    """The model group: GPTConfig's fields, and the name runs are labelled with."""

    name: str = MISSING


@dataclass
class TrainSettings:
    max_steps: int
    global_batch_size: int
    micro_batch_size: int | None  # None: the largest that fits this GPU (gpt/device_defaults.py)
    hessian_micro_batch_size: int | None  # the curvature pass's; None: chosen likewise
    activation_checkpointing: bool
    eval_interval: int
    eval_sequences: int
    log_interval: int
    ckpt_interval: int
    keep_checkpoints: int
    seed: int
    grad_clip: float
    dtype: str
    compile: bool | None  # None: on for CUDA, off elsewhere
    device: str
    strategy: str
    on_nonfinite: str
    max_skipped: int
    dry_run: bool
    gpu: str
    assumed_mfu: float
    init_from: str | None
    hellaswag_interval: int
    hellaswag_data: str | None
    hellaswag_limit: int | None


@dataclass
class ScheduleSettings:
    name: str
    warmup_steps: int
    min_lr: float
    decay_steps: int | None


@dataclass
class ProtocolSettings:
    """The script-level choices of configs/protocol/: the fair protocol, or the official scripts' own."""

    name: str = "fair"
    summed_accumulation: list[str] = field(default_factory=list)
    warmup_from_zero: bool = False
    extra_final_step: bool = False
    summed_micro_steps: int = 0  # recorded at start (`gpt.protocol`): micro-steps per rank summed, 0 if none


@dataclass
class WandbSettings:
    enabled: bool
    project: str
    mode: str
    name: str | None


@dataclass
class Settings:
    out_dir: str
    model: ModelSettings
    train: TrainSettings
    schedule: ScheduleSettings
    wandb: WandbSettings
    protocol: ProtocolSettings = field(default_factory=ProtocolSettings)
    optim: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


def _typed(section: str, schema: type, values: Any) -> Any:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as e:
        first_line = str(e).splitlines()[0]
        raise UserError(f"config group '{section}': {first_line}") from None


def load_settings(cfg: DictConfig) -> Settings:
    """Validate a composed config; every error names the key and what is allowed."""
    for key in ("out_dir", "model", "train", "schedule", "wandb", "optim", "data"):
        if key not in cfg:
            raise UserError(f"config has no '{key}': compose it from configs/train.yaml")
    known = [f.name for f in fields(Settings)]
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise UserError(f"unknown top-level config key(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    missing = [f.name for f in fields(ModelSettings) if f.name not in cfg.model]
    if missing:
        raise UserError(f"config group 'model' lacks {', '.join(missing)}: a model YAML sets every field")
    unknown = sorted(set(cfg.data) - DATA_KEYS)
    if unknown:
        raise UserError(f"unknown data key(s) {', '.join(unknown)}; valid: {', '.join(sorted(DATA_KEYS))}")
    container = OmegaConf.to_container(cfg, resolve=True)
    settings = Settings(
        out_dir=str(container["out_dir"]),
        model=_typed("model", ModelSettings, container["model"]),
        train=_typed("train", TrainSettings, container["train"]),
        schedule=_typed("schedule", ScheduleSettings, container["schedule"]),
        wandb=_typed("wandb", WandbSettings, container["wandb"]),
        protocol=_typed("protocol", ProtocolSettings, container.get("protocol", {})),
        optim=dict(container["optim"]),
        data=dict(container["data"]),
    )
    _check(settings)
    if settings.schedule.decay_steps is None and settings.schedule.name != "constant":
        # Recorded resolved, so that a resume with another max_steps, which would reshape the schedule of
        # steps already trained, differs from the run in an experiment-defining key and is refused.
        settings.schedule.decay_steps = settings.train.max_steps
    if settings.protocol.extra_final_step:
        # The official loop steps at iterations 0 through max_iters: one more step, at the final lr. Recorded
        # as the budget trained, so config.yaml, the plan and the metrics all show the steps really taken.
        settings.train.max_steps += 1
    return settings


def _check(s: Settings) -> None:
    t = s.train
    if t.dtype not in DTYPES:
        raise UserError(f"train.dtype={t.dtype!r} is not one of {', '.join(DTYPES)}")
    if t.strategy not in STRATEGIES:
        raise UserError(f"train.strategy={t.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if s.wandb.mode not in WANDB_MODES:
        raise UserError(f"wandb.mode={s.wandb.mode!r} is not one of {', '.join(WANDB_MODES)}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"train.on_nonfinite={t.on_nonfinite!r} must be 'stop' or 'skip'")
    for key in ("max_steps", "global_batch_size", "micro_batch_size", "hessian_micro_batch_size",
                "eval_interval", "eval_sequences", "log_interval", "ckpt_interval", "keep_checkpoints",
                "max_skipped"):
        if getattr(t, key) is not None and getattr(t, key) < 1:
            raise UserError(f"train.{key} must be at least 1 (got {getattr(t, key)})")
    if t.seed < 0:
        raise UserError(f"train.seed must be >= 0 (got {t.seed})")
    if t.hellaswag_interval < 0 or t.hellaswag_interval % t.eval_interval:
        raise UserError(f"train.hellaswag_interval={t.hellaswag_interval} must be 0 (off) or a multiple of "
                        f"train.eval_interval={t.eval_interval}: HellaSwag is scored with validation loss")
    if not s.out_dir.strip():
        raise UserError("out_dir is empty; give the run its own directory, e.g. out_dir=runs/my_run")
    if not (math.isfinite(t.grad_clip) and t.grad_clip >= 0):
        raise UserError(f"train.grad_clip={t.grad_clip} must be a finite number >= 0 (0 disables clipping)")
    if not (math.isfinite(s.schedule.min_lr) and s.schedule.min_lr >= 0):
        raise UserError(f"schedule.min_lr={s.schedule.min_lr} must be a finite number >= 0")
    schedule_named(s.schedule.name)
    check_data_names(s.data)
    if s.schedule.warmup_steps < 0:
        raise UserError("schedule.warmup_steps must be >= 0")
    if s.schedule.decay_steps is not None and s.schedule.decay_steps < 1:
        raise UserError(f"schedule.decay_steps={s.schedule.decay_steps} must be at least 1 (or null: "
                        "train.max_steps)")
    unknown = sorted(set(s.protocol.summed_accumulation) - set(OPTIMIZERS))
    if unknown:
        raise UserError(f"protocol.summed_accumulation names unknown optimizer(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(OPTIMIZERS)}")


def batch_plan(settings: Settings, world_size: int) -> BatchPlan:
    """The run's batch arithmetic for `world_size` ranks (refused if the batch does not split over them)."""
    t = settings.train
    return BatchPlan(t.global_batch_size, t.micro_batch_size, settings.model.block_size, world_size)


def describe_composition_error(error: HydraException) -> str:
    """One line for a config Hydra could not compose, in place of its multi-line report."""
    if isinstance(error, MissingConfigException) and error.options:
        group, _, name = error.missing_cfg_file.partition("/")  # e.g. experiment / paper/fig9
        return f"unknown {group}={name}; valid: {', '.join(sorted(error.options))}"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}: {error.message.splitlines()[0]}"
    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return f"{cause.full_key} is not a config key (misspelt?); `python train.py --cfg job` lists them"
    message = str(error).strip().splitlines()[0]
    return f"{message} ({str(cause).strip().splitlines()[0]})" if cause is not None else message
