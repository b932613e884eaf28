"""The Slurm entry points: the sbatch scripts parse, their default allocations and documented examples pass
the batch check on the GPUs they are meant for, and the submitit launcher config composes with a
pre-emption signal that the trainer actually catches (else a job would be requeued without saving)."""

import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from gpt.memory import GiB
from gpt.settings import load_settings
from gpt.trainer import StopRequested
from tests.hydra_compose import compose_train

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "scripts" / "slurm"


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


def allocation(script: str, flags: list[str]) -> int:
    """Ranks of a job: the script's #SBATCH --nodes and --gpus-per-node, overridden by sbatch's flags."""
    text = (SLURM / script).read_text()
    values = {key: int(re.search(rf"^#SBATCH --{key}=(\d+)", text, re.M)[1])
              for key in ("nodes", "gpus-per-node")}
    for flag in flags:
        key, _, value = flag.removeprefix("--").partition("=")
        if key in values:
            values[key] = int(value)
    return values["nodes"] * values["gpus-per-node"]


def documented_jobs() -> list[tuple[str, list[str], list[str]]]:
    """(script, sbatch flags, train.py overrides) of each bare `sbatch` default and each `sbatch ...` example
    in the scripts' headers and docs/scaling.md."""
    jobs = {(script, (), ()) for script in ("single_node.sbatch", "multi_node.sbatch")}
    scripts = [SLURM / "single_node.sbatch", SLURM / "multi_node.sbatch"]
    for source in [*scripts, REPO / "docs" / "scaling.md"]:
        for line in source.read_text().splitlines():
            if not line.lstrip("# ").startswith("sbatch "):
                continue
            words = shlex.split(line.lstrip("# "), comments=True)
            index = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
            jobs.add((Path(words[index]).name, tuple(words[1:index]), tuple(words[index + 1:])))
    return sorted((script, list(flags), list(overrides)) for script, flags, overrides in jobs)


@pytest.mark.parametrize("gpu_memory_gib", [40, 80])
@pytest.mark.parametrize(("script", "flags", "overrides"), documented_jobs(),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_default_and_documented_jobs_pass_the_batch_check(script, flags, overrides, gpu_memory_gib, tmp_path):
    """Each documented job, on GPUs of 40 and 80 GiB, gets micro-batches that split its global batch over
    its ranks, so no rank exits at start. Wrong (as with a fixed micro-batch of 12) when 2 nodes × 8 GPUs
    × 12 = 192 does not divide the paper's 480: every rank would exit, and torchrun restart it three times."""
    world_size = allocation(script, flags)
    settings, plan = load_settings(compose_train([*overrides, f"out_dir={tmp_path}"]), world_size=world_size,
                                   device=torch.device("cpu"), gpu_memory=gpu_memory_gib * GiB)
    assert plan.micro_batch_size * plan.grad_accum_steps * world_size == settings.train.global_batch_size
    hessian_batch = settings.optim.get("hessian_batch_size") or settings.train.global_batch_size
    if settings.train.hessian_micro_batch_size is not None:
        assert hessian_batch % (settings.train.hessian_micro_batch_size * world_size) == 0


def test_documented_jobs_include_the_multi_node_default():
    """The test above covers the scripts' own defaults (2 nodes × 8 GPUs for multi_node.sbatch)."""
    jobs = documented_jobs()
    assert ("multi_node.sbatch", [], []) in jobs and allocation("multi_node.sbatch", []) == 16
    assert any(flags == ["--nodes=4"] for script, flags, _ in jobs if script == "multi_node.sbatch")

