"""The step and preparation benchmarks run end to end on tiny inputs and report consistent numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_script(name, tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": "true"}
    out = tmp_path / f"{name}.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *args, "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_step_times_the_curvature_pass_phases(tmp_path):
    """Otherwise the step benchmark reports a breakdown that misses the curvature pass (its phases never
    timed), or parts that add up to more than the step they split."""
    report = run_script("bench_step", tmp_path, "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                        "--block-size", "16", "--batch", "4", "--micro-batch", "2", "--rounds", "1",
                        "--warmup-rounds", "0", "--block", "2", "--interval", "1", "--no-compile",
                        "--only", "adamw,sophia_g@half")
    adamw, sophia = report["results"]
    assert adamw["ratio_vs_adamw"] == 1.0 and sophia["steps"] == 2
    assert all(sophia["curvature_ms_per_step"][phase] > 0 for phase in ("forward", "sampling", "backward"))
    # The floor: a pass every step (k = 1) over half the batch, at AdamW's forward+backward cost.
    assert adamw["floor_vs_adamw"] is None
    floor = 1 + 0.5 * adamw["breakdown_ms_per_step"]["fwd_bwd"] / adamw["ms_per_step"]
    assert sophia["floor_vs_adamw"] == pytest.approx(floor)
    assert sophia["ratio_over_floor"] == pytest.approx(sophia["ratio_vs_adamw"] / floor)
    for result in report["results"]:
        parts = sum(result["breakdown_ms_per_step"].values())
        assert 0 < parts <= result["ms_per_step"] * 1.001
        assert 0 < result["mfu"] < 1


@pytest.mark.parametrize("corpus", ["jsonl", "txt"])
def test_bench_prepare_reports_both_ratios_on_the_same_tokens(tmp_path, corpus):
    """Otherwise the pipeline and raw tiktoken are compared on different work (the benchmark refuses a
    pipeline that wrote other than every raw token plus one EOT per document), or a ratio is missing."""
    report = run_script("bench_prepare", tmp_path, "--corpus", corpus, "--tokens", "100000", "--file-count",
                        "40", "--reps", "1", "--threads", "1")
    assert report["tokens"] >= 100_000 and report["documents"] >= (40 if corpus == "txt" else 1)
    assert report["files"] == (40 if corpus == "txt" else 8)
    (run,) = report["runs"]
    assert report["ratio_steady_state"] == run["raw_steady_s"] / run["pipeline_write_s"] > 0
    assert report["ratio_end_to_end"] == run["raw_end_to_end_s"] / run["pipeline_end_to_end_s"] > 0


def test_bench_prepare_hash_rate_extrapolates_to_openwebtext(tmp_path):
    """Otherwise the block-verification cost quoted in docs/data.md has no command behind it: the
    extrapolation must be OpenWebText's 18.07 GB train split over the measured rate."""
    report = run_script("bench_prepare", tmp_path, "--hash-rate")
    for threads in ("1_threads", "3_threads"):
        rates = report[threads]
        assert rates["mb_per_cpu_s"] > 0
        assert abs(rates["openwebtext_train_cpu_s"] * rates["mb_per_cpu_s"] - 18_071.164396) < 1e-3


@pytest.mark.slow
def test_bench_study_times_the_same_runs_both_ways(tmp_path):
    """Otherwise the runner's two ways are timed on different work, or one of them trains nothing: both
    train every run from scratch (the scratch folder is gone afterwards) and the ratio is of their medians."""
    small = ["+study.overrides.model.n_layer=2", "+study.overrides.model.n_embd=64",
             "+study.overrides.model.block_size=32", "study.overrides.train.global_batch_size=8",
             "study.overrides.train.micro_batch_size=8", "study.overrides.schedule.warmup_steps=2"]
    report = run_script("bench_study", tmp_path, "--runs", "2", "--steps", "12", "--repeats", "1",
                        "--work", str(tmp_path / "work"), *small)
    # The overrides reach the runs: 8 × 32 tokens a step, and 2 layers × 64 with a 256-byte vocabulary and
    # 32 positions: tables 256·64 + 32·64, per layer 4·64² (attention) + 8·64² (MLP) + 2·64 (norms), a
    # final norm.
    assert report["tokens_per_step"] == 256 and report["overrides"] == small
    assert report["parameters"] == 256 * 64 + 32 * 64 + 2 * (12 * 64 * 64 + 2 * 64) + 64
    parallel, sequential = report["median_seconds"]["parallel"], report["median_seconds"]["sequential"]
    assert report["ways"]["parallel"]["threads"] == 1 and report["ways"]["sequential"]["parallel"] == 1
    assert report["ratio_parallel_to_sequential"] == pytest.approx(parallel / sequential)
    assert min(parallel, sequential) > 0 and not (tmp_path / "work").exists()
