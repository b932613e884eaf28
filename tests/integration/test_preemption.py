"""Pre-emption under torchrun: SIGTERM to the agent (as Slurm sends it through srun) during a step longer than
torchrun's default 30 s shutdown grace. With the grace the Slurm scripts give torchrun, the workers finish the
step, save its checkpoint and exit before torchrun would kill them.

The 40 s step is a tiny model whose training batches each wait 40 s (slow_step_train.py beside this file), so
the test measures the launcher's grace, not the machine's speed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.prepare import prepare
from gpt.checkpoint import CheckpointDir
from tests.hydra_compose import compose_train, tiny_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEP_S = 40.0  # longer than torchrun's default grace of 30 s


def slurm_grace() -> int:
    """The grace both Slurm scripts give torchrun (`--shutdown-timeout=${PREEMPT_GRACE:-N}`)."""
    graces = {int(re.search(r'--shutdown-timeout="\$\{PREEMPT_GRACE:-(\d+)\}"', path.read_text()).group(1))
              for path in (REPO / "scripts" / "slurm").glob("*.sbatch")}
    assert len(graces) == 1, graces
    return graces.pop()


def test_sigterm_to_torchrun_during_a_long_step_saves_its_checkpoint(tmp_path):
    """Wrong if the workers are killed before the step in progress is finished and saved (no checkpoint of
    step 1, as with torchrun's default 30 s grace), or the Slurm scripts' grace does not cover a 40 s step."""
    grace = slurm_grace()
    assert grace > STEP_S + 20, "the scripts' grace must cover a long step plus its save"
    data = tmp_path / "data"
    prepare(compose_train(["experiment=quickstart", f"data.dir={data}"]).data)
    out = tmp_path / "run"
    overrides = [o for o in tiny_run(out, data, "train.max_steps=3", "train.ckpt_interval=100")]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CI="true", SLOW_STEP_S=str(STEP_S),
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               f"--shutdown-timeout={grace}", str(Path(__file__).parent / "slow_step_train.py"), *overrides]
    log = open(tmp_path / "output.txt", "w")
    agent = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):  # the step-0 evaluation is done
        assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "output.txt").read_text()
        time.sleep(0.05)
    time.sleep(2)  # inside step 1's 40 s batch
    signalled = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=grace + 60)
    took = time.monotonic() - signalled
    output = (tmp_path / "output.txt").read_text()
    assert "stopped by SIGTERM after step 1, checkpoint saved" in output, output[-3000:]
    assert CheckpointDir(out / "checkpoints").complete_steps() == [1]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [0, 1]
    assert took > 30, f"the step ended {took:.0f} s after the signal: within torchrun's default grace anyway"
