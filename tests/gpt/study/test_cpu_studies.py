"""The CPU studies in study form: configs/study/cpu.yaml repeats the retired scripts/cpu_study.py's protocol
(the same model, data, steps and learning-rate sweep), and cpu_budgets.yaml shares its 300-step runs."""

from __future__ import annotations

import gzip
import importlib
import json
import sys

import pytest

from gpt.study.arms import compose_train, resolve_arms, run_spec
from gpt.study.schema import load_study
from gpt.study.search import descend
from gpt.study.state import StudyState
from tests.gpt.study.tiny_study import REPO

sys.path.insert(0, str(REPO / "scripts"))
study_script = importlib.import_module("study")

# docs/results/cpu_study.md, "Results": the seed-0 sweep of the retired script (rate: final val loss).
DOCUMENTED_SWEEPS = {
    "adamw": {2e-4: 2.733, 6e-4: 2.512, 1.8e-3: 2.440, 5.4e-3: 2.350, 1.62e-2: 2.636},
    "lion": {3.33e-5: 4.013, 1e-4: 3.116, 3e-4: 2.560, 9e-4: 2.462, 2.7e-3: 2.847},
    "sophia_g": {2e-4: 2.680, 6e-4: 2.509, 1.8e-3: 2.749, 5.4e-3: 3.156},
    "sophia_h": {2e-4: 2.681, 6e-4: 2.520, 1.8e-3: 2.761, 5.4e-3: 3.107},
    "muon": {6.67e-3: 2.360, 2e-2: 2.127, 6e-2: 2.069, 0.18: 2.569},
    "adamw_schedulefree": {8.33e-4: 2.470, 2.5e-3: 2.397, 7.5e-3: 2.318, 2.25e-2: 2.612},
}
CHOSEN = {"adamw": 5.4e-3, "lion": 9e-4, "sophia_g": 6e-4, "sophia_h": 6e-4, "muon": 6e-2,
          "adamw_schedulefree": 7.5e-3}


@pytest.fixture(scope="module")
def cpu():
    name, node, _ = study_script.compose_study(["study=cpu"])
    study = load_study(node, name)
    return study, resolve_arms(study)


def test_the_sweep_asks_for_the_retired_scripts_rates_and_picks_its_choices(cpu):
    """Fed the losses the retired script measured, the study's descent evaluates exactly the rates that
    script did (the grid {1/3, 1, 3, 9} × reference, grown by ×3 at an edge) and keeps the same rate: 26
    tuning runs and 12 more seeds, the 38 runs of the report."""
    study, arms = cpu
    total = 0
    for arm in arms:
        (ladder,) = arm.ladders
        evaluated = set()

        def loss_of(point, label=arm.label, seen=evaluated, rungs=ladder):
            seen.add(rungs.value(point[0]))
            return DOCUMENTED_SWEEPS[label].get(rungs.value(point[0]))

        descent = descend(arm.ladders, loss_of, study.max_rounds)
        assert descent.done and evaluated == set(DOCUMENTED_SWEEPS[arm.label]), arm.label
        assert ladder.value(descent.incumbent[0]) == CHOSEN[arm.label]
        total += len(evaluated) + len(study.seeds) - 1
    assert total == 38


def test_every_run_has_the_retired_experiments_settings(cpu):
    """model, data, batch, evaluation, schedule and steps as configs/experiment/cpu_study.yaml set them (the
    values are written out here), min_lr 0.05 × lr, and Sophia-H on the paper's Gaussian probe."""
    study, arms = cpu
    for arm in arms:
        spec = run_spec(study, arm, 0, (1,), 2)
        cfg = compose_train(list(spec.overrides), "test")
        assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.block_size,
                cfg.model.vocab_size) == (4, 128, 4, 128, 256)
        assert (cfg.data.name, cfg.data.files, cfg.data.tokenizer, cfg.data.val_fraction, cfg.data.dir) == (
            "shakespeare_complete", "shakespeare_complete.jsonl.gz", "byte", 0.1,
            "data_cache/cpu_study_byte_shakespeare_complete")
        t = cfg.train
        assert (t.max_steps, t.global_batch_size, t.micro_batch_size, t.eval_interval, t.eval_sequences,
                t.dtype, t.seed) == (300, 16, 16, 25, 256, "float32", 2)
        assert cfg.schedule.warmup_steps == 40
        assert cfg.schedule.min_lr == pytest.approx(0.05 * cfg.optim.lr, rel=1e-6)
        assert cfg.schedule.name == ("constant" if arm.label == "adamw_schedulefree" else "cosine")
        if arm.label == "sophia_h":
            assert cfg.optim.probe == "gaussian"


def test_the_study_trains_on_the_shipped_corpus(cpu):
    """A user has the study's corpus: the 42 works shipped in data/samples/, not a file elsewhere."""
    _, arms = cpu
    data = arms[0].settings.data
    assert data["source"] == "sample"
    with gzip.open(REPO / "data" / "samples" / data["files"], "rt", encoding="utf-8") as f:
        documents = [json.loads(line) for line in f]
    assert len(documents) == 42 and sum(len(d["text"]) for d in documents) == 5_057_197


def test_the_budget_study_reuses_the_300_step_runs(cpu):
    """cpu_budgets' 300-step runs are cpu's own directories: after cpu, it trains only its other budgets."""
    study, arms = cpu
    name, node, _ = study_script.compose_study(["study=cpu_budgets"])
    budgets = load_study(node, name)
    budget_arms = resolve_arms(budgets)
    assert [arm.steps(b, 20) for b in budgets.budgets for arm in budget_arms[:1]] == [150, 300, 600]
    first = StudyState(study, arms).needed()
    reused = {spec.out_dir for spec in StudyState(budgets, budget_arms).needed() if spec.steps == 300}
    assert reused and reused <= {spec.out_dir for spec in first}
