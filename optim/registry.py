"""The optimizer registry: each optimizer declares, next to its class, all the rest of the project reads.

An `OptimizerEntry` names the class (loaded on first use, so an optional package is imported only when its
optimizer is chosen), how to build its param groups, how much state it keeps (the plan's memory estimate),
whether it can step FSDP shards, which schedules it accepts, and how to switch to its evaluation weights.
The plan, the trainer's checks, the benchmark, the tests and the docs table read these entries; adding an
optimizer is one module that calls `register(...)` plus one `configs/optim/<name>.yaml` (docs/extending.md).
Modules of this package register on import (`optim/__init__.py` imports them all); a module elsewhere is
named by the config's `module` key and imported before the name is looked up.

The config holds the optimizer's hyper-parameters under their constructor names plus the trainer-only
curvature keys (`hessian_interval`, `hessian_batch_size`, `hessian_grad_clip`) and `module`. Every other key
must be a constructor keyword, so a misspelt key fails at start-up with the accepted ones listed. Values the
framework knows better than a user are injected, never configured: Sophia-G's `bs` (the predictions its
curvature pass averages over, all ranks: `hessian_batch_size` × block_size, by default the training step's
tokens), Adam-mini's `n_head` (from `model.config`), and each entry's `reserved` keys (AdamW's fused/foreach
kernel choice, for instance).

Weight decay follows the official Sophia code (the nanoGPT `configure_optimizers` it forked), which produced
the paper's numbers: only the weights of `nn.Linear` layers decay. Embeddings (wte — the tensor tied to
lm_head — and wpe), LayerNorm and RMSNorm weights and all biases do not. Current nanoGPT decays every ≥2-D
tensor including the tied embedding; using that rule would change every baseline. In the other families
(docs/models.md) the rule reads the same: SwiGLU's three matrices decay, and so does an untied `lm_head`
(an `nn.Linear`, as in the nanoGPT rule before it tied the head). Each entry's `grouping` says, in a line,
how its optimizer splits a model's parameters (docs/models.md tabulates them).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch
from torch import nn

from common.errors import UserError

TRAINER_KEYS = ("hessian_interval", "hessian_batch_size", "hessian_grad_clip")
FRAMEWORK_KEYS = ("name", "module", *TRAINER_KEYS)  # config keys that are not constructor keywords


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Named param groups under the project's one weight-decay rule (see the module docstring).

    A parameter decays iff it is the weight of an `nn.Linear` and not also an `nn.Embedding`'s weight (the
    tied lm_head/wte tensor). Frozen parameters are left out; empty groups are dropped.
    """
    modules = list(model.modules())
    linear = {id(m.weight) for m in modules if isinstance(m, nn.Linear)}
    embedding = {id(m.weight) for m in modules if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            decays = id(param) in linear and id(param) not in embedding
            (decay if decays else no_decay).append((name, param))
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


DEFAULT_GROUPING = ("two groups: nn.Linear weights (attention, MLP incl. SwiGLU's gate, an untied head) "
                    "decay; embeddings, norm weights and biases do not")


def weight_decay_groups(model: nn.Module, options: Mapping[str, Any], defaults: Mapping[str, Any]
                        ) -> list[dict[str, Any]]:
    """The default group builder: `param_groups` with the configured (or the constructor's) weight decay."""
    return param_groups(model, options.get("weight_decay", defaults.get("weight_decay", 0.0)))


def trainable(model: nn.Module) -> Iterator[nn.Parameter]:
    return (param for param in model.parameters() if param.requires_grad)


def full_size_state(tensors: int) -> Callable[[nn.Module, Mapping[str, Any]], int]:
    """A state-size rule: `tensors` parameter-sized float32 tensors per parameter (AdamW: 2, m and v)."""
    return lambda model, cfg: tensors * sum(param.numel() for param in trainable(model))


def construct(cls: type[torch.optim.Optimizer], groups: list[dict[str, Any]], kwargs: dict[str, Any]
              ) -> torch.optim.Optimizer:
    return cls(groups, **kwargs)


@dataclass(frozen=True)
class OptimizerEntry:
    """What the project needs to know about one optimizer; `register` it next to the class."""

    name: str  # the `optim.name` that selects it
    load: Callable[[], type[torch.optim.Optimizer]]  # the class (a function: optional packages load lazily)
    # float32 state elements for this model and config: the plan's memory estimate
    state_numel: Callable[[nn.Module, Mapping[str, Any]], int]
    # (model, configured options, constructor defaults) -> param groups
    param_groups: Callable[..., list[dict[str, Any]]] = weight_decay_groups
    shards: bool = True  # steps FSDP2 shards (elementwise or DTensor-aware updates); False: FSDP refused
    shard_reason: str = ""  # why not, for the refusal
    schedules: tuple[str, ...] | None = None  # the schedules it accepts; None: any
    schedule_reason: str = ""
    reserved: Mapping[str, str] = field(default_factory=dict)  # keys the framework sets -> why
    build: Callable[[type[torch.optim.Optimizer], list[dict[str, Any]], dict[str, Any]],
                    torch.optim.Optimizer] = construct
    grouping: str = DEFAULT_GROUPING  # how its param groups split a model's parameters, in one line
    # enter: the parameters hold the weights to evaluate and save; exit: back to the training weights
    evaluation_weights: Callable[[torch.optim.Optimizer], contextlib.AbstractContextManager] | None = None

    @cached_property
    def cls(self) -> type[torch.optim.Optimizer]:
        return self.load()

    @property
    def curvature(self) -> str | None:
        """The curvature estimator the trainer runs for it: None, "gnb" or "hutchinson" (class attribute)."""
        return getattr(self.cls, "curvature", None)


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register(entry: OptimizerEntry) -> OptimizerEntry:
    if entry.name in OPTIMIZERS and OPTIMIZERS[entry.name] != entry:
        raise ValueError(f"optimizer {entry.name!r} is registered twice")
    OPTIMIZERS[entry.name] = entry
    return entry


def entry_for(cfg: Mapping[str, Any]) -> OptimizerEntry:
    """The entry `cfg["name"]` selects, importing `cfg["module"]` first when the config names one."""
    module = cfg.get("module")
    if module is not None:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UserError(f"optim.module={module!r} cannot be imported ({error}); put its directory on "
                            "PYTHONPATH") from error
    name = cfg.get("name")
    if name not in OPTIMIZERS:
        hint = f" (optim.module={module!r} registers no such name)" if module is not None else ""
        raise UserError(f"unknown optimizer optim.name={name!r}{hint}; valid: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def optional_class(package: str, attribute: str, extra: str) -> Callable[[], type[torch.optim.Optimizer]]:
    """A loader for a class from an optional package: one line naming what to install when it is missing."""
    def load() -> type[torch.optim.Optimizer]:
        try:
            return getattr(importlib.import_module(package), attribute)
        except ImportError:
            raise UserError(f"this optimizer needs the '{package}' package: pip install '.[{extra}]' "
                            f"(or pip install {package})") from None
    return load


class TrainerSettings(NamedTuple):
    """The curvature pass's schedule: the trainer-only keys of the `optim` config, validated."""

    hessian_interval: int | None  # run the estimator at the start of step s when s % interval == 0
    hessian_batch_size: int | None  # sequences per curvature pass over all ranks; None: the training batch
    hessian_grad_clip: bool  # clip the GNB gradient at the training clip threshold (official Sophia-G)


def trainer_settings(cfg: Mapping[str, Any]) -> TrainerSettings:
    """The curvature keys of `cfg`, checked; (None, None, False) for optimizers without curvature.

    `hessian_interval` is required for optimizers with curvature; `hessian_grad_clip` applies to GNB only and
    defaults to True there (the official code clips the GNB gradient); none of the keys is accepted for an
    optimizer without curvature, where it could only be a mistake.
    """
    entry = entry_for(cfg)
    name, kind = entry.name, entry.curvature
    present = [key for key in TRAINER_KEYS if key in cfg]
    if kind is None:
        if present:
            raise UserError(f"optim.{present[0]} is set, but {name} uses no curvature estimate; remove it")
        return TrainerSettings(None, None, False)
    interval = cfg.get("hessian_interval")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise UserError(f"{name} needs optim.hessian_interval, an integer >= 1 (steps between curvature "
                        f"estimates), got {interval!r}")
    batch_size = cfg.get("hessian_batch_size")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise UserError(f"optim.hessian_batch_size must be null or an integer >= 1, got {batch_size!r}")
    if kind != "gnb" and "hessian_grad_clip" in cfg:
        raise UserError(f"optim.hessian_grad_clip applies to GNB curvature only; {name} uses {kind}: "
                        "remove it")
    clip = cfg.get("hessian_grad_clip", kind == "gnb")
    if not isinstance(clip, bool):
        raise UserError(f"optim.hessian_grad_clip must be true or false, got {clip!r}")
    return TrainerSettings(interval, batch_size, clip)


def check_run(cfg: Mapping[str, Any], *, strategy: str, schedule: str) -> None:
    """Refuse, in one line, a parallelism strategy or a schedule the optimizer's entry does not support."""
    entry = entry_for(cfg)
    if strategy == "fsdp" and not entry.shards:
        raise UserError(f"optim={entry.name} cannot step FSDP shards ({entry.shard_reason}); use "
                        "train.strategy=ddp")
    if entry.schedules is not None and schedule not in entry.schedules:
        raise UserError(f"optim={entry.name} needs schedule={' or '.join(entry.schedules)}, got "
                        f"schedule={schedule} ({entry.schedule_reason})")


def evaluation_weights(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any]
                       ) -> contextlib.AbstractContextManager:
    """Inside, the model holds the weights to evaluate and save (schedule-free: the averaged iterate)."""
    switch = entry_for(cfg).evaluation_weights
    return contextlib.nullcontext() if switch is None else switch(optimizer)


def curvature_predictions(cfg: Mapping[str, Any], model: nn.Module, tokens_per_step: int) -> int:
    """Sophia-G's `bs`: the predictions the GNB gradient is a mean over, so that bs·ĝ⊙ĝ estimates the
    Gauss-Newton diagonal whatever the pass's batch. The pass covers `hessian_batch_size` sequences over all
    ranks (of model.config.block_size tokens), or the training batch (`tokens_per_step`) when it is null."""
    batch_size = cfg.get("hessian_batch_size")
    if batch_size is None:
        return tokens_per_step
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is None:
        raise UserError("optim.hessian_batch_size needs the model's config.block_size to compute bs")
    return batch_size * block_size


def _injected(cls: type[torch.optim.Optimizer], model: nn.Module, bs: int) -> dict[str, Any]:
    """Constructor arguments the framework computes, never the user."""
    accepted = inspect.signature(cls).parameters
    injected: dict[str, Any] = {}
    if "bs" in accepted:
        injected["bs"] = bs
    if "n_head" in accepted:
        n_head = getattr(getattr(model, "config", None), "n_head", None)
        if n_head is None:
            raise UserError(f"{cls.__name__} partitions attention by head but the model has no config.n_head")
        injected["n_head"] = n_head
    return injected


_RESERVED = {
    "bs": "computed by the framework: the curvature pass's predictions over all ranks",
    "n_head": "read from the model config",
}


def _plain(value: Any) -> Any:
    """OmegaConf lists (betas) become tuples: optimizers compare and store them as plain Python values."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return value


def build_optimizer(cfg: Mapping[str, Any], model: nn.Module, tokens_per_step: int) -> torch.optim.Optimizer:
    """The optimizer `cfg["name"]` over `model`'s parameters; `cfg` is a mapping (dict or DictConfig)."""
    entry = entry_for(cfg)
    name, cls = entry.name, entry.cls
    trainer_settings(cfg)  # validate the curvature keys now, not when the trainer first reads them
    signature = inspect.signature(cls).parameters
    reserved = {key: why for key, why in _RESERVED.items() if key in signature} | dict(entry.reserved)
    accepted = [key for key in signature if key not in ("params", "named_params") and key not in reserved]
    options = {}
    for key, value in cfg.items():
        if key in FRAMEWORK_KEYS:
            continue
        if key in reserved:
            raise UserError(f"optim.{key} must not be set: it is {reserved[key]}")
        if key not in accepted:
            raise UserError(f"optim.{key} is not a {name} setting; accepted: {', '.join(accepted)}")
        options[key] = _plain(value)
    defaults = {key: p.default for key, p in signature.items() if p.default is not inspect.Parameter.empty}
    try:
        groups = entry.param_groups(model, options, defaults)
        injected = _injected(cls, model, curvature_predictions(cfg, model, tokens_per_step))
        return entry.build(cls, groups, {**options, **injected})
    except (ValueError, TypeError) as error:
        raise UserError(f"optim={name}: {error}") from error
