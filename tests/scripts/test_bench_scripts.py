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
    for result in report["results"]:
        parts = sum(result["breakdown_ms_per_step"].values())
        assert 0 < parts <= result["ms_per_step"] * 1.001
        assert 0 < result["mfu"] < 1


def test_bench_prepare_counts_the_same_tokens_as_raw_tiktoken(tmp_path):
    """Otherwise the pipeline and raw tiktoken are compared on different work: the pipeline must hold every
    raw token plus one EOT per document."""
    report = run_script("bench_prepare", tmp_path, "--tokens", "100000", "--reps", "1", "--threads", "1")
    (pipeline,) = report["pipeline"]
    assert report["tokens"] >= 100_000
    assert pipeline["tokens"] == report["tokens"] + pipeline["documents"]
    assert pipeline["documents"] == report["documents"]


@pytest.mark.slow
def test_bench_study_times_the_same_runs_both_ways(tmp_path):
    """Otherwise the runner's two ways are timed on different work, or one of them trains nothing: both
    train every run from scratch (the scratch folder is gone afterwards) and the ratio is of their medians."""
    report = run_script("bench_study", tmp_path, "--runs", "2", "--steps", "41", "--repeats", "1",
                        "--work", str(tmp_path / "work"))
    parallel, sequential = report["median_seconds"]["parallel"], report["median_seconds"]["sequential"]
    assert report["ways"]["parallel"]["threads"] == 1 and report["ways"]["sequential"]["parallel"] == 1
    assert report["ratio_parallel_to_sequential"] == pytest.approx(parallel / sequential)
    assert min(parallel, sequential) > 0 and not (tmp_path / "work").exists()
