"""Read run directories (`config.yaml` + `metrics.jsonl`) for the analysis scripts, group seeds, label groups.

Runs form one group when they are the same experiment up to the seed: the keys gpt/run_identity.py says
define an experiment (every key it does not allow to change on resume) except `train.seed`, plus
`train.max_steps`, which sets the schedule's length. Hardware-only settings (micro-batch, device) and
cadences do not split a group; a key an older run predates counts as the value it was trained with.
FLOPs per token are gpt/plan.py's: the model's plus the optimizer's curvature passes. Wall-clock is only as
comparable as the conditions it was measured in: `time_warning` says when the runs' throughput shows that the
machine's load changed within or between them.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from common.errors import UserError
from gpt.metrics import METRICS_FILE, read_metrics
from gpt.model import GPT, GPTConfig
from gpt.plan import training_flops_per_token
from gpt.run_dir import CONFIG_FILE
from gpt.run_identity import ADDED_KEYS, defines_experiment, flatten

# Beyond this ratio of throughputs (10th to 90th percentile within a run, slowest to fastest between runs),
# elapsed time says more about the machine's load than about the optimizer.
THROUGHPUT_SPREAD = 1.5
# x-axis name -> the metrics key it is computed from.
AXES = {"steps": "step", "tokens": "tokens", "flops": "tokens", "time": "elapsed_s"}


def format_value(value: Any) -> str:
    """Compact, label-friendly numbers: 0.0006 -> 6e-4, 200000 -> 200000, (0.965, 0.99) -> 0.965,0.99."""
    if isinstance(value, tuple):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, float) and value != 0 and not 1e-2 <= abs(value) < 1e4:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass
class Run:
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]

    @cached_property
    def identity(self) -> tuple[tuple[str, Any], ...]:
        flat = {**ADDED_KEYS, **flatten(self.config)}
        return tuple(sorted((k, v) for k, v in flat.items()
                            if k == "train.max_steps" or (defines_experiment(k) and k != "train.seed")))

    @property
    def label(self) -> str:
        optim = self.config["optim"]
        return f"{self.config['model']['name']} {optim['name']} lr={format_value(float(optim['lr']))}"

    @cached_property
    def flops_per_token(self) -> float:
        """Training FLOPs per trained token, curvature passes included."""
        fields = {f.name for f in dataclasses.fields(GPTConfig)}
        with torch.device("meta"):
            model = GPT(GPTConfig(**{k: v for k, v in self.config["model"].items() if k in fields}))
        batch = self.config["train"]["global_batch_size"]
        return training_flops_per_token(model, self.config["optim"], batch)

    def series(self, key: str) -> list[dict[str, Any]]:
        """The records that carry `key`, in step order; a run without any is a user error."""
        records = [r for r in self.records if r.get(key) is not None]
        if not records:
            raise UserError(f"{self.path}: no '{key}' in any record of {METRICS_FILE}")
        return records

    def x_value(self, record: dict[str, Any], axis: str) -> float:
        """The record's position on an x-axis: steps, tokens, FLOPs or wall-clock seconds."""
        value = record.get(AXES[axis])
        if value is None:
            raise UserError(f"{self.path}: the record of step {record['step']} has no '{AXES[axis]}'")
        return value * self.flops_per_token if axis == "flops" else float(value)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    for name in (CONFIG_FILE, METRICS_FILE):
        if not (path / name).is_file():
            raise UserError(f"{path}: not a run directory (no {name})")
    records = sorted(read_metrics(path / METRICS_FILE), key=lambda r: r["step"])
    if not records:
        raise UserError(f"{path}: {METRICS_FILE} holds no records")
    return Run(path, yaml.safe_load((path / CONFIG_FILE).read_text()), records)


def group_runs(paths: list[str]) -> list[list[Run]]:
    """Load runs and group those that differ only by seed, in the order they were given."""
    groups: dict[tuple[tuple[str, Any], ...], list[Run]] = {}
    for path in dict.fromkeys(paths):
        run = load_run(path)
        groups.setdefault(run.identity, []).append(run)
    return list(groups.values())


def group_labels(groups: list[list[Run]]) -> list[str]:
    """'gpt2_small sophia_g lr=6e-4'; groups sharing that label get the settings that tell them apart."""
    labels = [group[0].label for group in groups]
    identities = [dict(group[0].identity) for group in groups]
    result = []
    for label, identity in zip(labels, identities, strict=True):
        peers = [other for other, peer_label in zip(identities, labels, strict=True) if peer_label == label]
        differing = [k for k in identity if len({repr(peer.get(k)) for peer in peers}) > 1]
        extras = [f"{k if k.endswith('.name') else k.rsplit('.', 1)[-1]}={format_value(identity[k])}"
                  for k in differing]
        result.append(" ".join([label, *extras]))
    return result


def aligned_series(group: list[Run], metric: str, axis: str) -> tuple[np.ndarray, np.ndarray]:
    """A group's metric at the steps every seed recorded it: x (mean over seeds) and y (seeds × points)."""
    by_step = [{r["step"]: r for r in run.series(metric)} for run in group]
    steps = sorted(set.intersection(*(set(records) for records in by_step)))
    if not steps:
        where = ", ".join(str(run.path) for run in group)
        raise UserError(f"{where}: these seeds of one experiment share no step with '{metric}'")
    x = [[run.x_value(records[s], axis) for s in steps] for run, records in zip(group, by_step, strict=True)]
    y = [[records[s][metric] for s in steps] for records in by_step]
    return np.mean(x, axis=0), np.array(y, dtype=float)


def time_warning(runs: list[Run]) -> str | None:
    """A warning when the runs' wall-clock was measured under different load, judged from the tokens/s of
    their log records (the first, which includes start-up, left out): within a run, its 90th / 10th
    percentile; between runs, their median training FLOP/s (curvature passes included, so that an optimizer
    doing more work per token is not mistaken for a slower machine). None when both stay within
    THROUGHPUT_SPREAD or no run logged its throughput."""
    within, flop_rates = [], []
    for run in runs:
        rates = np.array([r["tokens_per_sec"] for r in run.records if r.get("tokens_per_sec")][1:])
        if len(rates) == 0:
            continue
        low, high = np.percentile(rates, [10, 90])
        within.append((high / low, run.path))
        flop_rates.append((float(np.median(rates)) * run.flops_per_token, run.path))
    problems = []
    ratio, path = max(within, default=(1.0, None), key=lambda item: item[0])
    if ratio > THROUGHPUT_SPREAD:
        problems.append(f"tokens/s varied {ratio:.1f}× within {path}")
    if len(flop_rates) > 1:
        (slow, slow_path), (fast, fast_path) = min(flop_rates), max(flop_rates)
        if fast / slow > THROUGHPUT_SPREAD:
            problems.append(f"training FLOP/s differ {fast / slow:.1f}× between runs ({slow_path} slowest, "
                            f"{fast_path} fastest)")
    if not problems:
        return None
    return (f"wall-clock was measured under different conditions ({'; '.join(problems)}): elapsed times "
            "compare optimizers only for runs made one at a time on the same otherwise idle hardware; "
            "compare steps or FLOPs, or time per step measured together (scripts/bench_optim.py)")
