"""Where a study stands, computed from its file and the finished runs alone.

A cell is one arm (optimizer on model) at one budget. Its tuning is coordinate descent at the tuning seed;
once the descent is done, its final runs are the tuned configuration at every seed (the tuning run itself
counts as one of them when the tuning seed is among the seeds). With `tune_at: smallest_budget`, every budget
of an arm takes the configuration tuned at that arm's smallest budget. Nothing here is stored between
invocations: the state is replayed from the run directories each time, which is what makes an interrupted
study resume and a finished one redraw its report without training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gpt.study.arms import Arm, RunSpec, run_spec
from gpt.study.outcome import Outcome, read_outcome
from gpt.study.schema import Study
from gpt.study.search import Descent, Point, descend


@dataclass
class Cell:
    arm: Arm
    budget: int
    tuning_budget: int  # the budget the descent ran at (this one, or the arm's smallest)
    steps: int
    descent: Descent
    final_runs: list[RunSpec] = field(default_factory=list)  # empty until the descent is done


class StudyState:
    def __init__(self, study: Study, arms: list[Arm]) -> None:
        self.study, self.arms = study, arms
        self.results: dict[Path, Outcome] = {}
        self.specs: dict[Path, RunSpec] = {}  # every run the study has asked for, by directory
        self.running: set[Path] = set()  # runs in progress: their directories are not read for a result

    def spec(self, arm: Arm, budget: int, point: Point, seed: int) -> RunSpec:
        spec = run_spec(self.study, arm, budget, point, seed)
        self.specs.setdefault(spec.out_dir, spec)
        return spec

    def outcome(self, spec: RunSpec) -> Outcome | None:
        """The run's result: remembered, or read from its directory (unless it is running)."""
        if spec.out_dir not in self.results and spec.out_dir not in self.running:
            found = read_outcome(spec.out_dir, spec.steps)
            if found is not None:
                self.results[spec.out_dir] = found
        return self.results.get(spec.out_dir)

    def tuning_budget(self, arm: Arm, budget: int) -> int:
        if self.study.tune_at == "every_budget":
            return budget
        steps = [arm.steps(b, self.study.tokens_per_parameter) for b in self.study.budgets]
        return steps.index(min(steps))

    def cell(self, arm: Arm, budget: int) -> Cell:
        tuning_budget = self.tuning_budget(arm, budget)

        def loss_of(point: Point) -> float | None:
            outcome = self.outcome(self.spec(arm, tuning_budget, point, self.study.tuning_seed))
            return None if outcome is None else outcome.final_loss

        descent = descend(arm.ladders, loss_of, self.study.max_rounds)
        steps = arm.steps(self.study.budgets[budget], self.study.tokens_per_parameter)
        cell = Cell(arm, budget, tuning_budget, steps, descent)
        if descent.done:
            cell.final_runs = [self.spec(arm, budget, descent.incumbent, seed) for seed in self.study.seeds]
        return cell

    def cells(self) -> list[Cell]:
        return [self.cell(arm, budget) for arm in self.arms for budget in range(len(self.study.budgets))]

    def needed(self) -> list[RunSpec]:
        """The runs the study needs next that have no result yet: the current sweep of every unfinished
        descent and the final runs of every tuned cell, without duplicates."""
        needed: dict[Path, RunSpec] = {}
        for cell in self.cells():
            if cell.descent.done:
                specs = cell.final_runs
            else:
                specs = [self.spec(cell.arm, cell.tuning_budget, point, self.study.tuning_seed)
                         for point in cell.descent.needed]
            for spec in specs:
                if self.outcome(spec) is None:
                    needed.setdefault(spec.out_dir, spec)
        return list(needed.values())
