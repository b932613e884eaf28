"""The Slurm entry points: the sbatch scripts parse, and the submitit launcher config composes with a
pre-emption signal that the trainer actually catches (else a job would be requeued without saving)."""

import os
import signal
import subprocess
from pathlib import Path

import pytest

from gpt.trainer import StopRequested
from tests.hydra_compose import compose_train

SLURM = Path(__file__).resolve().parents[2] / "scripts" / "slurm"


@pytest.mark.parametrize("script", ["single_node.sbatch", "multi_node.sbatch"])
def test_sbatch_script_parses(script):
    result = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (SLURM / script).read_text()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text  # else a torchrun restart cannot reconnect
    assert "--signal=B:SIGTERM@" in text and "trap requeue TERM" in text


def test_submitit_launcher_signals_what_the_trainer_catches():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_train(["hydra/launcher=slurm"], hydra_config=True)
    launcher = cfg.hydra.launcher
    name, delay = launcher.additional_parameters.signal.split("@")
    assert int(delay) >= 60
    assert f"export SUBMITIT_PREEMPT_SIGNAL={name}" in launcher.setup  # submitit's handler in the job
    with StopRequested() as stop:
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        assert stop.signal == getattr(signal, f"SIG{name}")
