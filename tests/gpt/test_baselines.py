"""Training with today's baselines through the trainer: schedule-free's evaluation weights in the validation
loss and across a resume, and an optimizer added from outside the project by one Python file and one YAML."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from data.loader import BatchLayout, BatchLoader, TokenData
from gpt.model import GPT, GPTConfig
from gpt.trainer import train
from optim.registry import OPTIMIZERS
from tests.hydra_compose import compose_train, tiny_run, train_resumed

SCHEDULE_FREE = ["optim=adamw_schedulefree", "schedule=constant", "schedule.warmup_steps=2"]


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def series(out_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(out_dir) if key in r}


def validation_loss(model: GPT, data_dir: Path) -> float:
    """The quick start's validation set (tiny_run: 8 sequences of 32 tokens, as 2 batches of 4), evaluated
    here."""
    loader = BatchLoader(TokenData(data_dir, tokenizer="byte"), BatchLayout(8, 4, block_size=32), seed=1337)
    model.eval()
    with torch.no_grad():
        return sum(model(*loader.val_batch(4 * i, 4))[1].item() for i in range(2)) / 2


def test_schedule_free_validation_loss_is_taken_at_the_evaluation_weights(tmp_path, byte_data):
    """Six steps, then an evaluation and a checkpoint. The checkpoint was saved in the package's eval mode
    (its groups' train_mode flag), so its weights are x, with z; rebuilt here, x gives the recorded validation
    loss and the training iterate y = x + (1−β1)(z − x) does not. Wrong if the trainer evaluated or saved at
    y."""
    out = tmp_path / "run"
    train(compose_train(tiny_run(out, byte_data, *SCHEDULE_FREE, steps=6, interval=6)))
    state = torch.load(out / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert not any(group["train_mode"] for group in state["optimizer"]["param_groups"]), "saved at y"
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=256))
    model.load_state_dict(state["model"])
    recorded = series(out, "val_loss")[6]
    assert math.isclose(validation_loss(model, byte_data), recorded, rel_tol=1e-6)

    names = [n for group in state["optimizer"]["param_groups"] for n in group["param_names"]]
    ids = [i for group in state["optimizer"]["param_groups"] for i in group["params"]]
    beta1 = state["optimizer"]["param_groups"][0]["betas"][0]
    with torch.no_grad():
        for name, index in zip(names, ids, strict=True):
            param = model.get_parameter(name)
            param.lerp_(state["optimizer"]["state"][index]["z"], 1 - beta1)
    assert abs(validation_loss(model, byte_data) - recorded) > 1e-4


def test_schedule_free_resumed_across_an_evaluation_equals_the_straight_run(tmp_path, byte_data):
    """Evaluations every 2 steps, checkpoints every 4; stopped at 4 and resumed: the evaluations at 6 and 8
    and every training loss are bit-identical to the straight run. Wrong if a checkpoint kept the training
    weights, the resume did not switch back to them, or an evaluation left the model at x."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = [*SCHEDULE_FREE, "train.eval_interval=2"]
    train(compose_train(tiny_run(straight, byte_data, *extra)))
    train(compose_train(tiny_run(resumed, byte_data, *extra, "train.max_steps=4")))
    train_resumed(tiny_run(resumed, byte_data, *extra), from_step=4)
    assert sorted(series(straight, "val_loss")) == [0, 2, 4, 6, 8]
    for key in ("train_loss", "val_loss"):
        assert series(resumed, key) == series(straight, key), key


@pytest.mark.slow  # torch's Newton-Schulz runs bfloat16 matmuls, slow on a busy CPU
def test_muon_resume_keeps_each_part_at_its_own_rate_and_is_exact(tmp_path, byte_data):
    """Muon with its AdamW part at another rate, stopped at step 4 of a cosine and resumed: bit-identical to
    the straight run, and the checkpoint's groups hold the scheduled rates of both parts in the ratio of
    their base rates. Wrong if the resume rebuilt a base rate from a scheduled one, or one rate were written
    into every group."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["optim=muon", "optim.lr=0.02", "optim.adamw_lr=2e-3", "schedule.decay_steps=8",
             "schedule.warmup_steps=2"]
    train(compose_train(tiny_run(straight, byte_data, *extra)))
    train(compose_train(tiny_run(resumed, byte_data, *extra, "train.max_steps=4")))
    train_resumed(tiny_run(resumed, byte_data, *extra), from_step=4)
    assert series(resumed, "train_loss") == series(straight, "train_loss")
    groups = torch.load(resumed / "checkpoints" / "step_00000008" / "state.pt",
                        weights_only=True)["optimizer"]["param_groups"]
    rates = {group["use_muon"]: group["lr"] for group in groups}
    assert math.isclose(rates[False] / rates[True], 2e-3 / 0.02, rel_tol=1e-12)


def test_soap_resumed_across_preconditioner_refreshes_equals_the_straight_run(tmp_path, byte_data):
    """SOAP with its eigenbases refreshed every 3 steps, stopped at step 4 and resumed to 8: every training
    loss bit-identical to the straight run. Wrong if a checkpoint lost the bases, the Kronecker factors or the
    step count that times the next refresh."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["optim=soap", "optim.precondition_frequency=3", "schedule.decay_steps=8",
             "schedule.warmup_steps=2"]
    train(compose_train(tiny_run(straight, byte_data, *extra)))
    train(compose_train(tiny_run(resumed, byte_data, *extra, "train.max_steps=4")))
    train_resumed(tiny_run(resumed, byte_data, *extra), from_step=4)
    assert len(series(straight, "train_loss")) == 8
    assert series(resumed, "train_loss") == series(straight, "train_loss")


TOY_OPTIMIZER = '''"""Sign descent: the toy optimizer of docs/extending.md."""
import torch

from optim.registry import OptimizerEntry, full_size_state, register


class SignDescent(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                    param.add_(param.grad.sign(), alpha=-group["lr"])


register(OptimizerEntry("sign_descent", lambda: SignDescent, full_size_state(0)))
'''
TOY_CONFIG = """name: sign_descent
module: sign_descent     # the Python module that registers it, found on PYTHONPATH
lr: 3e-3
weight_decay: 0.1
"""


@pytest.fixture
def registry_restored():
    """The toy optimizer registers itself in the process-wide registry: take it out again afterwards, so
    the tests that iterate over every registered optimizer see the project's own only."""
    before = dict(OPTIMIZERS)
    yield
    OPTIMIZERS.clear()
    OPTIMIZERS.update(before)
    sys.modules.pop("sign_descent", None)


def test_an_optimizer_from_one_python_file_and_one_yaml_trains_the_quick_start(tmp_path, byte_data,
                                                                              monkeypatch, registry_restored):
    """docs/extending.md's recipe from outside the project: `sign_descent.py` and `optim/sign_descent.yaml`
    in a folder of one's own, nothing else touched; the quick start (shrunk) trains with it and its
    validation loss falls, its plan states no optimizer memory, and its decay follows the project's rule."""
    (tmp_path / "sign_descent.py").write_text(TOY_OPTIMIZER)
    (tmp_path / "configs" / "optim").mkdir(parents=True)
    (tmp_path / "configs" / "optim" / "sign_descent.yaml").write_text(TOY_CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))  # PYTHONPATH, for a user
    out = tmp_path / "run"
    train(compose_train(tiny_run(out, byte_data, f"hydra.searchpath=[file://{tmp_path / 'configs'}]",
                                 "optim=sign_descent", "train.max_steps=40", "train.eval_interval=40",
                                 "schedule.warmup_steps=5")))
    val = series(out, "val_loss")
    assert val[40] < val[0] - 0.3, val
    plan = (out / "plan.txt").read_text()
    assert "with sign_descent" in plan and "optimizer state ≈ 0 B" in plan
    state = torch.load(out / "checkpoints" / "step_00000040" / "state.pt", weights_only=True)
    assert [group["weight_decay"] for group in state["optimizer"]["param_groups"]] == [0.1, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("run", "__pycache__")) == [
        "configs", "sign_descent.py"]
