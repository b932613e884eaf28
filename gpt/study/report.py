"""The study's report: `report.md` (tables and figures for a reader), `report.json` (the same numbers for a
program) and `figures/*.png`, in the study's output folder.

The results part comes from gpt/study/results.py and is a function of the finished runs; the cost part (how
many runs this invocation started, how long they and it took, on what machine) is kept apart under `cost`, so
that two reports of the same study compare equal without it. What every number means: docs/study.md.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from common.files import write_atomic
from gpt.study.figures import draw_figures
from gpt.study.state import StudyState

REPORT_MD, REPORT_JSON, FIGURES = "report.md", "report.json", "figures"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def _loss(cell: dict[str, Any]) -> str:
    if cell["diverged_seeds"]:
        return f"diverged in {cell['diverged_seeds']}/{len(cell['runs'])} seeds"
    sem = f" ± {cell['final_loss_sem']:.4f}" if cell["final_loss_sem"] is not None else ""
    return f"{cell['final_loss_mean']:.4f}{sem} ({len(cell['runs'])})"


def _tuned(cell: dict[str, Any]) -> str:
    if not cell["tuned"]:
        return "(nothing tuned)"
    at = "" if cell["tuned_at_budget"] == cell["budget"] else f" (tuned at {cell['tuned_at_budget']})"
    return ", ".join(f"{name} {value:g}" for name, value in cell["tuned"].items()) + at


def _tuning_lines(cell: dict[str, Any]) -> list[str]:
    lines = []
    for sweep in cell["tuning"]:
        points = ", ".join(
            ("**" if entry["value"] == sweep["best"] else "") + f"{entry['value']:g}: "
            + (f"{entry['final_loss']:.4f}" if entry["final_loss"] is not None else "diverged")
            + ("**" if entry["value"] == sweep["best"] else "") for entry in sweep["losses"])
        lines.append(f"  - round {sweep['round']}, {sweep['name']}: {points}")
    return lines


def _fit_text(fit: dict[str, Any] | None, baseline: str) -> str:
    if fit is None:
        return (f"Wen et al.'s speed-up needs {baseline}'s final loss at three or more budgets to fit "
                "L(D) = a·D^(−b) + c; this study has fewer, so it gives none.")
    shape = (f"L(D) = {fit['a']:.4g}·(D / {fit['d0']:,.0f})^(−{fit['b']:.4g}) + {fit['c']:.4g} over its "
             "budgets (D in tokens)")
    if not fit["usable"]:
        return f"{baseline}'s final losses fit {shape} only at the edge of b's range: the fit is not used."
    return f"{baseline}'s final loss: {shape}."


def render(summary: dict[str, Any], cost: dict[str, Any], figures: list[Path], out_dir: Path) -> str:
    baseline, level = summary["baseline"], round(summary["confidence"] * 100)
    lines = [
        f"# Study `{summary['study']}`",
        "",
        f"`python scripts/study.py study={summary['study']}`: each optimizer tuned by the same coordinate "
        f"descent at seed {summary['tuning_seed']}, then run at seeds "
        f"{', '.join(map(str, summary['seeds']))}; speed-ups over `{baseline}`. What each number means and "
        "how it is computed: docs/study.md.",
    ]
    for model, result in summary["models"].items():
        lines += [
            "", f"## {model} ({result['parameters']:,} parameters, {result['tokens_per_step']:,} tokens per "
                "step)",
            "", _fit_text(result["baseline_fit"], baseline), "",
            f"| optimizer | budget | tuned | final val loss: mean ± s.e. (seeds) | speed-up over {baseline} "
            f"(Wen et al.), {level}% CI | the paper's measure: × to reach {baseline}'s final loss mid-run |",
            "|---|---|---|---|---|---|",
        ]
        for cell in result["cells"]:
            budget = f"{cell['budget']} ({cell['steps']:,} steps, {cell['chinchilla']:.3g}× Chinchilla)"
            paper = cell["paper_measure"]["text"] if cell["paper_measure"] else "n/a"
            wen = cell["speedup"]["text"] if result["baseline_fit"] else "n/a (fewer than three budgets)"
            row = [cell["optimizer"], budget, _tuned(cell), _loss(cell), wen, paper]
            lines.append("| " + " | ".join(row) + " |")
        notes = [f"- {cell['optimizer']}, {cell['budget']}: {note}" for cell in result["cells"]
                 for note in cell["notes"]]
        noise = result["seed_noise_sd"]
        lines += ["", "The paper's measure reads the middle of the runs (the data at which a run first "
                      f"reaches {baseline}'s final loss at the same budget); it is not the end-of-training "
                      "comparison and is given for comparison with the Sophia paper's 2×. Seed noise (the "
                      "pooled standard deviation of a final loss about its group's mean, which the bootstrap "
                      "resamples): " + (f"{noise:.4f}." if noise is not None else "n/a (one seed).")]
        if notes:
            lines += ["", "Notes:", *notes]
        lines += ["", "### Tuning (final validation loss at the tuning seed; the kept value in bold)", ""]
        for cell in result["cells"]:
            if cell["tuning"] and cell["tuned_at_budget"] == cell["budget"]:
                lines += [f"- {cell['optimizer']}, {cell['budget']}:", *_tuning_lines(cell)]
    lines += ["", "## Figures", ""]
    lines += [f"![{path.stem}]({path.relative_to(out_dir)})" for path in figures]
    lines += [
        "", "## Runs and cost", "",
        f"{summary['runs']} runs ({summary['diverged_runs']} diverged). Training time summed over the runs' "
        f"own clocks: {cost['training_minutes']:.1f} min. This invocation started {cost['runs_started']} "
        f"run(s) and took {cost['wall_minutes']:.1f} min on {cost['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(state: StudyState, summary: dict[str, Any], plan: list[dict[str, Any]], cost: dict[str, Any],
                 out_dir: Path) -> Path:
    """Write the figures, report.json and report.md (last: a report.md is never older than its figures)."""
    figures = draw_figures(state, out_dir / FIGURES)
    record = {**summary, "plan": plan, "cost": cost}
    write_atomic(out_dir / REPORT_JSON, json.dumps(_json_safe(record), indent=1) + "\n")
    write_atomic(out_dir / REPORT_MD, render(summary, cost, figures, out_dir))
    return out_dir / REPORT_MD
