"""The tests' one way to compose `configs/train.yaml` with overrides, as `python train.py` would, and the
overrides of the tiny in-process training run most trainer tests use."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig


def compose_train(overrides: list[str], *, hydra_config: bool = False) -> DictConfig:
    """The composed config; `hydra_config` adds the `hydra` node (launcher, sweep settings)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)


def tiny_run(out_dir: Path, data_dir: Path, *extra: str, steps: int = 8, interval: int = 4) -> list[str]:
    """The quick start shrunk to 2 layers × 64 wide on 8 × 32 tokens a step: `steps` steps, an evaluation
    and a checkpoint every `interval`; `extra` overrides come last and win."""
    return [
        "experiment=quickstart", f"out_dir={out_dir}", f"data.dir={data_dir}", f"train.max_steps={steps}",
        "train.log_interval=1", f"train.eval_interval={interval}", "train.eval_sequences=8",
        f"train.ckpt_interval={interval}", "train.global_batch_size=8", "train.micro_batch_size=4",
        "model.n_layer=2", "model.n_embd=64", "model.block_size=32", *extra,
    ]
