"""Build an optimizer from the `optim` config group: one name → class table, one weight-decay rule.

The config holds the optimizer's hyper-parameters under their constructor names plus the trainer-only
curvature keys (`hessian_interval`, `hessian_batch_size`, `hessian_grad_clip`). Every other key must be a
constructor keyword, so a misspelt key fails at start-up with the accepted ones listed. Values the framework
knows better than a user are injected, never configured: Sophia-G's `bs` (the predictions its curvature
pass averages over, all ranks: `hessian_batch_size` × block_size, by default the training step's tokens),
Adam-mini's `n_head` (from `model.config`), AdamW's fused/foreach kernel choice.

Weight decay follows the official Sophia code (the nanoGPT `configure_optimizers` it forked), which produced
the paper's numbers: only the weights of `nn.Linear` layers decay. Embeddings (wte — the tensor tied to
lm_head — and wpe), LayerNorm weights and all biases do not. Current nanoGPT decays every ≥2-D tensor
including the tied embedding; using that rule would change every baseline.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from common.errors import UserError
from optim.adahessian import AdaHessian
from optim.adam_mini import AdamMini
from optim.lion import Lion
from optim.sgd_sai import SGDSaI
from optim.sophia import SophiaG, SophiaH

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "lion": Lion,
    "sophia_g": SophiaG,
    "sophia_h": SophiaH,
    "sgd_sai": SGDSaI,
    "adam_mini": AdamMini,
    "adahessian": AdaHessian,
}
TRAINER_KEYS = ("hessian_interval", "hessian_batch_size", "hessian_grad_clip")


class TrainerSettings(NamedTuple):
    """The curvature pass's schedule: the trainer-only keys of the `optim` config, validated."""

    hessian_interval: int | None  # run the estimator at the start of step s when s % interval == 0
    hessian_batch_size: int | None  # sequences per curvature pass over all ranks; None: the training batch
    hessian_grad_clip: bool  # clip the GNB gradient at the training clip threshold (official Sophia-G)


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


def _optimizer_class(cfg: Mapping[str, Any]) -> tuple[str, type[torch.optim.Optimizer]]:
    name = cfg.get("name")
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer optim.name={name!r}; valid: {', '.join(OPTIMIZERS)}")
    return name, OPTIMIZERS[name]


def trainer_settings(cfg: Mapping[str, Any]) -> TrainerSettings:
    """The curvature keys of `cfg`, checked; (None, None, False) for optimizers without curvature.

    `hessian_interval` is required for optimizers with curvature; `hessian_grad_clip` applies to GNB only and
    defaults to True there (the official code clips the GNB gradient); none of the keys is accepted for an
    optimizer without curvature, where it could only be a mistake.
    """
    name, cls = _optimizer_class(cfg)
    kind = getattr(cls, "curvature", None)
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
_ADAMW_RESERVED = {
    "fused": "chosen by the registry: fused kernels where supported",
    "foreach": "chosen by the registry: the fallback where fused kernels are missing",
}


def _construct(cls: type[torch.optim.Optimizer], groups: list[dict[str, Any]], kwargs: dict[str, Any]
               ) -> torch.optim.Optimizer:
    if cls is torch.optim.AdamW:
        try:
            return cls(groups, **kwargs, fused=True)
        except RuntimeError:  # no fused kernel for these parameters' device or dtype
            return cls(groups, **kwargs, foreach=True)
    return cls(groups, **kwargs)


def _plain(value: Any) -> Any:
    """OmegaConf lists (betas) become tuples: optimizers compare and store them as plain Python values."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return value


def build_optimizer(cfg: Mapping[str, Any], model: nn.Module, tokens_per_step: int) -> torch.optim.Optimizer:
    """The optimizer `cfg["name"]` over `model`'s parameters; `cfg` is a mapping (dict or DictConfig)."""
    name, cls = _optimizer_class(cfg)
    trainer_settings(cfg)  # validate the curvature keys now, not when the trainer first reads them
    signature = inspect.signature(cls).parameters
    reserved = {key: why for key, why in _RESERVED.items() if key in signature}
    if cls is torch.optim.AdamW:
        reserved.update(_ADAMW_RESERVED)
    accepted = [key for key in signature if key not in ("params", "named_params") and key not in reserved]
    options = {}
    for key, value in cfg.items():
        if key == "name" or key in TRAINER_KEYS:
            continue
        if key in reserved:
            raise UserError(f"optim.{key} must not be set: it is {reserved[key]}")
        if key not in accepted:
            raise UserError(f"optim.{key} is not a {name} setting; accepted: {', '.join(accepted)}")
        options[key] = _plain(value)
    groups = param_groups(model, options.get("weight_decay", signature["weight_decay"].default))
    try:
        injected = _injected(cls, model, curvature_predictions(cfg, model, tokens_per_step))
        return _construct(cls, groups, {**options, **injected})
    except (ValueError, TypeError) as error:
        raise UserError(f"optim={name}: {error}") from error
