"""The configs that choose between the official runs' setup and this project's (docs/fidelity.md).

Wrong if a paper run trains another model than the official one (attention scaled by 1/(layer_idx + 1)), if
the default protocol is not the fair one, or if levanter's Sophia-H settings differ from its published ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hydra_compose import compose_train

PAPER = Path(__file__).resolve().parents[2] / "configs" / "experiment" / "paper"
PAPER_RUNS = sorted(p.stem for p in PAPER.glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", PAPER_RUNS)
def test_every_paper_run_uses_the_official_model_and_the_fair_protocol(name):
    """Wrong if a paper figure trains plain GPT-2 attention, or another protocol than the default."""
    cfg = compose_train([f"experiment=paper/{name}"])
    assert cfg.model.scale_attn_by_inverse_layer_idx is True
    assert cfg.protocol.name == "fair"


@pytest.mark.parametrize("optim", ["adamw", "lion", "sophia_g", "sophia_h", "sgd_sai", "adam_mini"])
def test_every_optimizer_at_a_paper_size_trains_the_same_official_model(optim):
    """The flag comes with the model, not the optimizer: comparisons at a paper size stay fair."""
    assert compose_train([f"optim={optim}", "model=gpt2_medium"]).model.scale_attn_by_inverse_layer_idx
    assert not compose_train([f"optim={optim}", "model=gpt2_tiny"]).model.scale_attn_by_inverse_layer_idx


@pytest.mark.parametrize("size, lr", [("small", 6e-4), ("medium", 4e-4), ("large", 3e-4)])
def test_levanter_sophia_h_settings(size, lr):
    """levanter's published Sophia-H values per size, in a run directory apart from the proposed settings'."""
    cfg = compose_train(["optim=sophia_h_levanter", f"model=gpt2_{size}"])
    o = cfg.optim
    assert (o.name, o.lr, list(o.betas), o.rho, o.eps, o.weight_decay, o.probe, o.hessian_interval) == (
        "sophia_h", lr, [0.96, 0.99], 0.01, 1e-12, 0.1, "gaussian", 10)
    assert cfg.schedule.min_lr == pytest.approx(0.1 * lr, rel=1e-12)
    proposed = compose_train(["optim=sophia_h", f"model=gpt2_{size}"])
    assert cfg.out_dir != proposed.out_dir and proposed.optim.probe == "gaussian"
