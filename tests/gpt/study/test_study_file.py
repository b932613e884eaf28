"""Bad study files: one `error:` line naming the problem, exit 2, before any run, folder or data is made;
and the pieces every run's command is built from (Hydra override values, run directories)."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys

import pytest

from common.cli import run_cli
from gpt.study.arms import compose_train, override_value, resolve_arms, run_spec
from gpt.study.schema import load_study
from tests.gpt.study.tiny_study import REPO, TINY, environment, write_study

sys.path.insert(0, str(REPO / "scripts"))
study_script = importlib.import_module("study")


def broken(change) -> dict:
    study = copy.deepcopy(TINY)
    change(study)
    return study


BAD = {
    "unknown key": (lambda s: s.update(optimisers={}), "unknown key(s) optimisers"),
    "no budgets": (lambda s: s.update(budgets=[]), "declares no budgets"),
    "baseline not an optimizer": (lambda s: s.update(baseline="sgd"), "baseline='sgd' is not one of"),
    "budget of two kinds": (lambda s: s["budgets"].append({"tokens": 10, "chinchilla": 1}),
                            "budgets[2] must be"),
    "negative budget": (lambda s: s["budgets"].append({"tokens": -5}), "must be a positive integer"),
    "duplicate seed": (lambda s: s.update(seeds=[0, 0]), "seeds must be a list of distinct"),
    "log step of 1": (lambda s: s["tune"]["lr"].update(step=1), "step must be a number > 1"),
    "limits inside points": (lambda s: s["tune"]["lr"].update(limits=[0, 1]), "must enclose its points"),
    "unknown scale": (lambda s: s["tune"]["lr"].update(scale="exp"), "scale must be one of log, linear"),
    "unknown optimizer": (lambda s: s["optimizers"].update(adamx={}), "unknown optim=adamx; valid:"),
    "unknown model": (lambda s: s.update(models=["gpt3"]), "unknown model=gpt3; valid:"),
    "misspelt setting": (lambda s: s["overrides"]["train"].update(max_step=3),
                         "train.max_step is not a config key"),
    "setting the optimizer lacks": (lambda s: s["optimizers"]["lion"].update(overrides={"optim": {"rho": 1}}),
                                    "optimizer lion on gpt2_tiny: optim.rho is not a config key"),
    "value the optimizer refuses": (
        lambda s: s["optimizers"]["lion"].update(overrides={"optim": {"betas": [0.9, 1.5]}}),
        "optim=lion: betas must be two values in [0, 1)"),
    "setting the study sets": (lambda s: s["overrides"]["train"].update(seed=3),
                               "sets train.seed, which the study"),
    "tuning a missing key": (lambda s: s["tune"].update(gamma={"scale": "log", "step": 2, "points": [0]}),
                             "optim.gamma is not a numeric setting"),
    "warm-up longer than a budget": (lambda s: s["overrides"]["schedule"].update(warmup_steps=8),
                                     "no more than its warm-up of 8"),
    "reference outside listed values": (
        lambda s: s["optimizers"]["lion"]["tune"]["lr"].update(reference=5e-4),
        "reference 0.0005 is not among"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_study_file_is_one_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    """Otherwise a mistake in the file surfaces as a traceback, or worse as a failed run hours in."""
    change, expected = BAD[case]
    monkeypatch.chdir(tmp_path)
    write_study(tmp_path / "configs", "bad", broken(change), tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: study_script.main(
            ["study=bad", f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "study.dry_run=false"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]  # no runs/, no data/: nothing made


def test_the_command_itself_prints_one_line_and_exits_2(tmp_path):
    write_study(tmp_path / "configs", "bad", broken(lambda s: s.update(baseline="sgd")), tmp_path / "data")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), "study=bad",
                             f"hydra.searchpath=[file://{tmp_path / 'configs'}]"], cwd=tmp_path,
                            env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: study bad.baseline='sgd' is not one of its optimizers")
    unknown = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), "study=nope"], cwd=tmp_path,
                             env=environment(), capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown study=nope; valid: ")


@pytest.mark.parametrize("value", ["plain", "1e-3", "true", "null", "a b", "it's", "x=y,z", "back\\slash",
                                   "end\\", "a\\'b", 3, 2.5e-4, True, None, [0.9, 0.95]])
def test_override_values_reach_the_config_unchanged(value):
    """Each value, formatted for train.py's command line, composes back to itself (strings that would read as
    numbers, booleans or null, or that hold Hydra's special characters, are quoted)."""
    cfg = compose_train(["wandb.name=" + override_value(value)], "test")
    assert cfg.wandb.name == value or list(cfg.wandb.name) == value


def test_run_directories_are_shared_by_equal_runs_and_apart_for_any_difference(tmp_path):
    """Two studies declaring the same run (same overrides, tuned values, budget, seed) share its directory, so
    it trains once; any other setting, here the warm-up, gives the run another one."""
    def arm_of(study: dict, name: str):
        node = {**copy.deepcopy(study), "out_dir": str(tmp_path / name), "run_root": str(tmp_path / "runs"),
                "tuning_seed": 0, "max_rounds": 3, "tune_at": "every_budget", "final_lr_fraction": 0.05,
                "tokens_per_parameter": 20, "bootstrap_samples": 100, "confidence": 0.95, "dry_run": True}
        node["overrides"]["data"]["dir"] = str(tmp_path / "data")
        parsed = load_study(node, name)
        return parsed, resolve_arms(parsed)[0]

    one, arm_one = arm_of(TINY, "one")
    two, arm_two = arm_of(broken(lambda s: s.update(seeds=[0, 1, 2])), "two")
    other, arm_other = arm_of(broken(lambda s: s["overrides"]["schedule"].update(warmup_steps=3)), "other")
    same = [run_spec(study, arm, 1, (0,), 1).out_dir for study, arm in ((one, arm_one), (two, arm_two))]
    assert same[0] == same[1] and same[0].is_relative_to(tmp_path / "runs")
    assert run_spec(other, arm_other, 1, (0,), 1).out_dir != same[0]
    spec = run_spec(one, arm_one, 1, (1,), 1)
    assert "schedule.min_lr=0.00045" in spec.overrides  # 0.05 × lr 9e-3
    assert {"train.max_steps=16", "train.seed=1", "optim.lr=0.009"} <= set(spec.overrides)
