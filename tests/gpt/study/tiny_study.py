"""The tests' tiny study and the ways to run scripts/study.py on it: a 2-layer × 64 GPT on 8 × 32 bytes of the
shipped Shakespeare sample a step, AdamW and Lion, three learning rates each (one of Lion's so large that the
run diverges at its second step), two seeds, budgets of 8 and 16 steps: 16 runs of a few seconds each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
TIMEOUT = 600

TINY = {
    "models": ["gpt2_tiny"],
    "data": "shakespeare",
    "overrides": {
        "model": {"vocab_size": 256, "n_layer": 2, "n_embd": 64, "block_size": 32},
        "data": {"tokenizer": "byte"},
        "train": {"global_batch_size": 8, "micro_batch_size": 8, "eval_interval": 4, "eval_sequences": 8,
                  "log_interval": 1, "ckpt_interval": 4, "dtype": "float32"},
        "schedule": {"warmup_steps": 2},
    },
    "budgets": [{"tokens": 2048}, {"tokens": 4096}],  # 8 and 16 steps of 256 tokens
    "baseline": "adamw",
    "seeds": [0, 1],
    "tune": {"lr": {"scale": "log", "step": 3, "points": [-1, 0, 1]}},
    "optimizers": {
        "adamw": {"tune": {"lr": {"reference": 3e-3}}},
        # a listed ladder; 1e4 makes Lion's gradient norm infinite at step 2: a divergence, which is a result
        "lion": {"tune": {"lr": {"scale": "values", "values": [3e-4, 1e-3, 1e4], "reference": 1e-3}}},
    },
}


def write_study(config_dir: Path, name: str, study: dict, data_dir: Path) -> None:
    """configs/study/<name>.yaml under `config_dir` (given to the command as hydra.searchpath)."""
    study = {**study, "overrides": {**study["overrides"],
                                    "data": {**study["overrides"]["data"], "dir": str(data_dir)}}}
    (config_dir / "study").mkdir(parents=True, exist_ok=True)
    (config_dir / "study" / f"{name}.yaml").write_text(yaml.safe_dump(study, sort_keys=False))


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "CI": "true", "PYTHONDONTWRITEBYTECODE": "1"}


def study_command(config_dir: Path, name: str, out: Path, *extra: str) -> list[str]:
    """The study into `out` (report in out/study, runs under out/runs)."""
    return [sys.executable, str(REPO / "scripts" / "study.py"), f"study={name}",
            f"hydra.searchpath=[file://{config_dir}]", f"study.out_dir={out / 'study'}",
            f"study.run_root={out / 'runs'}", *extra]


def run_study(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result
