"""The tests' one way to compose `configs/train.yaml` with overrides, as `python train.py` would, the
overrides of the tiny in-process training run most trainer tests use, a resume that must have loaded a given
checkpoint, what such a run recorded, and `python train.py` itself run in the test's process (its own entry
function, without the seconds a new interpreter takes to import torch)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig


def compose_train(overrides: list[str], *, hydra_config: bool = False) -> DictConfig:
    """The composed config; `hydra_config` adds the `hydra` node (launcher, sweep settings)."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)


def tiny_overrides(steps: int = 8, interval: int = 4) -> list[str]:
    """The quick start shrunk to 2 layers × 64 wide on 8 × 32 tokens a step: `steps` steps, an evaluation
    and a checkpoint every `interval` (to follow `experiment=quickstart`)."""
    return [
        f"train.max_steps={steps}", "train.log_interval=1", f"train.eval_interval={interval}",
        "train.eval_sequences=8", f"train.ckpt_interval={interval}", "train.global_batch_size=8",
        "train.micro_batch_size=4", "model.n_layer=2", "model.n_embd=64", "model.block_size=32",
    ]


def tiny_run(out_dir: Path, data_dir: Path, *extra: str, steps: int = 8, interval: int = 4) -> list[str]:
    """The tiny run in `out_dir` on the data in `data_dir`; `extra` overrides come last and win."""
    return ["experiment=quickstart", f"out_dir={out_dir}", f"data.dir={data_dir}",
            *tiny_overrides(steps, interval), *extra]


def train_resumed(overrides: list[str], from_step: int) -> dict:
    """`train` on a run directory that holds checkpoints; fails unless this session resumed from the
    checkpoint of `from_step`. A rerun that silently started over would reproduce the same losses, so an
    exact-resume test that does not check this cannot fail."""
    from gpt.trainer import train

    out_dir = Path(next(o for o in overrides if o.startswith("out_dir=")).removeprefix("out_dir="))
    log_file = out_dir / "train.log"
    before = log_file.stat().st_size
    record = train(compose_train(overrides))
    with open(log_file, "rb") as f:
        f.seek(before)
        session = f.read().decode()
    checkpoint = out_dir / "checkpoints" / f"step_{from_step:08d}"
    assert f"resumed from {checkpoint} (step {from_step})" in session, session[-2000:]
    return record


def run_train_py(args: list[str]) -> int:
    """`python train.py ARGS` in this process through train.py's entry function; returns the exit code.
    `sys.argv`, Hydra's global state and the HYDRA_FULL_ERROR switch the entry point sets are restored
    around the call, so each call starts as a fresh `python train.py` would."""
    import train  # the entry point at the repository root

    saved_argv, error_switch = sys.argv, os.environ.pop("HYDRA_FULL_ERROR", None)
    sys.argv = ["train.py", *args]
    train._job_started = False  # as in a fresh process: no job has started yet
    GlobalHydra.instance().clear()
    try:
        train.run()
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()
        os.environ.pop("HYDRA_FULL_ERROR", None)
        if error_switch is not None:
            os.environ["HYDRA_FULL_ERROR"] = error_switch
    return 0


def read_records(out_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir: Path) -> dict[int, float]:
    """Training loss by step."""
    return {r["step"]: r["train_loss"] for r in read_records(out_dir) if "train_loss" in r}
