"""The study's plan, printed before any run starts: runs, tokens, FLOPs, and GPU-hours at the assumed MFU.

Coordinate descent decides its runs as it goes, so the count is given two ways: expected (as when each
tuned value ends one rung above its reference: one move per hyper-parameter, then a round that confirms it)
and at most (every sweep extended to its limits in every round, capped by the number of distinct
configurations). Each run costs steps × tokens/step × training FLOPs per token (gpt/plan.py's count: the
model's 6N + attention, curvature passes included); GPU-hours divide that by the assumed MFU of the A100's
and H100's peaks, exactly as the training plan does. For CPU runs on this machine, evaluation FLOPs (a
forward pass, a third of a training token's) and a start-up cost per run are added, at the local launcher's
stated FLOP rate per thread.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gpt.plan import GPU_PEAKS, _gpu_peak, _gpu_time, _human, _tokens, evaluation_count
from gpt.study.arms import Arm
from gpt.study.schema import Study
from gpt.study.search import Point, descend


@dataclass(frozen=True)
class CellPlan:
    model: str
    optimizer: str
    budget: str
    steps: int
    tokens_per_run: int
    runs_expected: int
    runs_at_most: int
    training_flops_expected: float
    training_flops_at_most: float
    evaluation_flops_expected: float
    evaluation_flops_at_most: float
    dtype: str
    assumed_mfu: float


def tuning_runs(arm: Arm, max_rounds: int) -> tuple[int, int]:
    """Tuning runs of one descent: (expected, at most). Expected: each tuned value ends one rung above its
    reference (one move per hyper-parameter, inside its first sweep's points where it can be)."""
    if not arm.ladders:
        return 0, 0
    targets = [min(ladder.start + 1, ladder.limits[1]) for ladder in arm.ladders]
    seen: set[Point] = set()

    def distance_from_target(point: Point) -> float:
        seen.add(point)
        return float(sum(abs(rung - target) for rung, target in zip(point, targets, strict=True)))

    descend(arm.ladders, distance_from_target, max_rounds)
    spans = [ladder.limits[1] - ladder.limits[0] + 1 for ladder in arm.ladders]
    return len(seen), min(math.prod(spans), max_rounds * sum(spans))


def plan_cells(study: Study, arms: list[Arm]) -> list[CellPlan]:
    extra_seeds = len(study.seeds) - (study.tuning_seed in study.seeds)
    cells = []
    for arm in arms:
        steps = [arm.steps(budget, study.tokens_per_parameter) for budget in study.budgets]
        expected_tuning, most_tuning = tuning_runs(arm, study.max_rounds)
        t = arm.settings.train
        for index, budget in enumerate(study.budgets):
            tuned_here = study.tune_at == "every_budget" or steps[index] == min(steps)
            expected = (expected_tuning + extra_seeds) if tuned_here else len(study.seeds)
            most = (most_tuning + extra_seeds) if tuned_here else len(study.seeds)
            tokens = steps[index] * arm.tokens_per_step
            evaluations = evaluation_count(steps[index], t.eval_interval)
            eval_flops = evaluations * arm.eval_tokens * arm.flops_per_token / 3  # forward only
            cells.append(CellPlan(
                arm.model, arm.label, budget.label(), steps[index], tokens, expected, most,
                expected * tokens * arm.flops_per_token, most * tokens * arm.flops_per_token,
                expected * eval_flops, most * eval_flops, t.dtype, t.assumed_mfu))
    return cells


@dataclass(frozen=True)
class LocalRate:
    """What the local launcher tells the plan about this machine (configs/launcher/local.yaml)."""

    parallel: int
    threads_per_run: int
    flops_per_thread: float
    startup_s: float


def gpu_hours(cells: list[CellPlan], gpu: str, which: str) -> float:
    """GPU-hours of the cells' training FLOPs at their assumed MFU on `gpu` (gpt/plan.py's peaks)."""
    return sum(getattr(c, f"training_flops_{which}") / (_gpu_peak(gpu, c.dtype) * c.assumed_mfu) / 3600
               for c in cells)


def local_hours(cells: list[CellPlan], rate: LocalRate, which: str) -> float:
    """Wall-clock hours on this machine if the runs packed its slots perfectly."""
    seconds = sum((getattr(c, f"training_flops_{which}") + getattr(c, f"evaluation_flops_{which}"))
                  / (rate.flops_per_thread * rate.threads_per_run)
                  + getattr(c, f"runs_{which}") * rate.startup_s for c in cells)
    return seconds / rate.parallel / 3600


def _ladder_text(arm: Arm) -> str:
    if not arm.ladders:
        return "nothing tuned"
    return ", ".join(f"{ladder.name} from {ladder.reference:g}" for ladder in arm.ladders)


def describe_plan(study: Study, arms: list[Arm], cells: list[CellPlan], local: LocalRate | None) -> str:
    """The plan as printed before the study starts (and alone with study.dry_run=true)."""
    models = ", ".join(f"{arm.model} ({_human(arm.params)} parameters, {arm.tokens_per_step:,} tokens/step)"
                       for arm in {arm.model: arm for arm in arms}.values())
    seeds = ", ".join(map(str, study.seeds))
    counts = " × ".join(f"{n} {word}{'s' if n != 1 else ''}" for n, word in (
        (len(study.optimizers), "optimizer"), (len(study.budgets), "budget"), (len(study.models), "model")))
    lines = [
        f"plan: study {study.name}: {counts}, baseline {study.baseline}, "
        f"data {arms[0].settings.data['name']}",
        f"  models: {models}",
        f"  tuning: coordinate descent (at most {study.max_rounds} rounds) at seed {study.tuning_seed}, "
        f"{'at every budget' if study.tune_at == 'every_budget' else 'at the smallest budget'}; "
        f"final runs: seeds {seeds}",
        "",
        "| model | optimizer | tuned (reference) | budget | steps | tokens/run | runs expected (at most) | "
        "training FLOPs expected |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    arm_of = {(arm.model, arm.label): arm for arm in arms}
    for c in cells:
        tuned = _ladder_text(arm_of[c.model, c.optimizer])
        lines.append(f"| {c.model} | {c.optimizer} | {tuned} | {c.budget} | {c.steps:,} | "
                     f"{c.tokens_per_run:,} | {c.runs_expected} ({c.runs_at_most}) | "
                     f"{_human(c.training_flops_expected, 'FLOP')} |")
    expected, most = (sum(getattr(c, f"runs_{w}") for c in cells) for w in ("expected", "at_most"))
    tokens = sum(c.runs_expected * c.tokens_per_run for c in cells)
    flops = sum(c.training_flops_expected for c in cells)
    evaluation = sum(c.evaluation_flops_expected for c in cells)
    lines += ["", f"  runs: {expected} expected (at most {most}); {_tokens(tokens)}, "
                  f"{_human(flops, 'FLOP')} of training (+ {_human(evaluation, 'FLOP')} of evaluation) "
                  "expected"]
    dtype, mfu = cells[0].dtype, cells[0].assumed_mfu
    for gpu in list(GPU_PEAKS)[:2]:
        peak = _human(_gpu_peak(gpu, dtype), "FLOP/s")
        lines.append(f"  time at {mfu:.0%} MFU on {gpu} ({peak} {dtype} peak): "
                     f"{_gpu_time(gpu_hours(cells, gpu, 'expected'), 8)} expected, "
                     f"{_gpu_time(gpu_hours(cells, gpu, 'at_most'), 8)} at most")
    if local is not None:
        lines.append(
            f"  this machine: {local.parallel} runs at once × {local.threads_per_run} thread(s) at "
            f"{local.flops_per_thread:.3g} FLOP/s per thread and {local.startup_s:g} s to start a run: "
            f"≈ {local_hours(cells, local, 'expected') * 60:,.0f} min expected, "
            f"{local_hours(cells, local, 'at_most') * 60:,.0f} min at most")
    return "\n".join(lines)


def plan_record(cells: list[CellPlan]) -> list[dict]:
    return [asdict(c) for c in cells]
