"""Plot validation loss (or another metric), and the training loss with --train, against steps, tokens,
FLOPs or wall-clock: the Sophia paper's Figs. 1, 4 and 5.

    sophia-plot-curves RUN... --out curves.png [--x steps|tokens|flops|time] [--metric val_loss] [--train]
        [--labels NAME...] [--title TEXT] [--logx] [--ylim LOW HIGH]

Runs that differ only by seed are one curve: the mean over seeds at the steps all of them recorded, inside a
min–max band; --train adds each group's training loss, dashed, in its colour. FLOPs include Sophia's curvature
passes (gpt/cli/runs.py); time is each run's own wall-clock, so compare it only between runs on the same
hardware under the same load: with --x time a warning is printed (and drawn on the figure) when the runs'
throughput says otherwise. Without --ylim the y-axis shows the last 90% of the x-axis, so the early drop from
~5.5 (byte-level) or ~11 (GPT-2's BPE) does not flatten the end of training, which the paper's figures show.
The file's extension picks the format (png, pdf, svg).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from common.errors import UserError
from gpt.cli import entry_point
from gpt.cli.runs import AXES, aligned_series, group_labels, group_runs, time_warning

XLABELS = {"steps": "training steps", "tokens": "training tokens", "flops": "training compute (FLOPs)",
           "time": "wall-clock time (hours)"}
YLABELS = {"val_loss": "validation loss (nats/token)", "train_loss": "training loss (nats/token)",
           "hellaswag_acc": "HellaSwag accuracy",
           "hellaswag_acc_norm": "HellaSwag accuracy (length-normalised)"}
LOSS_LABEL = "loss (nats/token)"
SKIPPED_FRACTION = 0.1  # the share of the x-axis that the automatic y-limits leave out at the start


@dataclass(frozen=True)
class CurveStyle:
    axis: str = "steps"
    metric: str = "val_loss"
    train: bool = False
    labels: tuple[str, ...] | None = None
    title: str | None = None
    logx: bool = False
    ylim: tuple[float, float] | None = None


def y_range(curves: list[tuple[np.ndarray, np.ndarray]], logx: bool) -> tuple[float, float]:
    """Limits that show every curve past the first SKIPPED_FRACTION of the x-axis (on a log axis, of its
    decades), with a 5% margin."""
    xs = np.concatenate([x for x, _ in curves])
    low, high = (np.log10(xs.min()), np.log10(xs.max())) if logx else (xs.min(), xs.max())
    start = low + SKIPPED_FRACTION * (high - low)
    start = 10**start if logx else start
    shown = [y[:, x >= start] for x, y in curves]
    top = max(y.max() for y in shown if y.size)
    bottom = min(y.min() for _, y in curves)
    margin = 0.05 * (top - bottom) or 0.05
    return bottom - margin, top + margin


def draw_curves(paths: list[str], style: CurveStyle) -> tuple[Figure, str | None]:
    """The figure: one mean curve (and seed band) per group of runs, and the wall-clock warning, if any."""
    groups = group_runs(paths)
    labels = list(style.labels) if style.labels else group_labels(groups)
    if len(labels) != len(groups):
        raise UserError(f"--labels gives {len(labels)} names for {len(groups)} curves (runs that differ only "
                        f"by seed are one curve): {'; '.join(group_labels(groups))}")
    warning = time_warning([run for group in groups for run in group]) if style.axis == "time" else None
    metrics = [style.metric, "train_loss"] if style.train else [style.metric]
    series = {metric: [aligned_series(group, metric, style.axis) for group in groups] for metric in metrics}
    x_unit, xlabel = 1.0, XLABELS[style.axis]
    if style.axis == "time":
        x_unit = 3600.0
        if max(x.max() for x, _ in series[style.metric]) < 2 * 3600:  # short runs: minutes, not 0.01 h
            x_unit, xlabel = 60.0, "wall-clock time (minutes)"
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.subplots()
    plotted = []
    for k, label in enumerate(labels):
        color = f"C{k}"
        for metric in metrics:
            x, y = series[metric][k]
            x = x / x_unit
            if style.logx:  # step 0 has no place on a log axis
                x, y = x[x > 0], y[:, x > 0]
            dashed = metric == "train_loss" and style.train
            seeds = f" ({y.shape[0]} seeds)" if y.shape[0] > 1 else ""
            ax.plot(x, y.mean(axis=0), color=color, linestyle="--" if dashed else "-",
                    linewidth=1.0 if dashed else 1.6, alpha=0.7 if dashed else 1.0,
                    label=None if dashed else label + seeds)
            if y.shape[0] > 1:
                ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=color, alpha=0.15, linewidth=0)
            plotted.append((x, y))
    ax.set(xlabel=xlabel, ylim=style.ylim or y_range(plotted, style.logx),
           ylabel=LOSS_LABEL if style.train else YLABELS.get(style.metric, style.metric))
    if style.logx:
        ax.set_xscale("log")
    else:
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)
    ax.grid(alpha=0.3)
    legend = ax.legend(loc="upper right")
    if style.train:
        ax.add_artist(legend)
        kinds = [Line2D([], [], color="0.3", linewidth=1.6, label=YLABELS[style.metric].split(" (")[0]),
                 Line2D([], [], color="0.3", linestyle="--", linewidth=1.0, label="training loss")]
        ax.legend(handles=kinds, loc="lower left")
    if style.title:
        ax.set_title(style.title)
    if warning:
        figure.suptitle("measured under different load: compare steps or FLOPs (see the printed warning)",
                        color="firebrick", fontsize="medium")
    return figure, warning


def plot_curves(paths: list[str], out: str | Path, axis: str = "steps", metric: str = "val_loss",
                ylim: tuple[float, float] | None = None, **style: object) -> str | None:
    """Draw the curves (see `CurveStyle` for the other options) and save them to `out`; returns the
    wall-clock warning, also drawn on the figure, when runs measured under different load are compared by
    time."""
    figure, warning = draw_curves(paths, CurveStyle(axis=axis, metric=metric, ylim=ylim, **style))
    figure.savefig(out, dpi=200)
    return warning


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    parser.add_argument("--out", required=True, help="image file to write: .png, .pdf or .svg")
    parser.add_argument("--x", choices=AXES, default="steps", dest="axis", help="x-axis")
    parser.add_argument("--metric", default="val_loss", help="metrics.jsonl key to plot")
    parser.add_argument("--train", action="store_true", help="also draw the training loss, dashed")
    parser.add_argument("--labels", nargs="+", metavar="NAME",
                        help="legend names, one per curve in the order the runs are given (default: model, "
                             "optimizer, learning rate and what else tells the curves apart)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--logx", action="store_true", help="logarithmic x-axis")
    parser.add_argument("--ylim", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="y-axis range (default: what the curves reach after the first 10%% of the "
                             "x-axis)")
    args = parser.parse_args(argv)
    warning = plot_curves(args.runs, args.out, args.axis, args.metric, args.ylim, train=args.train,
                          labels=tuple(args.labels) if args.labels else None, title=args.title,
                          logx=args.logx)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out}")


cli = entry_point(main)
