"""The configs that choose between the official runs' setup, the paper's text, levanter's and this project's
(docs/fidelity.md).

Wrong if a paper run trains another model than the official one (attention scaled by 1/(layer_idx + 1)), if
the default protocol is not the fair one, if levanter's Sophia-H settings differ from its published ones, or
if the hyper-parameter source switch gives other values than the official configs (default) or the paper's
text (hparams_source=paper).
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


LEVANTER = dict(name="sophia_h", betas=[0.96, 0.99], rho=0.01, eps=1e-12, weight_decay=0.2, probe="gaussian",
                hessian_interval=10, hessian_batch_size=None)


@pytest.mark.parametrize("size, lr", [("small", 6e-4), ("medium", 4e-4), ("large", 3e-4)])
def test_levanter_sophia_h_settings_at_the_paper_sizes(size, lr):
    """levanter's config/optim/sophia-h_<size>.yaml: lr, weight decay 0.2 (not its class default 0.1),
    final lr 0.1 × peak; its SophiaHConfig's betas, γ, ε and interval; no gradient-norm clip (levanter chains
    clip_by_global_norm for its AdamW-type optimizers only); a run directory apart from the proposed
    settings' (both have optim.name sophia_h)."""
    cfg = compose_train(["optim=sophia_h_levanter", f"model=gpt2_{size}"])
    assert {key: cfg.optim[key] for key in LEVANTER} == LEVANTER and cfg.optim.lr == lr
    assert cfg.train.grad_clip == 0
    assert cfg.schedule.min_lr == pytest.approx(0.1 * lr, rel=1e-12) and cfg.schedule.warmup_steps == 2000
    proposed = compose_train(["optim=sophia_h", f"model=gpt2_{size}"])
    assert cfg.out_dir == f"runs/openwebtext/gpt2_{size}-sophia_h_levanter-seed1337" != proposed.out_dir
    assert proposed.train.grad_clip == 1.0 and proposed.optim.weight_decay == 0.2


def test_levanter_sophia_h_settings_in_the_quick_start():
    """The quick start (gpt2_tiny, no levanter lr of its own) gets levanter's optimizer values and no clip
    as well: wrong if they came from the per-size files only."""
    cfg = compose_train(["experiment=quickstart", "optim=sophia_h_levanter"])
    assert {key: cfg.optim[key] for key in LEVANTER} == LEVANTER and cfg.train.grad_clip == 0
    assert compose_train(["experiment=quickstart", "optim=sophia_h"]).train.grad_clip == 1.0


# The official configs (Liuhong99/Sophia config/train_gpt2_<size>_<optimizer>.py): (lr, min_lr); Sophia's
# β1 0.965 and the class's ε 1e-15. The paper's text (its experiment setup): final lr 0.05 × peak, Sophia
# β1 0.96, ε 1e-12.
OFFICIAL = {("gpt2_small", "adamw"): (6e-4, 3e-5), ("gpt2_medium", "adamw"): (3e-4, 6e-5),
            ("gpt2_large", "adamw"): (2e-4, 1e-5), ("gpt2_small", "sophia_g"): (6e-4, 1.5e-5),
            ("gpt2_medium", "sophia_g"): (7e-4, 1e-5), ("gpt2_large", "sophia_g"): (3e-4, 1e-5)}


@pytest.mark.parametrize("model, optim", sorted(OFFICIAL))
def test_the_default_source_is_the_official_configs(model, optim):
    """`optim=<o> model=<m>` with no other flag gives the official configs' values, and so does
    hparams_source=official: wrong if the switch's default moved a single value."""
    lr, min_lr = OFFICIAL[model, optim]
    for extra in ([], ["hparams_source=official"]):
        cfg = compose_train([f"optim={optim}", f"model={model}", *extra])
        assert (cfg.optim.lr, cfg.schedule.min_lr, cfg.train.global_batch_size) == (lr, min_lr, 480)
        if optim == "sophia_g":
            assert list(cfg.optim.betas) == [0.965, 0.99] and "eps" not in cfg.optim  # SophiaG's 1e-15
    assert compose_train([f"optim={optim}", f"model={model}"]) == compose_train(
        [f"optim={optim}", f"model={model}", "hparams_source=official"])


@pytest.mark.parametrize("model, optim", sorted(OFFICIAL))
def test_the_papers_text_on_request(model, optim):
    """hparams_source=paper: final lr 0.05 × peak, Sophia β1 0.96 and ε 1e-12; the peak lr, β2, ρ, weight
    decay, warm-up and batch stay. The final lr follows a peak lr given on the command line."""
    lr, _ = OFFICIAL[model, optim]
    official = compose_train([f"optim={optim}", f"model={model}"])
    cfg = compose_train([f"optim={optim}", f"model={model}", "hparams_source=paper"])
    assert cfg.optim.lr == lr and cfg.schedule.min_lr == pytest.approx(0.05 * lr, rel=1e-12)
    if optim == "sophia_g":
        assert list(cfg.optim.betas) == [0.96, 0.99] and cfg.optim.eps == 1e-12
    unchanged = {key: official.optim[key] for key in official.optim if key not in ("betas", "eps")}
    assert {key: cfg.optim[key] for key in unchanged} == unchanged
    assert (cfg.train, cfg.model, cfg.schedule.warmup_steps) == (official.train, official.model, 2000)
    raised = compose_train([f"optim={optim}", f"model={model}", "hparams_source=paper", "optim.lr=1e-3"])
    assert raised.schedule.min_lr == 5e-5


@pytest.mark.parametrize("optim", ["sophia_h", "lion"])
def test_the_papers_text_for_its_other_optimizers(optim):
    """Sophia-H takes the paper's Sophia values as Sophia-G does; Lion's final lr is 0.05 × peak either way
    (its proposed values follow the paper's ratio); an optimizer the paper did not run is left alone."""
    cfg = compose_train([f"optim={optim}", "model=gpt2_medium", "hparams_source=paper"])
    assert cfg.schedule.min_lr == pytest.approx(0.05 * cfg.optim.lr, rel=1e-12)
    if optim == "sophia_h":
        assert list(cfg.optim.betas) == [0.96, 0.99] and cfg.optim.eps == 1e-12
    assert compose_train(["optim=muon", "model=gpt2_medium", "hparams_source=paper"]) == compose_train(
        ["optim=muon", "model=gpt2_medium"])
