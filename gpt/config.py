"""Typed schema of the training config, and the values derived from it in one place.

Hydra composes plain YAML; this module checks it at start-up against dataclasses (a misspelt key or a wrong
type fails before any work, as a `UserError`), and computes the derived numbers — gradient accumulation,
tokens per step, decay steps — that must never be duplicated in YAML. The `optim` and `data`
groups have per-choice keys: the optimizer registry checks `optim`'s, and `data`'s must be among the keys the
data package reads. Hydra's own composition errors (an unknown `model=`, a misspelt key) are turned into one
line here too, so every config mistake reads the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from common.errors import UserError
from data.prepare import CONFIG_KEYS as DATA_KEYS
from optim import OPTIMIZERS

DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("auto", "single", "ddp", "fsdp")


@dataclass
class ModelSettings:
    name: str = "custom"
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304
    dropout: float = 0.0
    bias: bool = False
    scale_attn_by_inverse_layer_idx: bool = False


@dataclass
class TrainSettings:
    max_steps: int = 100000
    global_batch_size: int = 480
    micro_batch_size: int | None = None  # None: the largest that fits this GPU (gpt/device_defaults.py)
    hessian_micro_batch_size: int | None = None  # the curvature pass's; None: chosen likewise
    activation_checkpointing: bool = False
    eval_interval: int = 1000
    eval_sequences: int = 2400
    log_interval: int = 10
    ckpt_interval: int = 1000
    keep_checkpoints: int = 3
    seed: int = 1337
    grad_clip: float = 1.0
    dtype: str = "bfloat16"
    compile: bool | None = None  # None: on for CUDA, off elsewhere
    device: str = "auto"
    strategy: str = "auto"
    on_nonfinite: str = "stop"
    max_skipped: int = 10
    dry_run: bool = False
    gpu: str = "auto"
    assumed_mfu: float = 0.4
    init_from: str | None = None
    hellaswag_interval: int = 0
    hellaswag_data: str | None = None
    hellaswag_limit: int | None = None


@dataclass
class ScheduleSettings:
    name: str = "cosine"
    warmup_steps: int = 2000
    min_lr: float = 3e-5
    decay_steps: int | None = None


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
    enabled: bool = False
    project: str = "sophia-gpt"
    mode: str = "online"
    name: str | None = None


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
    for key in ("out_dir", "model", "train", "schedule", "optim", "data"):
        if key not in cfg:
            raise UserError(f"config has no '{key}': compose it from configs/train.yaml")
    known = [f.name for f in fields(Settings)]
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise UserError(f"unknown top-level config key(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    unknown = sorted(set(cfg.data) - DATA_KEYS)
    if unknown:
        raise UserError(f"unknown data key(s) {', '.join(unknown)}; valid: {', '.join(sorted(DATA_KEYS))}")
    container = OmegaConf.to_container(cfg, resolve=True)
    settings = Settings(
        out_dir=str(container["out_dir"]),
        model=_typed("model", ModelSettings, container["model"]),
        train=_typed("train", TrainSettings, container["train"]),
        schedule=_typed("schedule", ScheduleSettings, container["schedule"]),
        wandb=_typed("wandb", WandbSettings, container.get("wandb", {})),
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
    t, m = s.train, s.model
    if t.dtype not in DTYPES:
        raise UserError(f"train.dtype={t.dtype!r} is not one of {', '.join(DTYPES)}")
    if t.strategy not in STRATEGIES:
        raise UserError(f"train.strategy={t.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"train.on_nonfinite={t.on_nonfinite!r} must be 'stop' or 'skip'")
    for key in ("max_steps", "global_batch_size", "micro_batch_size", "hessian_micro_batch_size",
                "eval_interval", "eval_sequences", "log_interval", "ckpt_interval", "keep_checkpoints",
                "max_skipped"):
        if getattr(t, key) is not None and getattr(t, key) < 1:
            raise UserError(f"train.{key} must be at least 1 (got {getattr(t, key)})")
    if t.hellaswag_interval < 0 or t.hellaswag_interval % t.eval_interval:
        raise UserError(f"train.hellaswag_interval={t.hellaswag_interval} must be 0 (off) or a multiple of "
                        f"train.eval_interval={t.eval_interval}: HellaSwag is scored with validation loss")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if getattr(m, key) < 1:
            raise UserError(f"model.{key} must be at least 1 (got {getattr(m, key)})")
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")
    if not 0 <= m.dropout < 1:
        raise UserError(f"model.dropout={m.dropout} must be in [0, 1)")
    if not s.out_dir.strip():
        raise UserError("out_dir is empty; give the run its own directory, e.g. out_dir=runs/my_run")
    if not (math.isfinite(t.grad_clip) and t.grad_clip >= 0):
        raise UserError(f"train.grad_clip={t.grad_clip} must be a finite number >= 0 (0 disables clipping)")
    if not (math.isfinite(s.schedule.min_lr) and s.schedule.min_lr >= 0):
        raise UserError(f"schedule.min_lr={s.schedule.min_lr} must be a finite number >= 0")
    if s.schedule.warmup_steps < 0:
        raise UserError("schedule.warmup_steps must be >= 0")
    if s.schedule.decay_steps is not None and s.schedule.decay_steps < 1:
        raise UserError(f"schedule.decay_steps={s.schedule.decay_steps} must be at least 1 (or null: "
                        "train.max_steps)")
    unknown = sorted(set(s.protocol.summed_accumulation) - set(OPTIMIZERS))
    if unknown:
        raise UserError(f"protocol.summed_accumulation names unknown optimizer(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic for one run (micro-batch, accumulation, global batch), computed once."""

    world_size: int
    global_batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    block_size: int

    @property
    def tokens_per_step(self) -> int:
        """Predictions per optimizer step over all ranks and micro-steps (Sophia-G's `bs` unless
        optim.hessian_batch_size sets the curvature pass apart)."""
        return self.global_batch_size * self.block_size


def plan_batches(train: TrainSettings, block_size: int, world_size: int) -> BatchPlan:
    per_pass = train.micro_batch_size * world_size
    if train.global_batch_size % per_pass:
        raise UserError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by train.micro_batch_size="
            f"{train.micro_batch_size} × world size {world_size}; pick sizes whose product divides it"
        )
    return BatchPlan(world_size, train.global_batch_size, train.micro_batch_size,
                     train.global_batch_size // per_pass, block_size)


def describe_composition_error(error: HydraException) -> str:
    """One line for a config Hydra could not compose, in place of its multi-line report."""
    if isinstance(error, MissingConfigException) and error.options:
        group, _, name = error.missing_cfg_file.partition("/")  # e.g. experiment / paper/fig4_small_adamw
        return f"unknown {group}={name}; valid: {', '.join(sorted(error.options))}"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}: {error.message.splitlines()[0]}"
    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return f"{cause.full_key} is not a config key (misspelt?); `python train.py --cfg job` lists them"
    message = str(error).strip().splitlines()[0]
    return f"{message} ({str(cause).strip().splitlines()[0]})" if cause is not None else message
