"""A study file, checked: the typed form of `configs/study/<name>.yaml` as composed by Hydra.

Every problem is a `UserError` naming the key and what it accepts, raised before any run starts. The file's
defaults live in `configs/run_study.yaml` (the study group is merged over them). A tuned hyper-parameter is
declared once for the whole study under `tune` (the same search for every optimizer: the fairness the study
is for) and an optimizer's own `tune` entry may change its fields, usually only its `reference`, or add a
hyper-parameter; an own entry that names a `scale` is a whole search of its own, not merged with the shared
one. A reference left out is the optimizer's configured value, filled in by gpt/study/arms.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import UserError
from gpt.study.search import SCALES

STUDY_KEYS = ("models", "data", "overrides", "baseline", "optimizers", "budgets", "seeds", "tuning_seed",
              "tune", "max_rounds", "tune_at", "final_lr_fraction", "tokens_per_parameter",
              "bootstrap_samples", "confidence", "out_dir", "run_root", "dry_run")
OPTIMIZER_KEYS = ("optim", "overrides", "tune")
LADDER_KEYS = ("key", "scale", "reference", "step", "points", "limits", "values")
TUNE_AT = ("every_budget", "smallest_budget")
# Names whose train.py key is not optim.<name>.
KEY_OF_NAME = {"beta1": "optim.betas.0", "beta2": "optim.betas.1", "warmup_steps": "schedule.warmup_steps"}


@dataclass(frozen=True)
class LadderSpec:
    """A tuned hyper-parameter as declared; `reference` None: the optimizer's configured value."""

    name: str
    key: str
    scale: str
    reference: float | None
    step: float | None
    points: tuple[int, ...]
    limits: tuple[int, int]
    values: tuple[float, ...]


@dataclass(frozen=True)
class OptimizerSpec:
    label: str  # the name the report uses (the key under `optimizers`)
    optim: str  # the configs/optim/ choice
    overrides: dict[str, Any]  # train.py settings for this optimizer's runs (flattened keys)
    tune: tuple[LadderSpec, ...]


@dataclass(frozen=True)
class Budget:
    """A training budget in tokens, or in multiples of `tokens_per_parameter` × the model's parameters."""

    tokens: int | None
    chinchilla: float | None

    def label(self) -> str:
        return f"{self.tokens:,} tokens" if self.tokens is not None else f"{self.chinchilla:g}× Chinchilla"


@dataclass(frozen=True)
class Study:
    name: str
    models: tuple[str, ...]
    data: str
    overrides: dict[str, Any]
    baseline: str
    optimizers: dict[str, OptimizerSpec]
    budgets: tuple[Budget, ...]
    seeds: tuple[int, ...]
    tuning_seed: int
    max_rounds: int
    tune_at: str
    final_lr_fraction: float | None
    tokens_per_parameter: float
    bootstrap_samples: int
    confidence: float
    out_dir: str
    run_root: str
    dry_run: bool


def flatten_overrides(tree: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """{"train": {"max_steps": 3}} -> {"train.max_steps": 3}: train.py's override keys."""
    if not isinstance(tree, Mapping):
        raise UserError(f"{where} must be a mapping of train.py settings, e.g. {{train: {{max_steps: 300}}}}")
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_overrides(value, where, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unknown(where: str, given: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    unknown = [key for key in given if key not in valid]
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(valid)}")


def _integers(value: Any, where: str, count: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value) or (count and len(value) != count):
        size = f"{count} " if count else ""
        raise UserError(f"{where} must be a list of {size}integers (rungs: steps away from the reference), "
                        f"got {value!r}")
    return tuple(value)


def _ladder(name: str, fields: Mapping[str, Any], where: str) -> LadderSpec:
    _unknown(where, fields, LADDER_KEYS)
    scale = fields.get("scale")
    if scale not in SCALES:
        raise UserError(f"{where}.scale must be one of {', '.join(SCALES)}, got {scale!r}")
    reference = fields.get("reference")
    if reference is not None and not _is_number(reference):
        raise UserError(f"{where}.reference must be a number (or left out: the optimizer's configured value)")
    key = fields.get("key") or KEY_OF_NAME.get(name, f"optim.{name}")
    if scale == "values":
        values = fields.get("values")
        if not isinstance(values, (list, tuple)) or not values or not all(_is_number(v) for v in values):
            raise UserError(f"{where}.values must be a list of numbers for scale: values, got {values!r}")
        if list(values) != sorted(set(values)):
            raise UserError(f"{where}.values must be increasing and distinct, got {list(values)}")
        extra = [k for k in ("step", "points", "limits") if fields.get(k) is not None]
        if extra:
            raise UserError(f"{where}: {', '.join(extra)} apply to log and linear scales; scale: values "
                            "sweeps the listed values")
        if reference is not None and reference not in values:
            raise UserError(f"{where}.reference {reference} is not among its values {list(values)}")
        count = len(values)
        return LadderSpec(name, key, scale, reference, None, tuple(range(count)), (0, count - 1),
                          tuple(values))
    step = fields.get("step")
    if not _is_number(step) or (scale == "log" and step <= 1) or (scale == "linear" and step <= 0):
        minimum = "a number > 1 (the ratio between rungs)" if scale == "log" else "a number > 0"
        raise UserError(f"{where}.step must be {minimum}, got {step!r}")
    points = _integers(fields.get("points"), f"{where}.points")
    limits = _integers(fields.get("limits", [min(points), max(points)]), f"{where}.limits", 2)
    if not limits[0] <= min(points) <= max(points) <= limits[1]:
        raise UserError(f"{where}.limits {list(limits)} must enclose its points {list(points)}")
    if fields.get("values") is not None:
        raise UserError(f"{where}.values applies to scale: values only")
    return LadderSpec(name, key, scale, reference, float(step), tuple(sorted(set(points))), limits, ())


def _optimizer(label: str, fields: Any, shared: Mapping[str, Any], where: str) -> OptimizerSpec:
    fields = {} if fields is None else fields
    if not isinstance(fields, Mapping):
        raise UserError(f"{where} must be a mapping (optim, overrides, tune) or empty")
    _unknown(where, fields, OPTIMIZER_KEYS)
    own = fields.get("tune") or {}
    if not isinstance(own, Mapping):
        raise UserError(f"{where}.tune must map hyper-parameter names to their search fields")
    ladders = []
    for name in [*shared, *(name for name in own if name not in shared)]:
        mine = own.get(name) or {}
        merged = dict(mine) if "scale" in mine else {**(shared.get(name) or {}), **mine}
        ladders.append(_ladder(name, merged, f"{where}.tune.{name}"))
    keys = [ladder.key for ladder in ladders]
    if len(set(keys)) != len(keys):
        raise UserError(f"{where}.tune sets one train.py key twice: {', '.join(keys)}")
    optim = fields.get("optim", label)
    if not isinstance(optim, str):
        raise UserError(f"{where}.optim must name a configs/optim/ choice, got {optim!r}")
    return OptimizerSpec(label, optim, flatten_overrides(fields.get("overrides") or {}, f"{where}.overrides"),
                         tuple(ladders))


def _budget(fields: Any, where: str) -> Budget:
    if not isinstance(fields, Mapping) or len(fields) != 1 or not set(fields) <= {"tokens", "chinchilla"}:
        raise UserError(f"{where} must be {{tokens: N}} or {{chinchilla: K}} (K × tokens_per_parameter "
                        f"tokens per parameter), got {fields!r}")
    (kind, value), = fields.items()
    if not _is_number(value) or value <= 0 or (kind == "tokens" and not isinstance(value, int)):
        raise UserError(f"{where}.{kind} must be a positive {'integer' if kind == 'tokens' else 'number'}, "
                        f"got {value!r}")
    return Budget(value, None) if kind == "tokens" else Budget(None, float(value))


def load_study(node: Mapping[str, Any], name: str) -> Study:
    """The study of a composed `study` node (a plain container, interpolations resolved)."""
    where = f"study {name}"
    if name.startswith("_") or "/" in name:
        raise UserError(f"{where}: a study name may not start with '_' or contain '/' (its runs' folder "
                        "and reports go to runs/study/<name>)")
    _unknown(where, node, STUDY_KEYS)
    missing = [key for key in ("models", "data", "optimizers", "budgets") if not node.get(key)]
    if missing:
        raise UserError(f"{where} declares no {', '.join(missing)}: a study needs models, data, optimizers "
                        "and budgets (docs/study.md)")
    models = node["models"]
    if not isinstance(models, (list, tuple)) or not all(isinstance(m, str) for m in models):
        raise UserError(f"{where}.models must be a list of configs/model/ choices, got {models!r}")
    shared = node.get("tune") or {}
    if not isinstance(shared, Mapping) or not all(isinstance(v, Mapping) for v in shared.values()):
        raise UserError(f"{where}.tune must map hyper-parameter names to their search fields")
    optimizers = node["optimizers"]
    if not isinstance(optimizers, Mapping):
        raise UserError(f"{where}.optimizers must map labels to optimizer entries")
    specs = {label: _optimizer(label, fields, shared, f"{where}.optimizers.{label}")
             for label, fields in optimizers.items()}
    if node.get("baseline") not in specs:
        raise UserError(f"{where}.baseline={node.get('baseline')!r} is not one of its optimizers "
                        f"({', '.join(specs)}): the speed-ups are measured against it")
    budgets = node["budgets"]
    if not isinstance(budgets, (list, tuple)):
        raise UserError(f"{where}.budgets must be a list of {{tokens: N}} or {{chinchilla: K}}")
    parsed = tuple(_budget(b, f"{where}.budgets[{i}]") for i, b in enumerate(budgets))
    if len(set(parsed)) != len(parsed):
        raise UserError(f"{where}.budgets lists a budget twice")
    seeds = node.get("seeds")
    if (not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise UserError(f"{where}.seeds must be a list of distinct integers >= 0, got {seeds!r}")
    checks = [
        ("tuning_seed", lambda v: _is_integer(v) and v >= 0, "an integer >= 0"),
        ("max_rounds", lambda v: _is_integer(v) and v >= 1, "an integer >= 1"),
        ("tune_at", lambda v: v in TUNE_AT, " or ".join(TUNE_AT)),
        ("final_lr_fraction", lambda v: v is None or (_is_number(v) and 0 <= v <= 1),
         "null (schedule.min_lr as configured) or a fraction of optim.lr in [0, 1]"),
        ("tokens_per_parameter", lambda v: _is_number(v) and v > 0, "a number > 0"),
        ("bootstrap_samples", lambda v: _is_integer(v) and v >= 100,
         "an integer >= 100"),
        ("confidence", lambda v: _is_number(v) and 0.5 <= v < 1, "a number in [0.5, 1)"),
        ("data", lambda v: isinstance(v, str), "a configs/data/ choice"),
        ("out_dir", lambda v: isinstance(v, str) and v.strip(), "a directory"),
        ("run_root", lambda v: isinstance(v, str) and v.strip(), "a directory"),
        ("dry_run", lambda v: isinstance(v, bool), "true or false"),
    ]
    for key, valid, what in checks:
        if not valid(node.get(key)):
            raise UserError(f"{where}.{key} must be {what}, got {node.get(key)!r}")
    return Study(
        name=name, models=tuple(models), data=node["data"],
        overrides=flatten_overrides(node.get("overrides") or {}, f"{where}.overrides"),
        baseline=node["baseline"], optimizers=specs, budgets=parsed, seeds=tuple(seeds),
        tuning_seed=node["tuning_seed"], max_rounds=node["max_rounds"], tune_at=node["tune_at"],
        final_lr_fraction=node["final_lr_fraction"], tokens_per_parameter=float(node["tokens_per_parameter"]),
        bootstrap_samples=node["bootstrap_samples"], confidence=float(node["confidence"]),
        out_dir=node["out_dir"], run_root=node["run_root"], dry_run=node["dry_run"],
    )
