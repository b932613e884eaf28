"""The analysis scripts on synthetic run directories whose answers are known in closed form.

Validation curves are f(s) = 2.5 + 4/√(1 + s/1000) for the baseline and f(k·s) for a run k times as fast, so
the run reaches the baseline's final loss at exactly 1/k of the baseline's steps. Where that point falls
between two eval points the scripts interpolate linearly, which for f's curvature there (a 300-step gap near
step 10,000) errs by 1.4e-4 relative: exact answers are checked with a tolerance of rel=1e-3.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.errors import UserError
from gpt.cli import plot_curves, runs, speedup

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
plot_diagnostics = importlib.import_module("plot_diagnostics")

TOTAL = 20_000
TOKENS_PER_STEP = 8 * 64


def loss(step: float, speed: float = 1.0) -> float:
    return 2.5 + 4 / math.sqrt(1 + speed * step / 1000)


def flops_per_token(n_layer: int, n_embd: int = 64, block_size: int = 64, vocab: int = 256) -> int:
    """6N + 12·L·d·T with N the parameters of a bias-free GPT-2 but its position table: per block 12d²
    weights and two LayerNorm gains, the final LayerNorm, and the tied V×d output head."""
    n = n_layer * (12 * n_embd**2 + 2 * n_embd) + n_embd + vocab * n_embd
    return 6 * n + 12 * n_layer * n_embd * block_size


def make_run(root: Path, name: str, *, speed: float = 1.0, offset: float = 0.0, eval_every: int = 1000,
             seconds_per_step: float = 0.5, optim: str = "adamw", lr: float = 6e-4, seed: int = 1337,
             n_layer: int = 2, micro_batch_size: int = 4, max_steps: int = TOTAL, win_rate: bool = True,
             clip: list[tuple[int, float]] | None = None, throughput=None) -> str:
    """A run directory: config.yaml as the trainer writes it and metrics.jsonl with evals every `eval_every`
    steps (val_loss = loss(step, speed) + offset), or the given (step, clip_fraction) log records;
    `throughput(step)`, if given, is each record's tokens_per_sec."""
    path = root / name
    path.mkdir()
    optim_cfg = {"name": optim, "lr": lr, "betas": [0.9, 0.95], "weight_decay": 0.1}
    if optim.startswith("sophia"):
        optim_cfg |= {"betas": [0.965, 0.99], "rho": 0.05, "hessian_interval": 10, "hessian_batch_size": None}
    config = {
        "out_dir": str(path),
        "train": {"max_steps": max_steps, "global_batch_size": 8, "micro_batch_size": micro_batch_size,
                  "seed": seed},
        "model": {"name": "gpt2_test", "n_layer": n_layer, "n_head": 2, "n_embd": 64, "block_size": 64,
                  "vocab_size": 256, "dropout": 0.0, "bias": False},
        "optim": optim_cfg,
        "schedule": {"name": "cosine", "warmup_steps": 100, "min_lr": 3e-5, "decay_steps": None},
        "data": {"name": "synthetic", "tokenizer": "byte"},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"step": 0, "tokens": 0, "val_loss": loss(0) + offset, "elapsed_s": 0.0}]
    for step, clip_fraction in clip or [(s, 0.25) for s in range(eval_every, TOTAL + 1, eval_every)]:
        record = {"step": step, "tokens": step * TOKENS_PER_STEP, "train_loss": loss(step, speed),
                  "clip_fraction": clip_fraction, "elapsed_s": step * seconds_per_step}
        if throughput is not None:
            record["tokens_per_sec"] = throughput(step)
        if clip is None:
            record["val_loss"] = loss(step, speed) + offset
        if win_rate and optim.startswith("sophia"):
            record["win_rate"] = 0.3
        records.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def group_of(report: dict, path: str) -> dict:
    return next(g for g in report["groups"] if path in g["runs"])


def test_a_run_twice_as_fast_in_steps_has_speedup_two(tmp_path: Path) -> None:
    """Run B's loss at step s is the baseline's at 2s, evaluated every 300 steps, so the crossing (step
    10,000) is interpolated between 9,900 and 10,200; it costs 0.6 s per step against the baseline's 0.5 s."""
    base = make_run(tmp_path, "base")
    fast = make_run(tmp_path, "fast", speed=2, eval_every=300, seconds_per_step=0.6, optim="lion", lr=1e-4)
    report = speedup.compare([base], [fast])
    assert report["target_val_loss"] == pytest.approx(loss(TOTAL), rel=1e-12)
    row = group_of(report, fast)
    assert row["steps"]["to_target"]["mean"] == pytest.approx(TOTAL / 2, rel=1e-3)
    assert row["steps"]["speedup"]["mean"] == pytest.approx(2, rel=1e-3)
    assert row["flops"]["speedup"]["mean"] == pytest.approx(2, rel=1e-3)  # same model, no curvature pass
    assert row["time"]["speedup"]["mean"] == pytest.approx(TOTAL * 0.5 / (TOTAL / 2 * 0.6), rel=1e-3)
    baseline_row = group_of(report, base)
    assert baseline_row["steps"]["speedup"]["mean"] == pytest.approx(1)


def test_flops_ratio_accounts_for_model_size_and_curvature_passes(tmp_path: Path) -> None:
    """Same curves as above; a 4-layer model costs flops_per_token(4)/flops_per_token(2) more per token, and
    Sophia-G's curvature pass (a full batch every 10 steps) adds 1/10 on top."""
    base = make_run(tmp_path, "base")
    bigger = make_run(tmp_path, "bigger", speed=2, eval_every=250, n_layer=4)
    sophia = make_run(tmp_path, "sophia", speed=2, eval_every=250, optim="sophia_g")
    report = speedup.compare([base], [bigger, sophia])
    assert runs.load_run(base).flops_per_token == flops_per_token(2)
    expected_bigger = 2 * flops_per_token(2) / flops_per_token(4)
    assert group_of(report, bigger)["flops"]["speedup"]["mean"] == pytest.approx(expected_bigger, rel=1e-9)
    assert group_of(report, sophia)["flops"]["speedup"]["mean"] == pytest.approx(2 / 1.1, rel=1e-9)
    assert group_of(report, sophia)["steps"]["speedup"]["mean"] == pytest.approx(2, rel=1e-9)


def test_seeds_are_grouped_with_mean_and_spread(tmp_path: Path) -> None:
    """Baseline seeds end 0.01 above and below f(20,000), so the target is f(20,000); the run's seeds are 2×
    and 4× as fast (target at steps 10,000 and 5,000, both eval points): mean 3×, range 2–4×. A different
    micro-batch (hardware only) does not split a group."""
    base = [make_run(tmp_path, f"base{s}", seed=s, offset=o) for s, o in ((1, 0.01), (2, -0.01))]
    fast = [make_run(tmp_path, f"fast{s}", seed=s, speed=k, eval_every=250, optim="lion", lr=1e-4,
                     micro_batch_size=2 * s) for s, k in ((1, 2), (2, 4))]
    report = speedup.compare(base, fast)
    assert report["target_val_loss"] == pytest.approx(loss(TOTAL), rel=1e-12)
    assert len(report["groups"]) == 2
    row = group_of(report, fast[0])
    assert row["seeds"] == 2 and row["reached"] == 2 and fast[1] in row["runs"]
    assert row["steps"]["to_target"] == pytest.approx({"mean": 7500, "min": 5000, "max": 10000})
    assert row["steps"]["speedup"] == pytest.approx({"mean": 3, "min": 2, "max": 4})
    assert group_of(report, base[0])["reached"] == 1  # the seed that ends above the mean never reaches it
    assert "(2.00×–4.00×)" in speedup.format_table(report)


def test_never_reaching_the_target_is_reported(tmp_path: Path) -> None:
    base = make_run(tmp_path, "base")
    slow = make_run(tmp_path, "slow", speed=0.5, optim="lion", lr=1e-4)
    row = group_of(speedup.compare([base], [slow]), slow)
    assert row["reached"] == 0 and row["steps"]["speedup"] is None and row["steps"]["to_target"] is None
    out = tmp_path / "report.json"
    speedup.main([slow, "--baseline", base, "--json", str(out)])
    assert group_of(json.loads(out.read_text()), slow)["reached"] == 0
    line = next(line for line in speedup.format_table(speedup.compare([base], [slow])).splitlines()
                if "lion" in line)
    assert "not reached" in line and "0/1" in line


def test_baseline_before_or_after_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Wrong if any of the ways to place --baseline takes a run for a baseline or the other way round (the
    table would then compare the wrong runs, or argparse would say a RUN is missing)."""
    base = make_run(tmp_path, "base")
    other = make_run(tmp_path, "other", optim="lion", lr=1e-4)
    third = make_run(tmp_path, "third", optim="sophia_g")
    expected = speedup.format_table(speedup.compare([base], [other, third]))
    report = str(tmp_path / "r.json")
    for argv in ([other, third, "--baseline", base], ["--baseline", base, "--", other, third],
                 [other, "--baseline", base, "--", third], ["--baseline", base, "--json", report, "--", other,
                                                             third]):
        speedup.main(argv)
        assert capsys.readouterr().out.strip() == expected, argv
    # the table says which measure it is: the paper's mid-run one, not a study's end-of-training speed-up
    assert expected.startswith("measure: the Sophia paper's, read mid-run")
    with pytest.raises(UserError, match="differ only by seed"):
        speedup.compare([base, other], [other])


def test_missing_metric_or_not_a_run_is_a_clear_error(tmp_path: Path) -> None:
    no_val = make_run(tmp_path, "no_val", clip=[(10, 0.0), (20, 0.0)])
    metrics = Path(no_val) / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"val_loss"', '"other"'))
    with pytest.raises(UserError, match=f"{no_val}: no 'val_loss'"):
        plot_curves.plot_curves([no_val], tmp_path / "x.png")
    with pytest.raises(UserError, match=f"{no_val}: no 'val_loss'"):
        speedup.compare([no_val], [])
    with pytest.raises(UserError, match="no 'hessian_norm'"):
        plot_curves.plot_curves([make_run(tmp_path, "adamw")], tmp_path / "x.png", metric="hessian_norm")
    sophia = make_run(tmp_path, "sophia", optim="sophia_g", win_rate=False)
    with pytest.raises(UserError, match=f"{sophia}: no 'win_rate'"):
        plot_diagnostics.plot_diagnostics([sophia], tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        runs.load_run(tmp_path / "empty")


def test_user_error_exits_2_with_one_line(tmp_path: Path) -> None:
    base = make_run(tmp_path, "base")
    result = subprocess.run([sys.executable, str(SCRIPTS / "speedup.py"), str(tmp_path / "nothing"),
                             "--baseline", base], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "no config.yaml" in result.stderr


@pytest.mark.parametrize("axis", sorted(runs.AXES))
def test_curves_are_plotted_on_every_axis(tmp_path: Path, axis: str) -> None:
    paths = [make_run(tmp_path, f"adamw{s}", seed=s, offset=0.01 * s) for s in (1, 2)]
    paths.append(make_run(tmp_path, "sophia", speed=2, optim="sophia_g"))
    out = tmp_path / f"{axis}.png"
    plot_curves.main([*paths, "--out", str(out), "--x", axis])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def test_labels_name_the_settings_that_tell_groups_apart(tmp_path: Path) -> None:
    """Fig. 5's runs differ in max_steps, not in the usual label; a different optimizer needs nothing more."""
    paths = [make_run(tmp_path, f"sophia{k}", optim="sophia_g", max_steps=k) for k in (100_000, 200_000)]
    paths.append(make_run(tmp_path, "adamw", lr=1e-3))
    assert runs.group_labels(runs.group_runs(paths)) == [
        "gpt2_test sophia_g lr=6e-4 max_steps=100000", "gpt2_test sophia_g lr=6e-4 max_steps=200000",
        "gpt2_test adamw lr=1e-3"]


def test_clip_fraction_is_weighted_by_the_steps_each_record_covers(tmp_path: Path) -> None:
    """Records at steps 10, 20 and 25 with clip fractions 0.5, 0 and 1 cover 10, 10 and 5 steps: 10 of the 25
    steps were clipped (0.4), where an unweighted mean would say 0.5."""
    run = make_run(tmp_path, "clips", clip=[(10, 0.5), (20, 0.0), (25, 1.0)])
    clipped, steps = plot_diagnostics.clipped_steps(runs.load_run(run), edges=[0.0, 12.5, 25.0])
    assert clipped.tolist() == pytest.approx([5, 5]) and steps.tolist() == pytest.approx([10, 15])
    out = tmp_path / "clips.png"
    assert plot_diagnostics.plot_diagnostics([run], out) == {"gpt2_test adamw lr=6e-4": [pytest.approx(0.4)]}


def test_clip_fraction_is_weighted_by_the_window_steps_a_record_states(tmp_path: Path) -> None:
    """A record covers its `window_steps` where it states them: here a run resumed at step 16 from a
    checkpoint older than the saved window, whose record of step 20 covers steps 17-20 only. 9 of the 24
    covered steps were clipped (0.375); weighting by the step difference would count 10 for it and say 0.5."""
    run = make_run(tmp_path, "resumed", clip=[(10, 0.5), (20, 1.0), (30, 0.0)])
    path = Path(run) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record, steps in zip(records[1:], (10, 4, 10), strict=True):
        record["window_steps"] = steps
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    clipped, steps = plot_diagnostics.clipped_steps(runs.load_run(run), edges=[0.0, 15.0, 30.0])
    assert clipped.tolist() == pytest.approx([5, 4]) and steps.tolist() == pytest.approx([10, 14])
    assert plot_diagnostics.plot_diagnostics([run], tmp_path / "w.png") == {
        "gpt2_test adamw lr=6e-4": [pytest.approx(9 / 24)]}


def test_diagnostics_plot_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = [make_run(tmp_path, "adamw"), make_run(tmp_path, "sophia", optim="sophia_g")]
    out = tmp_path / "diagnostics.png"
    plot_diagnostics.main([*paths, "--out", str(out), "--bins", "10"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "clipped in 25.0% of steps" in capsys.readouterr().out


def test_wall_clock_under_changing_load_is_flagged(tmp_path: Path) -> None:
    """Wrong if runs whose throughput shows another load (a run slowed 3× halfway; a run 3× slower than its
    peer at the same work per token) are compared by elapsed time without a warning, or if an optimizer that
    does 10% more work per token (Sophia-G's GNB pass every 10 steps), at the same FLOP/s, is mistaken for a
    slower machine."""
    flop_rate = 1e9
    steady = make_run(tmp_path, "steady", throughput=lambda step: flop_rate / flops_per_token(2))
    sophia = make_run(tmp_path, "sophia", optim="sophia_g",
                      throughput=lambda step: flop_rate / (1.1 * flops_per_token(2)))
    assert runs.time_warning([runs.load_run(steady), runs.load_run(sophia)]) is None
    assert speedup.compare([steady], [sophia])["time_warning"] is None

    slowed = make_run(tmp_path, "slowed", lr=1e-3,
                      throughput=lambda step: flop_rate / flops_per_token(2) / (3 if step > TOTAL / 2 else 1))
    warning = runs.time_warning([runs.load_run(steady), runs.load_run(slowed)])
    assert warning and "varied 3.0× within" in warning and "slowed" in warning

    loaded = make_run(tmp_path, "loaded", lr=1e-3, throughput=lambda step: flop_rate / flops_per_token(2) / 3)
    warning = runs.time_warning([runs.load_run(steady), runs.load_run(loaded)])
    assert warning and "differ 3.0× between runs" in warning and "varied" not in warning
    assert "warning: wall-clock was measured" in speedup.format_table(speedup.compare([steady], [loaded]))
    assert plot_curves.plot_curves([steady, loaded], tmp_path / "time.png", axis="time") == warning
    assert plot_curves.plot_curves([steady, loaded], tmp_path / "steps.png", axis="steps") is None


def test_diagnostics_seed_ranges_only_for_several_seeds_and_no_legend_over_curves(tmp_path: Path) -> None:
    """Wrong if a single-seed group gets an error bar (a range it does not have), if a multi-seed group's bar
    does not span its seeds' min–max, or if a legend sits inside a panel, over the curves."""
    clip = {seed: [(step, 0.1 * seed) for step in range(100, 1001, 100)] for seed in (1, 2, 3)}
    paths = [make_run(tmp_path, f"adamw{seed}", seed=seed, clip=clip[seed]) for seed in (1, 2, 3)]
    paths.append(make_run(tmp_path, "sophia", optim="sophia_g", clip=clip[1]))
    figure, totals = plot_diagnostics.draw_diagnostics(paths, bins=5)
    bars = figure.axes[1]
    error_bars = [c for c in bars.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(error_bars) == 1
    segments = error_bars[0].lines[2][0].get_segments()
    assert len(segments) == 1  # the three-seed group only
    (x0, low), (_, high) = segments[0]
    assert (x0, low, high) == (0, pytest.approx(0.1), pytest.approx(0.3))
    assert all(ax.get_legend() is None for ax in figure.axes) and len(figure.legends) == 1
    assert totals["gpt2_test sophia_g lr=6e-4"] == [pytest.approx(0.1)]
