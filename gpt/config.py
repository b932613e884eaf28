"""Typed schema of the training config, its checks, and the batch arithmetic derived from it.

Hydra composes plain YAML; `parse_config` checks it against frozen dataclasses (a misspelt key, a missing key
or a wrong type fails before any work, as a `UserError`), and every rule a config must obey is checked here,
once, with one message. The dataclasses hold no defaults: every value comes from configs/, and the model's
fields are `GPTConfig`'s own (the protocol's defaults are the values of runs made before the protocol group
existed, see `gpt.run_dir`). The `optim` and `data` groups have per-choice keys: the optimizer registry
checks `optim`'s, and `data`'s must be among the keys the data package reads. Hydra's own composition errors
(an unknown `model=`, a misspelt key) are turned into one line here too, so every config mistake reads the
same way. Values a config leaves to the framework (`null`) are filled in by `gpt.settings.load_settings`,
which makes the final settings; `BatchPlan` is the batch arithmetic of those settings on a world size.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from common.errors import UserError
from data.loader import BatchLayout
from data.prepare import CONFIG_KEYS as DATA_KEYS
from data.prepare import check_names as check_data_names
from gpt.model import GPTConfig
from optim import OPTIMIZERS, entry_for, schedule_named, trainer_settings

DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("auto", "single", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("online", "offline", "disabled")


class ReadOnlyDict(dict):
    """A dict that refuses changes: the `optim` and `data` sections of settings that are final."""

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a run's settings are final once resolved (gpt.settings.load_settings)")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:
        return ReadOnlyDict, (dict(self),)

    def __deepcopy__(self, memo: dict[int, Any]) -> ReadOnlyDict:
        return ReadOnlyDict(copy.deepcopy(dict(self), memo))


@dataclass(frozen=True)
class ModelSettings(GPTConfig):
    """The model group: GPTConfig's fields, and the name runs are labelled with."""

    name: str = MISSING


@dataclass(frozen=True)
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
    async_checkpoint: bool | None  # None: on for CUDA, off elsewhere (gpt/device_defaults.py)
    seed: int
    grad_clip: float
    dtype: str
    compile: bool | None  # None: on for CUDA, off elsewhere
    device: str
    strategy: str
    on_nonfinite: str
    max_skipped: int
    stop_grace_s: float
    dry_run: bool
    gpu: str
    assumed_mfu: float
    init_from: str | None
    hellaswag_interval: int
    hellaswag_data: str | None
    hellaswag_limit: int | None


@dataclass(frozen=True)
class ScheduleSettings:
    name: str
    warmup_steps: int
    min_lr: float
    decay_steps: int | None


@dataclass(frozen=True)
class ProtocolSettings:
    """The script-level choices of configs/protocol/: the fair protocol, or the official scripts' own."""

    name: str = "fair"
    summed_accumulation: tuple[str, ...] = ()
    warmup_from_zero: bool = False
    extra_final_step: bool = False
    eval_batches: int = 0  # 0: the fixed set of train.eval_sequences; n: n micro-batches of fresh windows
    summed_micro_steps: int = 0  # resolved at start (`gpt.settings`): micro-steps per rank summed, 0 if none


@dataclass(frozen=True)
class WandbSettings:
    enabled: bool
    project: str
    mode: str | None  # None: wandb's own choice (WANDB_MODE)
    name: str | None


@dataclass(frozen=True)
class SinkSettings:
    """A logger that needs no settings but its switch (`tensorboard`, `csv`)."""

    enabled: bool


@dataclass(frozen=True)
class Settings:
    out_dir: str
    model: ModelSettings
    train: TrainSettings
    schedule: ScheduleSettings
    wandb: WandbSettings
    tensorboard: SinkSettings
    csv: SinkSettings
    protocol: ProtocolSettings = field(default_factory=ProtocolSettings)
    optim: Mapping[str, Any] = field(default_factory=ReadOnlyDict)
    data: Mapping[str, Any] = field(default_factory=ReadOnlyDict)

    def record(self) -> dict[str, Any]:
        """The settings as plain nested dicts and lists: what config.yaml, checkpoints and loggers store."""
        return as_plain(asdict(self))


def as_plain(value: Any) -> Any:
    """Mappings as dicts and tuples as lists, all the way down: what YAML and JSON files hold."""
    if isinstance(value, Mapping):
        return {key: as_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(item) for item in value]
    return value


def _read_only(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ReadOnlyDict({key: _read_only(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_read_only(item) for item in value)
    return value


def _typed(section: str, schema: type, values: Any) -> Any:
    """`values` as a `schema` instance whose lists are tuples (OmegaConf hands them out as lists)."""
    try:
        structured = OmegaConf.structured(schema)
        OmegaConf.set_readonly(structured, False)  # a frozen schema makes a read-only node: merge into a copy
        typed = OmegaConf.to_object(OmegaConf.merge(structured, values))
    except OmegaConfBaseException as e:
        first_line = str(e).splitlines()[0]
        raise UserError(f"config group '{section}': {first_line}") from None
    return replace(typed, **{f.name: _read_only(getattr(typed, f.name)) for f in fields(typed)
                             if isinstance(getattr(typed, f.name), list)})


def parse_config(cfg: DictConfig) -> Settings:
    """A composed config, typed and checked; every error names the key and what is allowed. Values left to
    the framework (`null`) stay None: `gpt.settings.load_settings` resolves them."""
    for key in ("out_dir", "model", "train", "schedule", "wandb", "tensorboard", "csv", "optim", "data"):
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
        tensorboard=_typed("tensorboard", SinkSettings, container["tensorboard"]),
        csv=_typed("csv", SinkSettings, container["csv"]),
        protocol=_typed("protocol", ProtocolSettings, container.get("protocol", {})),
        optim=_read_only(container["optim"]),
        data=_read_only(container["data"]),
    )
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    t = s.train
    for key, allowed in (("dtype", DTYPES), ("strategy", STRATEGIES), ("device", DEVICES)):
        if getattr(t, key) not in allowed:
            raise UserError(f"train.{key}={getattr(t, key)!r} is not one of {', '.join(allowed)}")
    if s.wandb.mode is not None and s.wandb.mode not in WANDB_MODES:
        raise UserError(f"wandb.mode={s.wandb.mode!r} is not one of {', '.join(WANDB_MODES)} (or null: "
                        "WANDB_MODE's)")
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
    if not (math.isfinite(t.stop_grace_s) and t.stop_grace_s > 0):
        raise UserError(f"train.stop_grace_s={t.stop_grace_s} must be a number of seconds > 0 (the time a "
                        "stop signal waits for the step in progress)")
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
    if s.protocol.eval_batches < 0:
        raise UserError(f"protocol.eval_batches={s.protocol.eval_batches} must be 0 (the fixed validation "
                        "set of train.eval_sequences) or a number of batches of fresh windows")
    unknown = sorted(set(s.protocol.summed_accumulation) - set(OPTIMIZERS))
    if unknown:
        raise UserError(f"protocol.summed_accumulation names unknown optimizer(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(OPTIMIZERS)}")
    trainer_settings(s.optim)  # the curvature keys
    if entry_for(s.optim).curvature == "hutchinson":
        name = s.optim["name"]
        if t.strategy == "fsdp":
            raise UserError(f"optim={name} needs Hessian-vector products, which FSDP cannot run; use "
                            "train.strategy=ddp")
        if t.dtype == "float16":
            raise UserError(f"optim={name} cannot run its double backward in float16; use bfloat16")


def curvature_batch_size(settings: Settings) -> int | None:
    """Sequences per curvature pass over all ranks (optim.hessian_batch_size, or the training batch); None
    for an optimizer without a curvature estimate."""
    if entry_for(settings.optim).curvature is None:
        return None
    return trainer_settings(settings.optim).hessian_batch_size or settings.train.global_batch_size


def split_over_ranks(batch_size: int, world_size: int, key: str) -> int:
    """Sequences per rank of a `batch_size`-sequence pass (the batch named `key`) over `world_size` ranks."""
    if batch_size % world_size:
        raise UserError(f"{key}={batch_size} does not split over world size {world_size}; pick a batch size "
                        "divisible by the number of ranks")
    return batch_size // world_size


def _micro_steps(batch_size: int, micro_batch_size: int, world_size: int, batch_key: str,
                 micro_key: str) -> int:
    """Micro-steps per pass of `batch_size` sequences; refused unless micro-batch × world size divides it."""
    if batch_size % (micro_batch_size * world_size):
        raise UserError(f"{batch_key}={batch_size} is not divisible by {micro_key}={micro_batch_size} × "
                        f"world size {world_size}; pick sizes whose product divides it")
    return batch_size // (micro_batch_size * world_size)


@dataclass(frozen=True)
class BatchPlan(BatchLayout):
    """The batch arithmetic of a run, checked on creation and handed to the loader: `global_batch_size`
    sequences per optimizer step over all ranks, `micro_batch_size` per forward on one rank, `world_size`
    ranks, hence `grad_accum_steps` micro-steps per optimizer step; and for optimizers with a curvature
    pass, its own `hessian_batch_size` sequences in micro-batches of `hessian_micro_batch_size`."""

    hessian_batch_size: int | None = None
    hessian_micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        split_over_ranks(self.global_batch_size, self.world_size, "train.global_batch_size")
        _ = self.grad_accum_steps
        if self.hessian_batch_size is not None:
            split_over_ranks(self.hessian_batch_size, self.world_size, "optim.hessian_batch_size")
            _ = self.hessian_accum_steps

    @property
    def grad_accum_steps(self) -> int:
        return _micro_steps(self.global_batch_size, self.micro_batch_size, self.world_size,
                            "train.global_batch_size", "train.micro_batch_size")

    @property
    def hessian_accum_steps(self) -> int:
        """Micro-steps per curvature pass."""
        return _micro_steps(self.hessian_batch_size, self.hessian_micro_batch_size, self.world_size,
                            "optim.hessian_batch_size", "train.hessian_micro_batch_size")

    @property
    def tokens_per_step(self) -> int:
        """Predictions per optimizer step over all ranks and micro-steps (Sophia-G's `bs` unless
        optim.hessian_batch_size sets the curvature pass apart)."""
        return self.global_batch_size * self.block_size


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
