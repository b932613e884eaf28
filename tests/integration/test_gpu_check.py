"""The prepared GPU check runs end to end at toy sizes on this machine (`--smoke`), so it cannot rot before a
GPU is lent: every table is printed, every row is there, and every check passes."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step(tmp_path):
    """Wrong if a section crashed, dropped a row (a model × optimizer pair, an optimizer's fused kernels, the
    DDP or FSDP resume), or reported a failure: fused kernels that differ from eager, a resume that does not
    reproduce the straight run, a non-finite loss."""
    command = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--smoke", "--work", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for model in ("toy_small", "toy_medium"):
        for optim in ("adamw", "sophia_g", "sophia_h", "lion"):
            assert f"| {model} | {optim} |" in out, out
    for optim in ("lion", "sophia_g", "sophia_h", "sgd_sai", "adahessian"):
        assert f"| {optim} | " in out.split("## Fused")[1].split("##")[0], out
    for strategy in ("ddp", "fsdp"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {strategy} |"))
        _, _, killed, _, ok, _ = (cell.strip() for cell in row.strip("|").split("|"))
        assert (killed, ok) == ("True", "True"), row  # killed mid-run, then resumed to the straight run
    assert "FAILED" not in out
