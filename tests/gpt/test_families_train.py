"""Every registered optimizer trains the tiny GPT-NeoX and Llama-style models (configs/model/neox_tiny.yaml,
llama_tiny.yaml, shrunk like the other trainer tests) on the quick start's data through the trainer: the loss
falls, and N/2 steps plus a resume give the losses of N steps straight, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt.trainer import train
from optim import OPTIMIZERS
from tests.hydra_compose import compose_train, losses, read_records, tiny_run

MODELS = ("neox_tiny", "llama_tiny")


def check_trains_and_resumes(tmp_path: Path, data: Path, model: str, optim: str) -> None:
    """The quick start's settings for `model` and `optim` (its tuned rate: configs/hparams/<model>_<optim>),
    shrunk, with a short warm-up and a curvature pass every 2 steps, so that one falls on each side of the
    resume."""
    extra = [f"model={model}", f"optim={optim}", "schedule.warmup_steps=2", "schedule.decay_steps=8"]
    if OPTIMIZERS[optim].curvature:
        extra.append("optim.hessian_interval=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose_train(tiny_run(straight, data, *extra)))
    train(compose_train(tiny_run(resumed, data, *extra, "train.max_steps=4")))
    train(compose_train(tiny_run(resumed, data, *extra)))
    assert losses(straight) == losses(resumed)
    val = [r["val_loss"] for r in read_records(straight) if "val_loss" in r]
    assert val[-1] < val[0] - 0.2, val


@pytest.mark.parametrize("model", MODELS)
def test_adamw_trains_each_family_and_resumes_exactly(tmp_path, byte_data, model):
    """Wrong if a family's layers broke the trainer (checkpoint, resume, data order) or did not learn."""
    check_trains_and_resumes(tmp_path, byte_data, model, "adamw")


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optim", [name for name in OPTIMIZERS if name != "adamw"])
def test_every_optimizer_trains_each_family_and_resumes_exactly(tmp_path, byte_data, model, optim):
    """Wrong if an optimizer's state for a new layer (SwiGLU's gate, an untied head, RMSNorm gains) were
    missing from its checkpoint, its grouping left a layer untrained, or its update diverged on them."""
    check_trains_and_resumes(tmp_path, byte_data, model, optim)
