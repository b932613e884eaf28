"""The tests' one way to compose `configs/train.yaml` with overrides, as `python train.py` would."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig


def compose_train(overrides: list[str], *, hydra_config: bool = False) -> DictConfig:
    """The composed config; `hydra_config` adds the `hydra` node (launcher, sweep settings)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)
