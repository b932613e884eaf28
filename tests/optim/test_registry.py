"""build_optimizer and trainer_settings: names, key validation, injected values, the one weight-decay rule."""

import re
import sys

import pytest
import torch
from omegaconf import OmegaConf

from common.errors import UserError
from optim import (
    OPTIMIZERS,
    AdamMini,
    SophiaG,
    TrainerSettings,
    build_optimizer,
    check_run,
    param_groups,
    registry,
    trainer_settings,
)
from optim.registry import optional_class
from tests.tiny_model import tiny_gpt


def test_unknown_optimizer_lists_the_valid_names():
    with pytest.raises(UserError, match="valid: adamw, lion, sophia_g, sophia_h, ") as refused:
        build_optimizer({"name": "sophia"}, tiny_gpt(), 16)
    for name in ("sgd_sai", "adam_mini", "adahessian", "muon", "adamw_schedulefree", "soap"):
        assert name in str(refused.value)


def test_a_misspelt_key_fails_naming_it_and_the_accepted_ones():
    with pytest.raises(UserError, match=r"optim\.weight_dacay is not a sophia_g setting; accepted: lr, "
                                        r"betas, rho, weight_decay, eps, fused"):
        build_optimizer({"name": "sophia_g", "weight_dacay": 0.2, "hessian_interval": 10}, tiny_gpt(), 16)


def test_bs_is_injected_and_never_configured():
    # Wrong here: bs hand-computed or hard-coded independently of the real batch (the official script's
    # total_bs = 480, docs/fidelity.md).
    optimizer = build_optimizer({"name": "sophia_g", "hessian_interval": 10}, tiny_gpt(), 491_520)
    assert isinstance(optimizer, SophiaG)
    assert all(group["bs"] == 491_520 for group in optimizer.param_groups)
    with pytest.raises(UserError, match=r"optim\.bs must not be set: it is computed"):
        build_optimizer({"name": "sophia_g", "hessian_interval": 10, "bs": 480}, tiny_gpt(), 491_520)


def test_bs_counts_the_curvature_pass_predictions():
    """With optim.hessian_batch_size = H sequences, the GNB gradient is a mean over H × block_size
    predictions, so bs is that, not the training batch's tokens: otherwise the effective ρ would silently be
    ρ × global batch / H."""
    cfg = {"name": "sophia_g", "hessian_interval": 10, "hessian_batch_size": 3}
    optimizer = build_optimizer(cfg, tiny_gpt(), 491_520)
    assert all(group["bs"] == 3 * 4 for group in optimizer.param_groups)  # block_size 4


@pytest.mark.parametrize("name, cfg, probe", [("sophia_h", {}, "gaussian"),
                                               ("sophia_h", {"probe": "rademacher"}, "rademacher"),
                                               ("adahessian", {}, "rademacher")])
def test_hutchinson_probe_per_optimizer(name, cfg, probe):
    """Sophia-H draws the paper's Gaussian probe unless optim.probe asks for Rademacher; AdaHessian keeps its
    own paper's Rademacher probe."""
    optimizer = build_optimizer({"name": name, "hessian_interval": 1, **cfg}, tiny_gpt(), 16)
    assert optimizer.probe == probe


def test_bad_probe_settings_are_user_errors():
    """An unknown probe, or a probe for AdaHessian (which keeps its paper's Rademacher), is one clear line."""
    with pytest.raises(UserError, match="probe must be one of gaussian, rademacher, got 'uniform'"):
        build_optimizer({"name": "sophia_h", "hessian_interval": 1, "probe": "uniform"}, tiny_gpt(), 16)
    with pytest.raises(UserError, match=r"optim\.probe is not a adahessian setting"):
        build_optimizer({"name": "adahessian", "hessian_interval": 1, "probe": "gaussian"}, tiny_gpt(), 16)


def test_adam_mini_gets_n_head_from_the_model():
    optimizer = build_optimizer({"name": "adam_mini"}, tiny_gpt(), 16)
    assert isinstance(optimizer, AdamMini) and optimizer.n_head == 2
    with pytest.raises(UserError, match="n_head must not be set"):
        build_optimizer({"name": "adam_mini", "n_head": 4}, tiny_gpt(), 16)


def test_adamw_uses_the_fused_kernel_on_cpu():
    optimizer = build_optimizer({"name": "adamw", "lr": 6e-4}, tiny_gpt(), 16)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["fused"] for group in optimizer.param_groups)
    with pytest.raises(UserError, match=r"optim\.fused must not be set"):
        build_optimizer({"name": "adamw", "fused": False}, tiny_gpt(), 16)


def test_hydra_config_values_are_accepted_and_hyper_parameters_land_in_the_groups():
    cfg = OmegaConf.create({"name": "lion", "lr": 1e-4, "betas": [0.95, 0.98], "weight_decay": 0.6})
    optimizer = build_optimizer(cfg, tiny_gpt(), 16)
    decay, no_decay = optimizer.param_groups
    assert decay["betas"] == (0.95, 0.98) and decay["lr"] == 1e-4
    assert decay["weight_decay"] == 0.6 and no_decay["weight_decay"] == 0.0


def test_out_of_range_values_are_user_errors():
    with pytest.raises(UserError, match=r"optim=sophia_g: betas must be two values in \[0, 1\)"):
        build_optimizer({"name": "sophia_g", "betas": [0.965, 1.5], "hessian_interval": 10}, tiny_gpt(), 16)


@pytest.mark.parametrize("bias", [False, True])
def test_weight_decay_rule_is_the_official_sophia_codes(bias):
    # Only nn.Linear weights decay; wte (tied to lm_head), wpe, LayerNorm weights and biases do not.
    groups = param_groups(tiny_gpt(bias=bias), weight_decay=0.2)
    decayed = {name for name, _ in groups[0]["params"]}
    not_decayed = {name for name, _ in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    assert decayed == {f"transformer.h.{i}.{part}.weight" for i in range(2)
                       for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    expected_rest = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} | {
        f"transformer.h.{i}.{ln}.weight" for i in range(2) for ln in ("ln_1", "ln_2")}
    if bias:
        expected_rest |= {"transformer.ln_f.bias"} | {
            f"transformer.h.{i}.{part}.bias" for i in range(2)
            for part in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert not_decayed == expected_rest


def test_every_optimizer_uses_the_same_grouping():
    model = tiny_gpt()
    reference = [[name for name, _ in group["params"]] for group in param_groups(model, 0.1)]
    configs = [{"name": "adamw"}, {"name": "sgd_sai", "lr": 0.1},
               {"name": "adahessian", "hessian_interval": 1}, {"name": "soap"}]
    for cfg in configs:
        optimizer = build_optimizer(cfg, model, 16)
        assert [group["param_names"] for group in optimizer.param_groups] == reference


def test_trainer_settings():
    assert trainer_settings({"name": "sophia_g", "hessian_interval": 10}) == TrainerSettings(10, None, True)
    assert trainer_settings({"name": "sophia_g", "hessian_interval": 10, "hessian_batch_size": 240,
                             "hessian_grad_clip": False}) == (10, 240, False)
    assert trainer_settings({"name": "sophia_h", "hessian_interval": 5}) == (5, None, False)
    assert trainer_settings({"name": "adamw", "lr": 1e-3}) == (None, None, False)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "sophia_g"}, "sophia_g needs optim.hessian_interval"),
        ({"name": "sophia_g", "hessian_interval": 0}, "an integer >= 1"),
        ({"name": "sophia_g", "hessian_interval": 10, "hessian_batch_size": 0}, "hessian_batch_size must be"),
        ({"name": "sophia_g", "hessian_interval": 10, "hessian_grad_clip": 1.0}, "must be true or false"),
        ({"name": "sophia_h", "hessian_interval": 10, "hessian_grad_clip": True}, "GNB curvature only"),
        ({"name": "adamw", "hessian_interval": 10}, "adamw uses no curvature estimate"),
    ],
)
def test_curvature_keys_are_validated_at_build_time(cfg, message):
    with pytest.raises(UserError, match=message):
        build_optimizer(cfg, tiny_gpt(), 16)


@pytest.mark.parametrize(("name", "strategy", "schedule", "message"), [
    ("muon", "fsdp", "cosine", "optim=muon cannot step FSDP shards (Newton-Schulz orthogonalises whole"),
    ("soap", "fsdp", "cosine", "optim=soap cannot step FSDP shards (its rotations multiply whole matrices"),
    ("adamw_schedulefree", "ddp", "cosine", "optim=adamw_schedulefree needs schedule=constant, got "
                                            "schedule=cosine"),
])
def test_the_entry_refuses_what_its_optimizer_cannot_do(name, strategy, schedule, message):
    """Wrong if a whole-matrix optimizer were let loose on FSDP row shards (each rank would orthogonalise
    or rotate its own slice), or schedule-free ran under a decaying schedule it replaces."""
    with pytest.raises(UserError, match=re.escape(message)):
        check_run({"name": name}, strategy=strategy, schedule=schedule)
    check_run({"name": name}, strategy="ddp", schedule="constant")  # what the message recommends runs


def test_a_missing_optional_package_is_one_line_naming_what_to_install(monkeypatch):
    """Wrong if choosing schedule-free without its package gave an ImportError traceback."""
    monkeypatch.setitem(sys.modules, "schedulefree", None)  # `import schedulefree` now fails
    loader = optional_class("schedulefree", "AdamWScheduleFree", "schedulefree")
    with pytest.raises(UserError, match=re.escape("pip install '.[schedulefree]'")):
        loader()


def test_an_optimizer_outside_the_package_is_found_through_optim_module(tmp_path, monkeypatch):
    """`optim.module` imports the module that registers the name; a module that cannot be imported, or that
    registers another name, is one line."""
    (tmp_path / "outside_optim.py").write_text(
        "import torch\n"
        "from optim.registry import OptimizerEntry, full_size_state, register\n"
        "register(OptimizerEntry('outside_sgd', lambda: torch.optim.SGD, full_size_state(0)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "OPTIMIZERS", dict(OPTIMIZERS))  # the registration ends with the test
    optimizer = build_optimizer({"name": "outside_sgd", "module": "outside_optim", "lr": 0.1}, tiny_gpt(), 16)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(UserError, match=re.escape("optim.module='not_there' cannot be imported")):
        build_optimizer({"name": "x", "module": "not_there"}, tiny_gpt(), 16)
    with pytest.raises(UserError, match="registers no such name"):
        build_optimizer({"name": "other", "module": "outside_optim"}, tiny_gpt(), 16)
