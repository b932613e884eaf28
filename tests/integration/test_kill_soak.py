"""The randomized kill soak (scripts/kill_soak.py) on a tiny run, in one process and on two DDP ranks (gloo):
SIGKILLs and SIGTERMs at random moments of every phase (data preparation, start-up, steps, evaluations,
background saves), the run restarted after each, must end bit-identical to the straight run.

Each fault costs a restart (an interpreter importing torch, or torchrun and two of them), so the suite's
variant injects one fault per phase (5); the issue's bar, 20 faults each, is the same test with
KILL_SOAK_FAULTS=20 (docs/robustness.md gives the command and its measured time), or the script itself on
any machine or cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAULTS = int(os.environ.get("KILL_SOAK_FAULTS", "5"))
# 12 tiny steps per fault (60 for the suite's 5): a checkpoint every 2 (written in the background), an
# evaluation every 5 (64 sequences, a few steps long), a record at every step; more steps than the faults need
# to make progress even on a loaded machine, where a fault aimed seconds into a phase lands steps later.
STEPS = 12 * max(FAULTS, 5)
SOAK = ["experiment=quickstart", f"train.max_steps={STEPS}", f"schedule.decay_steps={STEPS}",
        "train.log_interval=1",
        "train.eval_interval=5", "train.eval_sequences=64", "train.ckpt_interval=2",
        "train.async_checkpoint=true", "train.keep_checkpoints=2", "train.global_batch_size=8",
        "train.micro_batch_size=4", "model.n_layer=2", "model.n_embd=128", "model.block_size=32"]


def soak(tmp_path: Path, ranks: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CI": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "kill_soak.py"), "--faults", str(FAULTS),
                             "--ranks", str(ranks), "--seed", "1", "--work", str(tmp_path / "soak"),
                             "--json", str(tmp_path / "soak.json"), "--", *SOAK],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600 * (FAULTS + 4))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return json.loads((tmp_path / "soak.json").read_text())


def check(summary: dict) -> None:
    assert summary["identical"], summary["differences"]
    assert summary["faults"] == FAULTS
    assert set(summary["by_phase"]) == {"preparation", "start", "step", "evaluation", "save"}
    assert all(f["observed"]["staging"] for f in summary["details"] if f["phase"] == "save"), \
        "a fault aimed at a background save found none under way"


@pytest.mark.slow
def test_kill_soak_in_one_process_ends_bit_identical(tmp_path):
    """Wrong if any fault, wherever it lands, changes a final weight, an optimizer moment, the loop state,
    the prepared data or any metrics line (a lost, duplicated, torn or partial record)."""
    check(soak(tmp_path, ranks=1))


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_soak_on_two_ddp_ranks_ends_bit_identical(tmp_path):
    """The same with torchrun and two DDP ranks, every fault sent to the whole job (agent and workers), as
    Slurm sends it: wrong also if a rank's lock, store or partial shard outlives a kill and blocks or corrupts
    the restart."""
    check(soak(tmp_path, ranks=2))
