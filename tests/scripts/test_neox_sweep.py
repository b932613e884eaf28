"""The paper's GPT NeoX figure (configs/experiment/paper/neox_pile.yaml) launches exactly its runs.

`python train.py -m experiment=paper/neox_pile` runs through train.py's own entry function with the training
replaced by a recorder, as tests/scripts/test_paper_configs.py does for the GPT-2 figures. If these fail, the
figure would train another model, batch, length or optimizer setting than the paper's, or two runs would
share a directory.
"""

from __future__ import annotations

import pytest

from tests.scripts.test_paper_configs import by_dir, multirun

# (model, optimizer) -> (lr, min_lr, weight decay, steps, context): the sources are in the hparams files
PAPER = {("neox_1_5b_levanter", "adamw"): (1.2e-4, 6e-6, 0.1, 200_000, 1024),
         ("neox_1_5b_levanter", "sophia_g"): (2.5e-4, 5e-6, 0.15, 200_000, 1024),
         ("neox_6_6b_levanter", "adamw"): (1.2e-4, 6e-6, 0.1, 100_000, 2048),
         ("neox_6_6b_levanter", "sophia_g"): (2.5e-4, 5e-6, 0.15, 100_000, 2048)}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> list[dict]:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("neox_sweep"))
        return multirun("experiment=paper/neox_pile")


def test_the_sweep_holds_the_papers_four_runs(jobs):
    """Wrong if a run is missing or extra, two share a directory, or any value differs from the paper's
    (levanter's GPT-2 model with GPT-NeoX's tokenizer on the Pile, 2048 sequences a step)."""
    assert len(by_dir(jobs)) == len(jobs) == len(PAPER)
    for job in jobs:
        model, optim, train = job["model"], job["optim"], job["train"]
        lr, min_lr, decay, steps, context = PAPER[model["name"], optim["name"]]
        assert (optim["lr"], job["schedule"]["min_lr"], optim["weight_decay"]) == (lr, min_lr, decay)
        assert (train["max_steps"], model["block_size"], train["global_batch_size"]) == (steps, context, 2048)
        assert job["data"]["name"] == "pile" and job["schedule"]["warmup_steps"] == 2000
        assert model["positions"] == "learned" and model["scale_attn_by_inverse_layer_idx"] and model["bias"]
        assert job["out_dir"] == f"runs/paper/{model['name']}-{optim['name']}-{steps}steps-seed1337"
        if optim["name"] == "sophia_g":
            assert optim["betas"] == [0.965, 0.99] and optim["hessian_interval"] == 10


def test_the_same_figure_on_neox_s_own_architecture(tmp_path, monkeypatch):
    """`model=neox_1_5b,neox_6_6b` gives the same runs on GPT-NeoX's architecture, with the same values."""
    monkeypatch.chdir(tmp_path)
    jobs = multirun("experiment=paper/neox_pile", "model=neox_1_5b,neox_6_6b")
    assert len(jobs) == 4
    for job in jobs:
        model, optim = job["model"], job["optim"]
        lr, min_lr, _, steps, _ = PAPER[f"{model['name']}_levanter", optim["name"]]
        assert (optim["lr"], job["schedule"]["min_lr"], job["train"]["max_steps"]) == (lr, min_lr, steps)
        assert (model["positions"], model["block"], model["tie_embeddings"]) == ("rotary", "parallel", False)
