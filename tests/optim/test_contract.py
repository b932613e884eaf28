"""The optimizer contract (docs/optimizers.md) for every registered optimizer: exact resume from a
state_dict, a closure called once, parameters without gradients left alone, and the trainer-facing
attributes."""

import copy
import io
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from optim import OPTIMIZERS, build_optimizer
from tests.hydra_compose import compose_train
from tests.tiny_model import tiny_gpt

ROOT = Path(__file__).resolve().parents[2]


def shipped_config(name: str) -> dict:
    """configs/optim/<name>.yaml, with a curvature estimate every 2 steps where the optimizer has one."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "optim" / f"{name}.yaml"))
    if "hessian_interval" in cfg:
        cfg["hessian_interval"] = 1 if OPTIMIZERS[name].cls.requires_initial_hessian else 2
    return cfg


CONFIGS = {name: shipped_config(name) for name in OPTIMIZERS}
CURVATURE = {"sophia_g": "gnb", "sophia_h": "hutchinson", "adahessian": "hutchinson"}


def params_of(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def one_step(model, optimizer, seed):
    """A deterministic step: a curvature update when the optimizer has one, then a training step."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (2, 4), generator=generator)
    kind = getattr(optimizer, "curvature", None)
    if kind == "gnb":
        optimizer.zero_grad()
        model(x, x)[1].backward()
        optimizer.update_hessian()
    elif kind == "hutchinson":
        optimizer.update_hessian([torch.randn(p.shape, generator=generator) for p in params_of(optimizer)])
    optimizer.zero_grad()
    model(x, x)[1].backward()
    optimizer.step()


def test_every_registered_optimizer_ships_a_config():
    """configs/optim/<name>.yaml for every registered name, and no config naming an unregistered one (a
    variant such as sophia_h_levanter names the optimizer it configures; composed, because a variant may be a
    global-package file that sets other groups' keys too)."""
    configs = {path.stem: compose_train([f"optim={path.stem}"]).optim.name
               for path in (ROOT / "configs" / "optim").glob("*.yaml")}
    assert all(configs.get(name) == name for name in OPTIMIZERS)
    assert set(configs.values()) == set(OPTIMIZERS)


def test_every_registered_optimizer_is_documented():
    """A row of the update-rule table in docs/optimizers.md and a mention in the README's optimizer list:
    wrong if an optimizer were added without telling its users."""
    table = (ROOT / "docs" / "optimizers.md").read_text().split("## Update rules")[1].split("\n## ")[0]
    readme = (ROOT / "README.md").read_text().split("## Optimizers")[1].split("\n## ")[0]
    for name in OPTIMIZERS:
        assert f"| `{name}` |" in table, name
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_round_trip_gives_a_bit_identical_next_step(name):
    # Wrong here: some resume state lives outside self.state (a counter, a frozen scale, an init flag), or
    # does not survive torch.save / torch.load(weights_only=True) as a checkpoint would store it.
    model = tiny_gpt(n_layer=1, bias=True)
    optimizer = build_optimizer(CONFIGS[name], model, tokens_per_step=8)
    for seed in range(3):
        one_step(model, optimizer, seed)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(CONFIGS[name], resumed_model, tokens_per_step=8)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    one_step(model, optimizer, 3)
    one_step(resumed_model, resumed, 3)
    for (n, a), b in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), n
    for a, b in zip(params_of(optimizer), params_of(resumed), strict=True):
        for key, value in optimizer.state[a].items():
            other = resumed.state[b][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


@pytest.mark.parametrize("name", CONFIGS)
def test_closure_is_called_exactly_once_and_its_loss_returned(name):
    model = tiny_gpt(n_layer=1, bias=True)
    optimizer = build_optimizer(CONFIGS[name], model, tokens_per_step=8)
    if getattr(optimizer, "requires_initial_hessian", False):
        optimizer.update_hessian([torch.ones_like(p) for p in params_of(optimizer)])
    x = torch.randint(0, 11, (2, 4))
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        loss = model(x, x)[1]
        loss.backward()
        return loss

    returned = optimizer.step(closure)
    assert len(calls) == 1
    assert returned is not None and returned.grad_fn is not None  # the closure ran with grad enabled


@pytest.mark.parametrize("name", CONFIGS)
def test_parameters_without_gradient_are_skipped(name):
    model = tiny_gpt(n_layer=1, bias=True)
    optimizer = build_optimizer(CONFIGS[name], model, tokens_per_step=8)
    if getattr(optimizer, "requires_initial_hessian", False):
        optimizer.update_hessian([torch.ones_like(p) for p in params_of(optimizer)])
    x = torch.randint(0, 11, (2, 4))
    model(x, x)[1].backward()
    frozen = model.transformer.h[0].mlp.c_fc.weight  # decays under every optimizer: skipped ⇒ unchanged
    frozen.grad = None
    before = frozen.detach().clone()
    optimizer.step()
    assert torch.equal(frozen, before)


@pytest.mark.parametrize("name", CONFIGS)
def test_trainer_facing_attributes(name):
    optimizer = build_optimizer(CONFIGS[name], tiny_gpt(n_layer=1, bias=True), tokens_per_step=8)
    assert getattr(optimizer, "curvature", None) == CURVATURE.get(name)
    assert getattr(optimizer, "requires_initial_hessian", False) == (name == "adahessian")
    is_sophia = name in ("sophia_g", "sophia_h")
    assert hasattr(optimizer, "win_rate") == is_sophia and hasattr(optimizer, "hessian_norm") == is_sophia
    if CURVATURE.get(name):
        assert callable(optimizer.update_hessian)
