"""Plot validation loss (or another metric) against steps, tokens, FLOPs or wall-clock: Figs. 1, 4 and 5.

    python scripts/plot_curves.py RUN... --out curves.png [--x steps|tokens|flops|time] [--metric val_loss]

Runs that differ only by seed are one curve: the mean over seeds at the steps all of them recorded, inside a
min–max band. FLOPs include Sophia's curvature passes (scripts/runs.py); time is each run's own wall-clock, so
compare it only between runs on the same hardware under the same load: with --x time a warning is printed
(and drawn on the figure) when the runs' throughput says otherwise. Without --ylim the y-axis starts after
the first 10% of each curve, so the early drop from ~11 does not flatten the part the paper's figures show.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matplotlib.figure import Figure

from gpt.cli.runs import AXES, aligned_series, group_labels, group_runs, time_warning

XLABELS = {"steps": "step", "tokens": "tokens", "flops": "training FLOPs", "time": "wall-clock (hours)"}


def plot_curves(paths: list[str], out: str | Path, axis: str = "steps", metric: str = "val_loss",
                ylim: tuple[float, float] | None = None) -> str | None:
    """Draw one mean curve (and seed band) per group of runs and save the figure to `out`; returns the
    warning (also drawn as the figure's title) when a wall-clock axis compares runs measured under
    different load."""
    groups = group_runs(paths)
    warning = time_warning([run for group in groups for run in group]) if axis == "time" else None
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    series = [aligned_series(group, metric, axis) for group in groups]
    xlabel, x_unit = XLABELS[axis], 3600 if axis == "time" else 1
    if axis == "time" and max(x.max() for x, _ in series) < 2 * 3600:  # short runs: minutes, not 0.01 h
        xlabel, x_unit = "wall-clock (minutes)", 60
    tops, bottoms = [], []
    for group, label, (x, y) in zip(groups, group_labels(groups), series, strict=True):
        x = x / x_unit
        mean = y.mean(axis=0)
        seeds = f" ({len(group)} seeds)" if len(group) > 1 else ""
        (line,) = ax.plot(x, mean, label=label + seeds)
        if len(group) > 1:
            ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=line.get_color(), alpha=0.2, linewidth=0)
        tops.append(y.max(axis=0)[len(mean) // 10 :].max())
        bottoms.append(y.min())
    if ylim is None:
        margin = 0.05 * (max(tops) - min(bottoms)) or 0.05
        ylim = (min(bottoms) - margin, max(tops) + margin)
    ax.set(xlabel=xlabel, ylabel=metric, ylim=ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    if warning:
        ax.set_title("measured under different load: compare steps or FLOPs (see the printed warning)",
                     color="firebrick", fontsize="medium")
    figure.savefig(out, dpi=150)
    return warning


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    parser.add_argument("--out", required=True, help="image file to write, e.g. curves.png")
    parser.add_argument("--x", choices=AXES, default="steps", dest="axis", help="x-axis (default: steps)")
    parser.add_argument("--metric", default="val_loss", help="metrics.jsonl key to plot (default: val_loss)")
    parser.add_argument("--ylim", nargs=2, type=float, metavar=("LOW", "HIGH"), help="y-axis range")
    args = parser.parse_args(argv)
    warning = plot_curves(args.runs, args.out, args.axis, args.metric, args.ylim)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}")

