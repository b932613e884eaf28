"""Plot how often gradient clipping triggered (Fig. 7a) and Sophia's win rate over training.

    python scripts/plot_diagnostics.py RUN... --out diagnostics.png [--bins 50]

Each metrics record's `clip_fraction` covers the steps since the previous record (its `window_steps`; in
files older than that key, the step difference), so fractions are averaged weighted by those step counts (a
record written at a stop between two records covers fewer steps): over `--bins` equal spans of training,
pooling a group's seeds (left panel), and over the whole run (one bar per group: the mean over seeds, with
their min–max where there are several; also printed). The right panel shows `win_rate` (the fraction of
coordinates Sophia did not clip) for the Sophia runs; it is left out when no run is a Sophia run. One legend
below the panels names the groups.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from common.cli import run_cli
from gpt.cli.runs import Run, aligned_series, group_labels, group_runs


def clipped_steps(run: Run, edges: np.ndarray) -> np.ndarray:
    """Clipped steps and all steps (two rows) in each span [edges[i], edges[i+1]) of training: a record's
    clip_fraction covers its `window_steps` steps (older records: those since the previous record), all
    counted in the span of its own step."""
    records = run.series("clip_fraction")
    ends = np.array([r["step"] for r in records], dtype=float)
    since_previous = np.diff(ends, prepend=0.0)
    covered = np.array([r.get("window_steps", gap) for r, gap in zip(records, since_previous, strict=True)],
                       dtype=float)
    clipped = covered * np.array([r["clip_fraction"] for r in records])
    span = np.clip(np.searchsorted(edges, ends, side="right") - 1, 0, len(edges) - 2)
    return np.stack([np.bincount(span, clipped, len(edges) - 1), np.bincount(span, covered, len(edges) - 1)])


def plot_diagnostics(paths: list[str], out: str | Path, bins: int = 50) -> dict[str, list[float]]:
    """Draw clip fraction over training, per group (bars) and win rate into `out`; returns each group's
    per-seed fraction of clipped steps over the whole run."""
    figure, totals = draw_diagnostics(paths, bins)
    figure.savefig(out, dpi=150)
    return totals


def draw_diagnostics(paths: list[str], bins: int = 50) -> tuple[Figure, dict[str, list[float]]]:
    groups = group_runs(paths)
    labels = group_labels(groups)
    colors = [f"C{i}" for i in range(len(groups))]  # one color per group in every panel
    sophia = [i for i, group in enumerate(groups) if group[0].config["optim"]["name"].startswith("sophia")]
    figure = Figure(figsize=(15 if sophia else 10, 4.5), layout="constrained")
    axes = figure.subplots(1, 3 if sophia else 2)
    totals: list[list[float]] = []
    for group, label, color in zip(groups, labels, colors, strict=True):
        edges = np.linspace(0, max(run.records[-1]["step"] for run in group), bins + 1)
        counts = np.array([clipped_steps(run, edges) for run in group])
        clipped, covered = counts.sum(axis=0)  # pooled over seeds; spans without a record are left out
        seen = covered > 0
        middles = (edges[:-1] + edges[1:]) / 2
        axes[0].plot(middles[seen], clipped[seen] / covered[seen], label=label, color=color)
        totals.append([run_clipped.sum() / run_covered.sum() for run_clipped, run_covered in counts])
    means = [np.mean(t) for t in totals]
    positions = np.arange(len(groups))
    axes[1].bar(positions, means, color=colors)
    seeded = [i for i, t in enumerate(totals) if len(t) > 1]  # a single seed has no spread to draw
    if seeded:
        axes[1].errorbar(positions[seeded], [means[i] for i in seeded], fmt="none", ecolor="black", capsize=4,
                         yerr=[[means[i] - min(totals[i]) for i in seeded],
                               [max(totals[i]) - means[i] for i in seeded]])
    axes[1].set_xticks(positions, [str(i + 1) for i in positions])
    axes[0].set(xlabel="step", ylabel="fraction of steps clipped", title="gradient clipping over training")
    axes[1].set(xlabel="run group (see the legend)", ylabel="fraction of steps clipped",
                title="over the whole run" + (" (min–max over seeds)" if seeded else ""))
    for i in sophia:
        x, y = aligned_series(groups[i], "win_rate", "steps")
        axes[2].plot(x, y.mean(axis=0), color=colors[i])
    if sophia:
        axes[2].set(xlabel="step", ylabel="win rate", title="Sophia: coordinates not clipped")
    # One legend for all panels, below them, so that it covers no curve.
    figure.legend(axes[0].get_lines(), [f"{i + 1}: {label}" for i, label in enumerate(labels)],
                  loc="outside lower center", ncols=min(len(groups), 3), frameon=False)
    for ax in axes:
        ax.grid(alpha=0.3)
    return figure, dict(zip(labels, totals, strict=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    parser.add_argument("--out", required=True, help="image file to write, e.g. diagnostics.png")
    parser.add_argument("--bins", type=int, default=50, help="spans of training (default: 50)")
    args = parser.parse_args(argv)
    if args.bins < 1:
        parser.error("--bins must be at least 1")
    for label, fractions in plot_diagnostics(args.runs, args.out, args.bins).items():
        seeds = f" (seeds {min(fractions):.1%}–{max(fractions):.1%})" if len(fractions) > 1 else ""
        print(f"{label}: clipped in {np.mean(fractions):.1%} of steps{seeds}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
