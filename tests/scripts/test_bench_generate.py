"""scripts/bench_generate.py runs end to end and reports the cached and recomputed paths' tokens as equal."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_generate_reports_both_paths_and_their_agreement(tmp_path):
    """Wrong if the benchmark timed only one path, lost the ratio, or hid a disagreement between the paths
    (it must exit non-zero then): 150 tokens on the 128-token quick-start shape cross a window shift."""
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "scripts" / "bench_generate.py"), "--config", "gpt2_tiny",
               "--new-tokens", "150", "--rounds", "1", "--out", str(out)]
    result = subprocess.run(command,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tokens_identical"] is True and report["block_size"] == 128
    assert set(report["seconds"]) == {"cached", "recomputed"}
    assert report["speedup"] == report["median_seconds"]["recomputed"] / report["median_seconds"]["cached"]
    assert "tokens identical: yes" in result.stdout
