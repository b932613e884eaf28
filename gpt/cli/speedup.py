"""Steps, FLOPs and wall-clock each run needs to reach the baseline's final validation loss: the paper's "2×".

    sophia-speedup RUN... --baseline BASE... [--json FILE]
    sophia-speedup --baseline BASE... -- RUN...

(`--baseline` takes the paths up to the next option or `--`, wherever it stands.)

The target is the mean final val_loss of the baseline runs (one group: they may differ only by seed). For
every run, the first crossing of the target is interpolated linearly between its eval points; the speed-up is
the baseline's own cost (the mean over its seeds of steps, FLOPs and seconds at its final eval) divided by the
run's cost. A group's row gives the mean and min–max over its seeds of those per-seed numbers, and how many
seeds reached the target at all; a group none of whose seeds reaches it shows "not reached". FLOPs include
curvature passes; time is in seconds in the JSON, in hours in the table (minutes when the baseline took under
two hours), and compares only runs on the same hardware under the same load: the report carries a
`time_warning` (printed under the table) when the runs' throughput says the load changed.

This is the Sophia paper's measure, read in the middle of a run: it compares single runs and favours the
schedule that decays first. For the end-of-training comparison over several budgets, with every optimizer
tuned the same way and intervals over seeds (Wen et al.'s speed-up), run a study: scripts/study.py
(docs/study.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from common.errors import UserError
from gpt.cli import entry_point
from gpt.cli.runs import Run, group_labels, group_runs, time_warning
from gpt.study.speedup import first_crossing

COSTS = ("steps", "flops", "time")
MEASURE = ("the Sophia paper's, read mid-run: the steps, FLOPs and time at which each run first reaches the "
           "baseline's final loss (end-of-training speed-ups over several budgets: scripts/study.py)")


def cost_to_reach(run: Run, target: float) -> dict[str, float] | None:
    """Steps, FLOPs and seconds at which val_loss first reaches `target`, or None if it never does."""
    records = run.series("val_loss")
    costs = {axis: first_crossing([(run.x_value(r, axis), r["val_loss"]) for r in records], target)
             for axis in COSTS}
    return None if costs["steps"] is None else costs


def spread(values: list[float]) -> dict[str, float] | None:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)} if values else None


def compare(baseline_paths: list[str], paths: list[str]) -> dict[str, Any]:
    """The report: the target, the baseline's costs, and one entry per group of runs (the baseline first)."""
    groups = group_runs(baseline_paths + paths)
    labels = group_labels(groups)
    baseline = groups[0]
    strays = [path for path in baseline_paths if Path(path) not in {run.path for run in baseline}]
    if strays:
        raise UserError(f"--baseline runs must differ only by seed, but {', '.join(strays)} and "
                        f"{baseline[0].path} are different experiments")
    finals = [run.series("val_loss")[-1] for run in baseline]
    target = statistics.fmean(record["val_loss"] for record in finals)
    baseline_cost = {axis: statistics.fmean(run.x_value(record, axis) for run, record in
                                            zip(baseline, finals, strict=True)) for axis in COSTS}
    report: dict[str, Any] = {"measure": MEASURE, "target_val_loss": target, "baseline": {
        "label": labels[0], "runs": [str(run.path) for run in baseline], **baseline_cost}, "groups": [],
        "time_warning": time_warning([run for group in groups for run in group])}
    for group, label in zip(groups, labels, strict=True):
        costs = [cost for cost in (cost_to_reach(run, target) for run in group) if cost is not None]
        final_losses = [run.series("val_loss")[-1]["val_loss"] for run in group]
        entry: dict[str, Any] = {
            "label": label, "runs": [str(run.path) for run in group], "seeds": len(group),
            "reached": len(costs), "final_val_loss": spread(final_losses),
        }
        for axis in COSTS:
            # A run already at the target at step 0 has no finite speed-up: it gets none.
            ratios = [baseline_cost[axis] / cost[axis] for cost in costs if cost[axis]]
            entry[axis] = {"to_target": spread([cost[axis] for cost in costs]), "speedup": spread(ratios)}
        report["groups"].append(entry)
    return report


def _cell(stats: dict[str, float] | None, fmt: str) -> str:
    if stats is None:
        return "not reached"
    mean, low, high = (fmt.format(stats[key]) for key in ("mean", "min", "max"))
    return mean if stats["min"] == stats["max"] else f"{mean} ({low}–{high})"


def format_table(report: dict[str, Any]) -> str:
    """The report as a markdown table, headed by the target and the baseline's own costs."""
    base = report["baseline"]
    unit, seconds_per_unit = ("hours", 3600) if base["time"] >= 2 * 3600 else ("minutes", 60)
    lines = [
        f"measure: {report['measure']}",
        f"target: val_loss {report['target_val_loss']:.4f} = final val_loss of {base['label']} "
        f"(mean of {len(base['runs'])} run(s)), reached at step {base['steps']:,.0f}, "
        f"{base['flops']:.3e} FLOPs, {base['time'] / seconds_per_unit:.2f} {unit}",
        "",
        f"| runs | seeds | final val_loss | reached | steps | × steps | FLOPs | × FLOPs | {unit} | × time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in report["groups"]:
        seconds = g["time"]["to_target"]
        duration = seconds and {key: value / seconds_per_unit for key, value in seconds.items()}
        cells = [g["label"], str(g["seeds"]), _cell(g["final_val_loss"], "{:.4f}"),
                 f"{g['reached']}/{g['seeds']}",
                 _cell(g["steps"]["to_target"], "{:,.0f}"), _cell(g["steps"]["speedup"], "{:.2f}×"),
                 _cell(g["flops"]["to_target"], "{:.3e}"), _cell(g["flops"]["speedup"], "{:.2f}×"),
                 _cell(duration, "{:.2f}"), _cell(g["time"]["speedup"], "{:.2f}×")]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("time_warning"):
        lines += ["", f"warning: {report['time_warning']}"]
    return "\n".join(lines)


def baseline_last(argv: list[str]) -> list[str]:
    """`argv` with the `--baseline` paths (up to the next option or `--`) moved to the end, where argparse
    cannot mistake runs for baselines or the other way round."""
    rest, baseline, taking = [], [], False
    for arg in argv:
        if arg == "--baseline":
            taking = True
        elif arg.startswith("--baseline="):
            baseline.append(arg.split("=", 1)[1])
        elif taking and not arg.startswith("-"):
            baseline.append(arg)
        else:
            if arg != "--":  # it only ends the baseline's paths
                rest.append(arg)
            taking = False
    return [*rest, "--baseline", *baseline] if baseline or "--baseline" in argv else rest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run directories to compare with the baseline (before --baseline, or after --)")
    parser.add_argument("--baseline", nargs="+", required=True, metavar="BASE",
                        help="the baseline's run directories (seeds of one experiment), before or after "
                             "the runs")
    parser.add_argument("--json", help="also write the report to this JSON file")
    args = parser.parse_args(baseline_last(sys.argv[1:] if argv is None else argv))
    report = compare(args.baseline, args.runs)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


cli = entry_point(main)
