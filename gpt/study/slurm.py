"""The Slurm launcher: a study's runs as job arrays submitted through submitit (`launcher=slurm`).

Every batch of runs the study can start at once (a sweep, the final seeds) is one array, one job per run,
`gpus_per_run` GPUs each (torchrun inside the job for more than one). The job runs the same `python train.py
...` a local study runs, so a run resumes wherever it was interrupted. Before its time limit Slurm sends USR1
(configs/launcher/slurm.yaml exports SUBMITIT_PREEMPT_SIGNAL=USR1 so that submitit's handler listens for the
same signal the trainer catches): the trainer saves a checkpoint and exits, and submitit requeues the job,
which resumes from it. The study waits for the jobs, polling their state; `cluster: local` runs the same jobs
as processes of this machine through submitit's local executor, which is how the tests exercise this path.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from gpt.study.arms import RunSpec
from gpt.study.execute import conclude, start
from gpt.study.outcome import Outcome, read_outcome

log = logging.getLogger(__name__)
STOP_GRACE_S = 100  # within the 120 s between Slurm's USR1 and the time limit
# Set by the study per job: submitit's own sizing keys would contradict them.
STUDY_SET_PARAMETERS = ("gpus_per_node", "tasks_per_node", "nodes")


@dataclass(frozen=True)
class SubmititSettings:
    cluster: str
    folder: str
    gpus_per_run: int
    threads_per_run: int
    poll_s: float
    max_num_timeout: int
    parameters: dict[str, Any]


def submitit_settings(node: dict[str, Any]) -> SubmititSettings:
    """configs/launcher/slurm.yaml, checked."""
    for key, least in (("gpus_per_run", 0), ("threads_per_run", 1)):
        value = node.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise UserError(f"launcher.{key} must be an integer >= {least}, got {value!r}")
    parameters = dict(node.get("parameters") or {})
    taken = [key for key in parameters if key in STUDY_SET_PARAMETERS]
    if taken:
        raise UserError(f"launcher.parameters sets {', '.join(taken)}: one job is one run on one node with "
                        "launcher.gpus_per_run GPUs; set that instead")
    poll, requeues = node.get("poll_s"), node.get("max_num_timeout")
    if not isinstance(poll, (int, float)) or poll <= 0:
        raise UserError(f"launcher.poll_s must be a number of seconds > 0, got {poll!r}")
    if not isinstance(requeues, int) or isinstance(requeues, bool) or requeues < 0:
        raise UserError(f"launcher.max_num_timeout must be an integer >= 0, got {requeues!r}")
    return SubmititSettings(str(node.get("cluster")), str(node.get("folder")), node["gpus_per_run"],
                            node["threads_per_run"], float(poll), requeues, parameters)


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise UserError("launcher=slurm needs submitit: pip install '.[slurm]'") from None
    return submitit


class TrainJob:
    """What one Slurm job runs: the run's train.py to its end. On submitit's pre-emption signal it asks the
    trainer to save and stop, then has the job requeued with the same run (which resumes)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def __call__(self, spec: RunSpec, log_path: Path, env: dict[str, str], gpus: int) -> Outcome | str | None:
        done = read_outcome(spec.out_dir, spec.steps)
        if done is not None:
            return done
        self.process = start(spec, log_path, env, gpus)
        # Polled, not wait(): a blocking wait would hold the lock that checkpoint()'s wait, run from the
        # signal handler on top of it, needs to reap the stopped trainer.
        while self.process.poll() is None:
            time.sleep(1)
        try:
            return conclude(spec, self.process.returncode, log_path)
        except UserError as error:
            return str(error)  # a failed run is reported by the study, not as a crashed job

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: stop the trainer at a step boundary, then resubmit this run."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("run did not stop within %d s of the pre-emption signal", STOP_GRACE_S)
        return _submitit().helpers.DelayedSubmission(TrainJob(), *args, **kwargs)


class SubmititLauncher:
    """Submits runs as job arrays and reports the jobs that ended."""

    def __init__(self, settings: SubmititSettings, log_dir: Path) -> None:
        submitit = _submitit()
        self.settings, self.log_dir, self.poll_s, self.stops_runs = settings, log_dir, settings.poll_s, False
        try:
            self.executor = submitit.AutoExecutor(folder=settings.folder, cluster=settings.cluster,
                                                  slurm_max_num_timeout=settings.max_num_timeout)
            self.executor.update_parameters(**settings.parameters, gpus_per_node=settings.gpus_per_run,
                                            tasks_per_node=1, nodes=1)
        except (ValueError, NameError, AssertionError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"launcher=slurm: submitit refused the settings ({first})") from None
        self.running: dict[Path, tuple[RunSpec, Any]] = {}

    def free_slots(self) -> int:
        return 1 << 30  # the cluster queues them; slurm_array_parallelism caps the array's concurrency

    def start(self, specs: list[RunSpec]) -> None:
        threads = str(self.settings.threads_per_run)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        jobs = []
        with self.executor.batch():
            for spec in specs:
                log_path = self.log_dir / f"{spec.out_dir.parent.parent.name}-{spec.out_dir.parent.name}-" \
                                          f"{spec.out_dir.name}.log"
                jobs.append(self.executor.submit(TrainJob(), spec, log_path, env, self.settings.gpus_per_run))
        for spec, job in zip(specs, jobs, strict=True):
            self.running[spec.out_dir] = (spec, job)
        if jobs:
            log.info("submitted %d run(s) as job array %s", len(jobs), jobs[0].job_id.split("_")[0])

    def poll(self) -> list[tuple[RunSpec, Outcome | UserError | None]]:
        ended = []
        for out_dir, (spec, job) in list(self.running.items()):
            if not job.done():
                continue
            del self.running[out_dir]
            try:
                result = job.result()
            except Exception as error:  # the job itself failed: submitit re-raises it here
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                result = UserError(f"run {spec.out_dir}: job {job.job_id} failed ({first}); its log: "
                                   f"{job.paths.stderr}")
            ended.append((spec, UserError(result) if isinstance(result, str) else result))
        return ended

    def stop(self) -> None:
        if self.running:
            log.info("%d submitted job(s) keep running; rerun the study once they have ended (squeue) and it "
                     "finds their runs", len(self.running))
