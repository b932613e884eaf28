"""The study's figures: final loss against each tuned hyper-parameter (sensitivity), and validation loss
against tokens at each budget (the tuned runs, mean over seeds inside a min–max band).

A sensitivity curve is the slice of the tuning runs through the tuned configuration: the runs that differ
from it in that one hyper-parameter. Diverged runs are drawn as crosses on the top edge. matplotlib is the
`plot` extra; a study checks for it before its first run, not after its last.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from gpt.study.outcome import val_records
from gpt.study.state import Cell, StudyState


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("the study's report draws figures with matplotlib: pip install '.[plot]'") from None


def _figure(columns: int) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * columns + 1, 4), layout="constrained")
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def sensitivity_slice(cell: Cell, index: int) -> list[tuple[float, float]]:
    """(value, final loss) of the tuning runs that differ from the tuned configuration in ladder `index`."""
    ladder, tuned = cell.arm.ladders[index], cell.descent.incumbent
    found = {}
    for sweep in cell.descent.sweeps:
        for rung, point in sweep.points.items():
            if all(r == t for i, (r, t) in enumerate(zip(point, tuned, strict=True)) if i != index):
                found[rung] = sweep.losses[rung]
    return [(ladder.value(rung), loss) for rung, loss in sorted(found.items())]


def _x_range(values: list[float], log: bool) -> tuple[float, float]:
    low, high = min(values), max(values)
    if log:
        return low / 1.5, high * 1.5
    margin = 0.05 * (high - low) or 1.0
    return low - margin, high + margin


def draw_sensitivity(state: StudyState, model: str, name: str, out: Path) -> None:
    cells = [cell for cell in state.cells() if cell.arm.model == model and cell.budget == cell.tuning_budget
             and any(ladder.name == name for ladder in cell.arm.ladders)]
    budgets = sorted({cell.budget for cell in cells})
    figure, axes = _figure(len(budgets))
    for ax, budget in zip(axes, budgets, strict=True):
        values, log_scale = [], False
        for cell in (c for c in cells if c.budget == budget):
            index = [ladder.name for ladder in cell.arm.ladders].index(name)
            ladder = cell.arm.ladders[index]
            points = sensitivity_slice(cell, index)
            good = [(value, loss) for value, loss in points if math.isfinite(loss)]
            (line,) = ax.plot([v for v, _ in good], [loss for _, loss in good], marker="o",
                              label=cell.arm.label)
            chosen = ladder.value(cell.descent.incumbent[index])
            ax.plot([v for v, _ in good if v == chosen], [loss for v, loss in good if v == chosen],
                    marker="*", markersize=14, color=line.get_color(), linestyle="none")
            diverged = [value for value, loss in points if not math.isfinite(loss)]
            if diverged:  # on the top edge: x in data units, y in axes units
                ax.scatter(diverged, [1.0] * len(diverged), marker="x", color=line.get_color(),
                           transform=ax.get_xaxis_transform(), clip_on=False)
            values += [value for value, _ in points]
            log_scale = ladder.scale == "log"
        ax.set(xscale="log" if log_scale else "linear", xlim=_x_range(values, log_scale), xlabel=name,
               ylabel="final validation loss (nats/token)\nat the tuning seed",
               title=f"{model}, {state.study.budgets[budget].label()}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(f"sensitivity to {name}\n(★ tuned; × diverged)")
    figure.savefig(out, dpi=130)


def draw_curves(state: StudyState, model: str, out: Path) -> None:
    cells = [cell for cell in state.cells() if cell.arm.model == model]
    budgets = sorted({cell.budget for cell in cells})
    figure, axes = _figure(len(budgets))
    for ax, budget in zip(axes, budgets, strict=True):
        tops, bottoms = [], []
        for cell in (c for c in cells if c.budget == budget):
            by_step = [{r["step"]: r["val_loss"] for r in val_records(spec.out_dir)}
                       for spec in cell.final_runs]
            steps = sorted(set.intersection(*(set(records) for records in by_step)))
            y = np.array([[np.nan if records[s] is None else records[s] for s in steps]
                          for records in by_step])
            x = np.array(steps) * cell.arm.tokens_per_step
            (line,) = ax.plot(x, np.nanmean(y, axis=0), label=f"{cell.arm.label} ({len(by_step)} seeds)")
            ax.fill_between(x, np.nanmin(y, axis=0), np.nanmax(y, axis=0), color=line.get_color(), alpha=0.2,
                            linewidth=0)
            finite = y[np.isfinite(y)]
            if finite.size:
                tops.append(np.nanmax(y[:, len(steps) // 10:]) if len(steps) > 1 else finite.max())
                bottoms.append(finite.min())
        if tops:
            margin = 0.05 * (max(tops) - min(bottoms)) or 0.05
            ax.set_ylim(min(bottoms) - margin, max(tops) + margin)
        ax.set(xlabel="training tokens", ylabel="validation loss (nats/token)",
               title=f"{model}, {state.study.budgets[budget].label()}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle("validation loss of the tuned runs\n(mean over seeds, min–max band)")
    figure.savefig(out, dpi=130)


def draw_figures(state: StudyState, out_dir: Path) -> list[Path]:
    """Every figure of the study into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for model in state.study.models:
        arms = [arm for arm in state.arms if arm.model == model]
        names = dict.fromkeys(ladder.name for arm in arms for ladder in arm.ladders)
        for name in names:
            path = out_dir / f"sensitivity_{model}_{name}.png"
            draw_sensitivity(state, model, name, path)
            written.append(path)
        path = out_dir / f"loss_vs_tokens_{model}.png"
        draw_curves(state, model, path)
        written.append(path)
    return written
