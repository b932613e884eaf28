"""The numbers a finished study reports, as one JSON-ready record: every cell's tuning, tuned values, final
losses over seeds with their standard error, and both speed-ups over the baseline.

The record holds only what the runs determine (no clock, no machine), so the same finished runs give the same
record: a study killed and rerun reports exactly what an uninterrupted one does. Run costs go to a separate
`cost` entry written next to it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from gpt.study.outcome import val_records
from gpt.study.speedup import fit_power_law, paper_measure, pooled_residuals, wen_speedup
from gpt.study.state import Cell, StudyState


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _tuning(cell: Cell) -> list[dict[str, Any]]:
    ladders = {ladder.name: ladder for ladder in cell.arm.ladders}
    return [{"round": sweep.round, "name": sweep.name, "best": ladders[sweep.name].value(sweep.best),
             "losses": [{"value": ladders[sweep.name].value(rung), "final_loss": _finite_or_none(loss)}
                        for rung, loss in sorted(sweep.losses.items())]}
            for sweep in cell.descent.sweeps]


def _notes(cell: Cell) -> list[str]:
    notes = []
    if cell.arm.ladders and not cell.descent.converged:
        notes.append("coordinate descent stopped at max_rounds before a round left every value unchanged")
    for ladder, rung in zip(cell.arm.ladders, cell.descent.incumbent, strict=True):
        if rung in ladder.limits and ladder.limits[0] != ladder.limits[1]:
            side = "lowest" if rung == ladder.limits[0] else "highest"
            notes.append(f"{ladder.name}={ladder.value(rung):g} is the {side} value its search allows: the "
                         "optimum may lie beyond it")
    return notes


def summarize(state: StudyState) -> dict[str, Any]:
    """The study's results; every cell must be finished (state.needed() empty)."""
    study = state.study
    cells = state.cells()
    finals = {id(cell): [state.results[spec.out_dir].final_loss for spec in cell.final_runs]
              for cell in cells}
    models, noise = {}, {}
    for model in study.models:
        model_cells = [cell for cell in cells if cell.arm.model == model]
        residuals = pooled_residuals([finals[id(cell)] for cell in model_cells])  # one model's seed noise
        noise[model] = float(math.sqrt(statistics.fmean(residuals**2))) if len(residuals) else None
        tokens = {id(cell): cell.steps * cell.arm.tokens_per_step for cell in model_cells}
        base_cells = {cell.budget: cell for cell in model_cells if cell.arm.label == study.baseline}
        baseline = {tokens[id(cell)]: finals[id(cell)] for cell in base_cells.values()}
        finite = {d: v for d, v in baseline.items() if all(math.isfinite(x) for x in v)}
        fit = None
        if len(finite) >= 3:
            curve = fit_power_law(sorted(finite), [statistics.fmean(finite[d]) for d in sorted(finite)])
            fit = {"a": curve.a, "b": curve.b, "c": curve.c, "d0": curve.d0, "usable": not curve.degenerate}
        entries = []
        for cell in model_cells:
            losses, arm = finals[id(cell)], cell.arm
            diverged = sum(not math.isfinite(x) for x in losses)
            mean = statistics.fmean(losses) if not diverged else math.inf
            sem = (statistics.stdev(losses) / math.sqrt(len(losses)) if len(losses) > 1 and not diverged
                   else None)
            wen = wen_speedup(baseline, losses, tokens[id(cell)], residuals, study.bootstrap_samples,
                              study.confidence)
            base_cell = base_cells[cell.budget]
            target = statistics.fmean(finals[id(base_cell)])
            curves = [[(r["step"] * arm.tokens_per_step, r["val_loss"]) for r in val_records(spec.out_dir)]
                      for spec in cell.final_runs]
            paper = (paper_measure(curves, target, tokens[id(base_cell)]) if math.isfinite(target) else None)
            budget = study.budgets[cell.budget]
            entries.append({
                "optimizer": arm.label, "optim": arm.spec.optim, "budget": budget.label(),
                "tokens": tokens[id(cell)], "steps": cell.steps,
                "chinchilla": tokens[id(cell)] / (study.tokens_per_parameter * arm.params),
                "tuned_at_budget": study.budgets[cell.tuning_budget].label(),
                "tuned": {ladder.name: ladder.value(rung) for ladder, rung in
                          zip(arm.ladders, cell.descent.incumbent, strict=True)},
                "references": {ladder.name: ladder.reference for ladder in arm.ladders},
                "converged": cell.descent.converged, "tuning": _tuning(cell), "notes": _notes(cell),
                "runs": [{"seed": spec.seed, "dir": str(spec.out_dir.relative_to(study.run_root)),
                          "final_loss": _finite_or_none(state.results[spec.out_dir].final_loss),
                          "diverged": state.results[spec.out_dir].diverged} for spec in cell.final_runs],
                "final_loss_mean": _finite_or_none(mean), "final_loss_sem": sem, "diverged_seeds": diverged,
                "speedup": {"value": wen.value, "low": wen.low, "high": wen.high, "bound": wen.bound,
                            "reason": wen.reason, "readable": wen.readable, "text": wen.text()},
                "paper_measure": None if paper is None else {
                    "target": paper.target, "tokens_to_target": paper.to_target, "ratios": paper.ratios,
                    "text": paper.text()},
            })
        arm = model_cells[0].arm
        models[model] = {"parameters": arm.params, "tokens_per_step": arm.tokens_per_step,
                         "seed_noise_sd": noise[model], "baseline_fit": fit, "cells": entries}
    tuning_runs = [spec for spec in state.specs.values() if spec.out_dir in state.results]
    return {
        "study": study.name, "baseline": study.baseline, "seeds": list(study.seeds),
        "tuning_seed": study.tuning_seed, "confidence": study.confidence,
        "bootstrap_samples": study.bootstrap_samples,
        "runs": len(tuning_runs),
        "diverged_runs": sum(state.results[spec.out_dir].diverged for spec in tuning_runs),
        "models": models,
    }
