"""A study from its composed file to its report: check, plan, prepare the data, run, report.

Everything that can be wrong with the file is found before the plan is printed; the plan is printed before
anything starts (and alone with `study.dry_run=true`); the data is prepared once here, so that runs started
together do not race to prepare it; then the runs, then the report. A finished study run again only rewrites
its report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from common.errors import UserError
from data.prepare import prepare, unprepared_reason
from gpt.metrics import METRICS_FILE, read_metrics
from gpt.study.arms import Arm, resolve_arms
from gpt.study.driver import Launcher, run_study
from gpt.study.figures import require_matplotlib
from gpt.study.local import LocalLauncher, LocalSettings, local_settings
from gpt.study.plan import LocalRate, describe_plan, plan_cells, plan_record
from gpt.study.report import machine, write_report
from gpt.study.results import summarize
from gpt.study.schema import load_study
from gpt.study.slurm import SubmititLauncher, SubmititSettings, submitit_settings
from gpt.study.state import StudyState

log = logging.getLogger(__name__)
LAUNCHERS = ("local", "slurm")


def prepare_data(arms: list[Arm]) -> None:
    """Prepare each distinct data set the runs read, once, or say how to."""
    seen = set()
    for arm in arms:
        data = arm.settings.data
        if data["dir"] in seen:
            continue
        seen.add(data["dir"])
        problem = unprepared_reason(data)
        if problem is None:
            continue
        if not data.get("auto_prepare", False):
            raise UserError(problem)
        log.info("preparing %s into %s", data["name"], data["dir"])
        prepare(data)


def launcher_settings(node: dict[str, Any]) -> tuple[LocalSettings | SubmititSettings, LocalRate | None]:
    """The launcher group's settings, checked, and what the plan needs to estimate a CPU study's time here."""
    name = node.get("name")
    if name not in LAUNCHERS:
        raise UserError(f"launcher.name={name!r} is not one of {', '.join(LAUNCHERS)}")
    if name == "slurm":
        return submitit_settings(node), None
    settings = local_settings(node)
    rate = None
    if not settings.gpus_per_run:
        rate = LocalRate(settings.parallel, settings.threads_per_run, float(node["flops_per_thread"]),
                         float(node["startup_s"]))
    return settings, rate


def make_launcher(settings: LocalSettings | SubmititSettings, log_dir: Path) -> Launcher:
    if isinstance(settings, SubmititSettings):
        return SubmititLauncher(settings, log_dir)
    return LocalLauncher(settings, log_dir)


def training_minutes(state: StudyState) -> float:
    """The runs' own training clocks, summed (earlier sessions of resumed runs included)."""
    seconds = 0.0
    for out_dir in state.results:
        records = [r for r in read_metrics(out_dir / METRICS_FILE) if r.get("elapsed_s") is not None]
        seconds += max((r["elapsed_s"] for r in records), default=0.0)
    return seconds / 60


def conduct(name: str, node: dict[str, Any], launcher_node: dict[str, Any]) -> Path | None:
    """Run the study `name` (its composed file `node`) with the launcher `launcher_node`; returns the report's
    path (None after a dry run)."""
    began = time.perf_counter()
    study = load_study(node, name)
    arms = resolve_arms(study)
    out_dir = Path(study.out_dir)
    settings, rate = launcher_settings(launcher_node)
    cells = plan_cells(study, arms)
    log.info(describe_plan(study, arms, cells, rate))
    if study.dry_run:
        return None
    require_matplotlib()
    prepare_data(arms)
    out_dir.mkdir(parents=True, exist_ok=True)
    launcher = make_launcher(settings, out_dir / "logs")
    state = StudyState(study, arms)
    started = run_study(state, launcher)
    summary = summarize(state)
    cost = {"runs_started": started, "training_minutes": training_minutes(state),
            "wall_minutes": (time.perf_counter() - began) / 60, "machine": machine(),
            "launcher": launcher_node}
    report = write_report(state, summary, plan_record(cells), cost, out_dir)
    log.info("report: %s (%d runs, %d started now)", report, summary["runs"], started)
    return report
