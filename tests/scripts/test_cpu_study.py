"""The CPU study's learning-rate protocol: the grid grows past an edge by ×3 while the best rate sits there,
never beyond 27× the paper's rate, and a finished run is recognised so that a rerun only redraws."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
cpu_study = importlib.import_module("cpu_study")

BASE = 6e-4
GRID = [BASE / 3, BASE, 3 * BASE, 9 * BASE]


def losses(values: list[float], rates: list[float] = GRID) -> dict[float, float]:
    return dict(zip(rates, values, strict=True))


@pytest.mark.parametrize(("values", "expected"), [
    ([2.7, 2.5, 2.4, 2.3], [27]),  # best at the top edge: one more rate above
    ([2.3, 2.5, 2.6, 2.7], [1 / 9]),  # best at the bottom edge: one more rate below
    ([2.7, 2.4, 2.3, 2.6], []),  # best inside the grid: done
])
def test_grid_grows_past_the_edge_where_the_best_rate_is(values, expected):
    assert cpu_study.edge_extension(losses(values), BASE) == pytest.approx(expected)


def test_grid_stops_at_27_times_either_way():
    top = losses([2.7, 2.5, 2.4, 2.3, 2.2], [*GRID, 27 * BASE])
    assert cpu_study.edge_extension(top, BASE) == []
    bottom = losses([2.1, 2.2, 2.3, 2.5, 2.6], [BASE / 27, *GRID])
    assert cpu_study.edge_extension(bottom, BASE) == []


def test_a_run_is_finished_when_its_last_evaluation_is_at_the_step_budget(tmp_path):
    run = tmp_path / "run"
    assert not cpu_study.finished(run, 300)  # no run directory yet
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: gpt2_tiny}\n")
    records = [{"step": 0, "val_loss": 5.5}, {"step": 275, "val_loss": 2.5}, {"step": 299, "train_loss": 2.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert not cpu_study.finished(run, 300)  # stopped before its final evaluation: resume it
    with (run / "metrics.jsonl").open("a") as file:
        file.write(json.dumps({"step": 300, "val_loss": 2.4}) + "\n")
    assert cpu_study.finished(run, 300)


def test_the_study_trains_on_the_shipped_corpus():
    """A user has the study's corpus: experiment=cpu_study reads the 42 works shipped in data/samples/, not a
    file outside the package."""
    import gzip

    from tests.hydra_compose import compose_train

    data = compose_train(["experiment=cpu_study"]).data
    assert data.source == "sample"
    path = Path(__file__).resolve().parents[2] / "data" / "samples" / data.files
    with gzip.open(path, "rt", encoding="utf-8") as f:
        documents = [json.loads(line) for line in f]
    assert len(documents) == 42 and sum(len(d["text"]) for d in documents) == 5_057_197
