"""One run of a study as a `python train.py ...` process (torchrun for several GPUs), and what its exit means.

Runs are processes, never calls into the trainer: each is an ordinary run directory that resumes when the
same command is given again, whoever gives it (this runner, a Slurm job, a user at a shell). The process's
standard error goes to a log file of the study; its standard output is the trainer's console, already kept in
the run's own `train.log`. Exit 0 with the last evaluation written is a result; exit 2 with the trainer's
non-finite error is a divergence, also a result; anything else is a failure the study reports and stops on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from common.errors import UserError
from gpt.study.arms import RunSpec
from gpt.study.outcome import Outcome, is_divergence, read_outcome, record_divergence

TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def train_command(spec: RunSpec, gpus: int) -> list[str]:
    """`python train.py OVERRIDES`, or torchrun over `gpus` local GPUs."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
                if gpus > 1 else [sys.executable])
    return [*launcher, str(TRAIN_PY), *spec.overrides]


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the study's process dies, even by SIGKILL. The trainer then saves a
    checkpoint and exits, so no orphan keeps training (and holding its run's lock) after the study is gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start(spec: RunSpec, log_path: Path, env: dict[str, str], gpus: int = 0) -> subprocess.Popen:
    """Start the run in its own session (a Ctrl-C reaches it once, forwarded by the study, not twice). The
    log holds this attempt only (the run's train.log keeps every session), so its error line is this one's."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(train_command(spec, gpus), stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, **env}, start_new_session=True,
                                preexec_fn=_die_with_parent)


def error_line(log_path: Path) -> str:
    """The trainer's one-line error (the last line starting 'error:'), else the log's last line."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


def conclude(spec: RunSpec, returncode: int, log_path: Path) -> Outcome | None:
    """The run's outcome once its process has ended; None when it stopped early on a signal (to resume)."""
    outcome = read_outcome(spec.out_dir, spec.steps)
    if outcome is not None:
        return outcome
    if returncode == 0 or (returncode < 0 and -returncode in (signal.SIGTERM, signal.SIGINT)):
        return None  # stopped by a signal after saving: a rerun resumes it
    line = error_line(log_path)
    if returncode == 2 and is_divergence(line):
        return record_divergence(spec.out_dir, line)
    raise UserError(f"run {spec.out_dir} failed (exit {returncode}): {line} [log: {log_path}]")

