"""The study's plan against hand arithmetic: steps from budgets in tokens or tokens per parameter, the FLOPs
of a run, GPU-hours at 40% MFU, and the run counts coordinate descent is expected to need."""

from __future__ import annotations

import importlib
import sys

import pytest

from gpt.study.arms import resolve_arms
from gpt.study.plan import gpu_hours, plan_cells
from gpt.study.schema import load_study
from tests.gpt.study.tiny_study import REPO

sys.path.insert(0, str(REPO / "scripts"))
study_script = importlib.import_module("study")

# GPT-2 small as configs/model/gpt2_small.yaml sets it: 12 layers × 768, context 1024, vocabulary 50,304, no
# biases (LayerNorm weights only), tied head.
L, D, T, V = 12, 768, 1024, 50304
PARAMS = L * (12 * D * D + 2 * D) + V * D + T * D + D  # blocks, wte, wpe, ln_f
FLOPS_PER_TOKEN = 6 * (PARAMS - T * D) + 12 * L * D * T  # 6N without the position table, plus attention
TOKENS_PER_STEP = 480 * 1024


def paper_125m():
    name, node, _ = study_script.compose_study(["study=paper_125m"])
    study = load_study(node, name)
    return study, resolve_arms(study)


def test_chinchilla_budgets_are_20_tokens_per_parameter_in_whole_steps():
    study, arms = paper_125m()
    assert arms[0].params == PARAMS == 124_373_760
    assert [arms[0].steps(b, study.tokens_per_parameter) for b in study.budgets] == [
        round(k * 20 * PARAMS / TOKENS_PER_STEP) for k in (1, 2, 4)] == [5061, 10122, 20243]


def test_run_flops_and_gpu_hours_follow_the_training_plan():
    """A run's training FLOPs are steps × tokens × FLOPs per token (Sophia-G +1/10 for a GNB pass every 10
    steps, Sophia-H +2/10 for Hutchinson's double backward); GPU-hours divide by 40% of the A100's 312 and the
    H100's 989 TFLOP/s bf16 peaks."""
    study, arms = paper_125m()
    cells = {(c.optimizer, c.budget): c for c in plan_cells(study, arms)}
    for optimizer, extra in (("adamw", 0), ("lion", 0), ("muon", 0), ("sophia_g", 0.1), ("sophia_h", 0.2)):
        cell = cells[optimizer, "1× Chinchilla"]
        per_run = 5061 * TOKENS_PER_STEP * FLOPS_PER_TOKEN * (1 + extra)
        assert cell.training_flops_expected == pytest.approx(cell.runs_expected * per_run, rel=1e-12)
        for gpu, peak in (("A100", 312e12), ("H100", 989e12)):
            expected_hours = cell.runs_expected * per_run / (0.4 * peak) / 3600
            assert gpu_hours([cell], gpu, "expected") == pytest.approx(expected_hours, rel=1e-12)


def test_expected_and_maximal_run_counts():
    """lr on rungs −1..2 (limits −3..4), weight decay on −1..1 (limits −2..2), each ending one rung above its
    reference: the lr sweep (4 runs), the weight-decay sweep at the new lr (rungs −1, 1 and, the best being at
    its edge, 2: 3 new), round 2's lr sweep at the new decay (rungs 0 and 2: 2 new; weight decay is not swept
    again, lr having stayed): 9 tuning runs, and 2 more seeds: 11. At most: 3 rounds × (8 + 5) rungs, below
    the 40 configurations there are, plus 2 seeds: 41."""
    study, arms = paper_125m()
    for cell in plan_cells(study, arms):
        assert (cell.runs_expected, cell.runs_at_most) == (11, 41)
    study = study.__class__(**{**study.__dict__, "tune_at": "smallest_budget"})
    counts = {c.budget: c.runs_expected for c in plan_cells(study, arms) if c.optimizer == "adamw"}
    assert counts == {"1× Chinchilla": 11, "2× Chinchilla": 3, "4× Chinchilla": 3}


def test_the_plan_prints_before_anything_and_a_dry_run_stops_there(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study_script.main(["study=paper_125m", "launcher=slurm", "study.dry_run=true"])
    out = capsys.readouterr().out
    assert "plan: study paper_125m: 5 optimizers × 3 budgets × 1 model" in out
    assert "runs: 165 expected (at most 615)" in out
    assert "time at 40% MFU on A100 (312.00 TFLOP/s bfloat16 peak)" in out
    assert not (tmp_path / "runs").exists()  # nothing prepared, created or started
