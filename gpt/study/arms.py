"""The study's arms (one optimizer on one model), resolved against the training config, and their runs.

An arm composes `configs/train.yaml` exactly as `python train.py` would with the study's overrides, so every
mistake in the study file (an unknown model, a misspelt key, an optimizer setting its class does not take,
an optimizer that needs another schedule) is found before any run starts. From the composed config it takes
the references of the tuned hyper-parameters left unset in the study, the model's parameter count (for
budgets in tokens per parameter), the tokens per step, and the FLOPs per token the plan charges. A run is an
arm, a budget, a configuration of the tuned hyper-parameters and a seed; its directory is named by those
values and a hash of every train.py override, so two studies that declare the same run share it, and a run
that differs in anything else never lands in another's directory.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf

from common.errors import UserError
from gpt.config import ModelSettings, Settings, describe_composition_error, parse_config
from gpt.model import GPT
from gpt.plan import training_flops_per_token
from gpt.protocol import evaluation_sequences
from gpt.study.schema import Budget, LadderSpec, OptimizerSpec, Study
from gpt.study.search import Ladder, Point, values_of
from optim import build_optimizer, check_run, entry_for

# Keys the study sets for every run: a study file may not set them itself.
STUDY_SET_KEYS = ("train.max_steps", "train.seed", "out_dir", "train.dry_run")
_PLAIN = re.compile(r"[A-Za-z0-9_./+-]+")


def override_value(value: Any) -> str:
    """A value in Hydra's override grammar: numbers and booleans as such, strings quoted where needed."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.fullmatch(text) and not _reads_as_other_type(text):
        return text
    # Hydra's quoted strings: backslashes escape only before a quote or the closing quote
    doubled = re.sub(r"(\\+)(?='|$)", lambda run: run.group(1) * 2, text)
    return "'" + doubled.replace("'", "\\'") + "'"


def _reads_as_other_type(text: str) -> bool:
    """Whether Hydra would read the unquoted text as a number, a boolean or null rather than a string."""
    if text.lower() in ("true", "false", "null"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def rounded(value: float, digits: int = 6) -> float:
    return float(f"{value:.{digits}g}")


def compose_train(overrides: list[str], where: str) -> Any:
    """configs/train.yaml composed with `overrides`, as `python train.py OVERRIDES` composes it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="configs", version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    except HydraException as error:
        raise UserError(f"{where}: {describe_composition_error(error)}") from None
    finally:
        GlobalHydra.instance().clear()


@dataclass(frozen=True)
class Arm:
    """One optimizer on one model: what every run of it shares."""

    model: str
    spec: OptimizerSpec
    ladders: tuple[Ladder, ...]
    base_overrides: tuple[str, ...]  # every override but the tuned values, min_lr, steps, seed and out_dir
    settings: Settings  # composed at the reference values (for the plan's figures)
    params: int  # the model's parameters, the tied embedding once (budgets per parameter use it)
    flops_per_token: float  # training FLOPs per token, curvature passes included
    eval_tokens: int  # validation tokens per evaluation (forward only)
    base_lr: float  # optim.lr as configured, for min_lr when lr is not tuned

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def tokens_per_step(self) -> int:
        return self.settings.train.global_batch_size * self.settings.model.block_size

    def steps(self, budget: Budget, tokens_per_parameter: float) -> int:
        tokens = (budget.tokens if budget.tokens is not None
                  else budget.chinchilla * tokens_per_parameter * self.params)
        return max(1, round(tokens / self.tokens_per_step))


@dataclass(frozen=True)
class RunSpec:
    """One run: its place in the study and the train.py command that makes it."""

    arm: Arm
    budget: int  # index into the study's budgets
    steps: int
    point: Point
    seed: int
    overrides: tuple[str, ...]  # the train.py overrides, out_dir last
    out_dir: Path

    @property
    def values(self) -> dict[str, float]:
        return values_of(self.arm.ladders, self.point)


def run_spec(study: Study, arm: Arm, budget: int, point: Point, seed: int) -> RunSpec:
    steps = arm.steps(study.budgets[budget], study.tokens_per_parameter)
    values = values_of(arm.ladders, point)
    tuned = [f"{ladder.key}={override_value(values[ladder.name])}" for ladder in arm.ladders]
    lr = next((values[ladder.name] for ladder in arm.ladders if ladder.key == "optim.lr"), arm.base_lr)
    min_lr = ([f"schedule.min_lr={rounded(study.final_lr_fraction * lr)!r}"]
              if study.final_lr_fraction is not None else [])
    overrides = [*arm.base_overrides, *tuned, *min_lr, f"train.max_steps={steps}", f"train.seed={seed}"]
    digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:10]
    name = "-".join([*(f"{n}{v:.3g}" for n, v in values.items()), f"seed{seed}", digest])
    out_dir = Path(study.run_root) / f"{arm.model}-{arm.label}" / f"{steps}steps" / name
    return RunSpec(arm, budget, steps, point, seed, (*overrides, f"out_dir={override_value(str(out_dir))}"),
                   out_dir)


def _check_settable(flat: dict[str, Any], where: str, tuned: list[str]) -> None:
    taken = [key for key in flat if key in STUDY_SET_KEYS or key in tuned]
    if taken:
        raise UserError(f"{where} sets {', '.join(taken)}, which the study sets for each run (budget, seed, "
                        "run directory, tuned values): remove it")


def _reference(spec: LadderSpec, cfg: Any, where: str) -> float:
    configured = OmegaConf.select(cfg, spec.key, default=None)
    if not isinstance(configured, (int, float)) or isinstance(configured, bool):
        raise UserError(f"{where}: {spec.key} is not a numeric setting of this run's config "
                        f"(it holds {configured!r}); give the hyper-parameter its train.py key (`key:`)")
    reference = configured if spec.reference is None else spec.reference
    if spec.scale == "log" and reference <= 0:
        raise UserError(f"{where}: a log-scale ladder needs a reference > 0, got {reference}")
    if spec.scale == "values" and reference not in spec.values:
        raise UserError(f"{where}: the configured {spec.key}={reference} is not among its values "
                        f"{list(spec.values)}; give a reference from the list")
    return float(reference)


@functools.lru_cache(maxsize=8)
def meta_model(fields: tuple[tuple[str, Any], ...]) -> GPT:
    """The model's shapes without its memory (built once per model: the arms of a study share it)."""
    with torch.device("meta"):
        return GPT(ModelSettings(**dict(fields)))


def resolve_arm(study: Study, model: str, spec: OptimizerSpec) -> Arm:
    """Compose and check the arm's config; every problem is a UserError naming the study's key."""
    where = f"study {study.name}, optimizer {spec.label} on {model}"
    tuned_keys = [ladder.key for ladder in spec.tune]
    if study.final_lr_fraction is not None:
        tuned_keys.append("schedule.min_lr")  # set from the lr: the final learning rate's fraction
    _check_settable(study.overrides, f"study {study.name}.overrides", tuned_keys)
    _check_settable(spec.overrides, f"study {study.name}.optimizers.{spec.label}.overrides", tuned_keys)
    choices = [f"model={model}", f"data={study.data}", f"optim={spec.optim}"]
    settings_overrides = [f"{key}={override_value(value)}"
                          for key, value in {**study.overrides, **spec.overrides}.items()]
    probe = ["out_dir=runs/study/_probe", "train.max_steps=1"]
    cfg = compose_train([*choices, *settings_overrides, *probe], where)
    schedules = entry_for(cfg.optim).schedules
    if schedules is not None and cfg.schedule.name not in schedules:
        # schedule-free needs the constant schedule: selected here, the study's warm-up still applies
        choices.append(f"schedule={schedules[0]}")
        cfg = compose_train([*choices, *settings_overrides, *probe], where)
    ladders = tuple(Ladder(s.name, s.key, s.scale, _reference(s, cfg, f"{where}, tune.{s.name}"), s.step,
                           s.points, s.limits, s.values) for s in spec.tune)
    for ladder in ladders:  # the plan's config: every tuned value at its reference
        OmegaConf.update(cfg, ladder.key, ladder.value(ladder.start), merge=False)
    try:
        settings = parse_config(cfg)  # typed and checked; values left to the device stay null
        network = meta_model(tuple(sorted(asdict(settings.model).items())))
        check_run(settings.optim, strategy="single", schedule=settings.schedule.name)
        tokens_per_step = settings.train.global_batch_size * settings.model.block_size
        build_optimizer(settings.optim, network, tokens_per_step)
        eval_tokens = evaluation_sequences(settings.protocol, settings.train) * settings.model.block_size
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    for ladder in ladders:
        if not all(math.isfinite(ladder.value(rung)) for rung in ladder.limits):
            raise UserError(f"{where}, tune.{ladder.name}: its limits reach values that are not finite")
    return Arm(model, spec, ladders, tuple([*choices, *settings_overrides]), settings, network.num_params(),
               training_flops_per_token(network, settings.optim, settings.train.global_batch_size),
               eval_tokens, float(settings.optim["lr"]))


def resolve_arms(study: Study) -> list[Arm]:
    """Every arm of the study, models outer and optimizers in the file's order; budgets checked too."""
    arms = [resolve_arm(study, model, spec) for model in study.models for spec in study.optimizers.values()]
    for arm in arms:
        warmups = [arm.settings.schedule.warmup_steps]
        for ladder in arm.ladders:
            if ladder.key == "schedule.warmup_steps":
                warmups.append(ladder.value(ladder.limits[1]))
        for budget in study.budgets:
            steps = arm.steps(budget, study.tokens_per_parameter)
            if max(warmups) >= steps:
                raise UserError(f"study {study.name}: budget {budget.label()} gives {arm.label} on "
                                f"{arm.model} {steps} steps, no more than its warm-up of {max(warmups)}: a "
                                "run would end before reaching its peak learning rate; raise the budget or "
                                "shorten schedule.warmup_steps")
    return arms
