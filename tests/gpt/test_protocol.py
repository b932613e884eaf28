"""The `protocol` switch: each difference `protocol=official` makes, pinned against a fair run of the same
tiny model, and the switch recorded like every other experiment-defining key.

Gradients are captured at AdamW's step (after clipping, what the optimizer really uses) by wrapping
`torch.optim.AdamW.step`; 2 micro-steps of 4 sequences make a global batch of 8.
"""

import math
import re
from types import SimpleNamespace

import pytest
import torch
import yaml

from common.errors import UserError
from data.loader import BatchLayout, BatchLoader, TokenData
from gpt.checkpoint import CheckpointDir, read_manifest
from gpt.model import GPT
from gpt.run_identity import identity_differences
from gpt.settings import load_settings
from gpt.trainer import Trainer, train
from tests.hydra_compose import compose_train, losses, read_records, tiny_run, train_resumed


@pytest.fixture
def adamw_gradients(monkeypatch):
    """The flat gradient AdamW receives at each of its steps, in order."""
    seen: list[torch.Tensor] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(torch.cat([p.grad.reshape(-1).clone() for g in self.param_groups for p in g["params"]]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def first_step_gradient(tmp_path, byte_data, seen, name, *extra):
    seen.clear()
    if "protocol=official" in extra:
        extra = (*extra, "protocol.eval_batches=2")  # the gradient is the point, not the 200-batch estimate
    train(compose_train(tiny_run(tmp_path / name, byte_data, "train.max_steps=1", *extra)))
    return seen[0]


def test_official_adamw_clips_the_sum_of_the_micro_step_gradients(tmp_path, byte_data, adamw_gradients):
    """With 2 micro-steps, the official protocol's AdamW gradient is exactly the sum of the micro-step
    gradients (2× the fair mean, bit for bit: halving is exact in floating point), and the clip at c acts on
    that sum, i.e. at c/2 on the mean gradient's scale. Wrong if the losses are averaged under the official
    protocol, summed under the fair one, or clipped before they are summed."""
    mean = first_step_gradient(tmp_path, byte_data, adamw_gradients, "fair", "train.grad_clip=0")
    summed = first_step_gradient(tmp_path, byte_data, adamw_gradients, "official", "train.grad_clip=0",
                                 "protocol=official")
    assert torch.equal(summed, 2 * mean)
    norm = mean.norm().item()
    threshold = 1.5 * norm  # above the mean gradient's norm, below the sum's
    fair = first_step_gradient(tmp_path, byte_data, adamw_gradients, "fair_clip",
                               f"train.grad_clip={threshold}")
    official = first_step_gradient(tmp_path, byte_data, adamw_gradients, "official_clip",
                                   f"train.grad_clip={threshold}", "protocol=official")
    assert torch.equal(fair, mean)  # not clipped
    assert official.norm().item() == pytest.approx(threshold, rel=1e-5)  # clipped from 2·norm to c
    torch.testing.assert_close(official, summed * threshold / (2 * norm), rtol=1e-5, atol=1e-9)
    records = {name: read_records(tmp_path / name)[1] for name in ("fair_clip", "official_clip")}
    assert records["official_clip"]["grad_norm"] == pytest.approx(2 * norm, rel=1e-5)
    assert not records["fair_clip"]["clipped"] and records["official_clip"]["clipped"]
    # without accumulation there is nothing to sum: the official gradient is the fair one
    one = first_step_gradient(tmp_path, byte_data, adamw_gradients, "one", "train.micro_batch_size=8",
                              "train.grad_clip=0", "protocol=official")
    torch.testing.assert_close(one, mean, rtol=1e-5, atol=1e-8)


def test_official_protocol_leaves_sophia_g_accumulation_unchanged(tmp_path, byte_data):
    """The official Sophia-G script averages its micro-steps like the fair protocol: with the warm-up form
    and the extra step set back to the fair ones, the official protocol trains Sophia-G (curvature passes
    included) bit for bit like the fair one. Wrong if the summing reaches optimizers it does not name."""
    extra = ["optim=sophia_g", "optim.hessian_interval=2", "train.max_steps=4"]
    train(compose_train(tiny_run(tmp_path / "fair", byte_data, *extra)))
    train(compose_train(tiny_run(tmp_path / "official", byte_data, *extra, "protocol=official",
                                 "protocol.warmup_from_zero=false", "protocol.extra_final_step=false",
                                 "protocol.eval_batches=2")))
    assert losses(tmp_path / "fair") == losses(tmp_path / "official")
    grad_norms = {name: [r["grad_norm"] for r in read_records(tmp_path / name)[1:]]
                  for name in ("fair", "official")}
    assert grad_norms["fair"] == grad_norms["official"]


def test_official_warmup_and_iteration_count(tmp_path, byte_data):
    """protocol=official with max_steps 4 trains 5 steps (the official loop's iterations 0..max_iters) whose
    learning rates are lr·s/W during the warm-up (0 at step 0) and the cosine over the 4 steps after it, the
    last at min_lr; config.yaml records the 5 steps trained and the 4-step schedule."""
    out = tmp_path / "official"
    train(compose_train(tiny_run(out, byte_data, "train.max_steps=4", "schedule.warmup_steps=2",
                                 "protocol=official")))
    records = [r for r in read_records(out) if "lr" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    config = yaml.safe_load((out / "config.yaml").read_text())
    lr, min_lr = config["optim"]["lr"], config["schedule"]["min_lr"]
    expected = [0.0, lr / 2, lr, min_lr + 0.5 * (1 + math.cos(math.pi / 2)) * (lr - min_lr), min_lr]
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert config["train"]["max_steps"] == 5 and config["schedule"]["decay_steps"] == 4
    assert config["protocol"] == {"name": "official", "summed_accumulation": ["adamw"],
                                  "warmup_from_zero": True, "extra_final_step": True, "eval_batches": 200,
                                  "summed_micro_steps": 2}


def test_resume_with_another_protocol_is_refused(tmp_path, byte_data):
    """The protocol is recorded in config.yaml and in every checkpoint, and a resume under the other one is
    refused like a change of optimizer: it would continue a run with different gradients."""
    out = tmp_path / "run"
    train(compose_train(tiny_run(out, byte_data, "train.max_steps=2", "train.ckpt_interval=2")))
    manifest = read_manifest(CheckpointDir(out / "checkpoints").resume_point())
    assert manifest["config"]["protocol"]["name"] == "fair"
    with pytest.raises(UserError, match=re.escape("protocol.name: 'fair' -> 'official'")):
        train(compose_train(tiny_run(out, byte_data, "train.max_steps=2", "protocol=official")))


def test_official_adamw_resumed_with_another_accumulation_is_refused(tmp_path, byte_data):
    """Under the official protocol AdamW's clip threshold on the mean gradient is grad_clip / micro-steps, so
    the micro-steps summed are recorded and a resume with another micro-batch is refused. Under the fair
    protocol the micro-batch is a hardware setting and may change."""
    official = tmp_path / "official"
    train(compose_train(tiny_run(official, byte_data, "train.max_steps=2", "train.ckpt_interval=2",
                                 "protocol=official", "protocol.extra_final_step=false")))
    with pytest.raises(UserError, match=re.escape("protocol.summed_micro_steps: 2 -> 1")):
        train(compose_train(tiny_run(official, byte_data, "train.max_steps=4", "train.micro_batch_size=8",
                                     "protocol=official", "protocol.extra_final_step=false",
                                     "schedule.decay_steps=2")))
    fair = tmp_path / "fair"
    train(compose_train(tiny_run(fair, byte_data, "train.max_steps=2", "train.ckpt_interval=2")))
    record = train_resumed(tiny_run(fair, byte_data, "train.max_steps=4", "train.micro_batch_size=8",
                                    "schedule.decay_steps=2"), from_step=2)
    assert record["step"] == 4


def test_a_run_older_than_the_new_keys_resumes_as_their_defaults():
    """A config.yaml written before `protocol` and `model.scale_attn_by_inverse_layer_idx` existed was
    trained with their defaults (the fair protocol, plain attention): resuming it under those is no change,
    resuming it with the official model or protocol is."""
    old = {"model": {"n_layer": 2}, "optim": {"name": "adamw"}}
    new = {"model": {"n_layer": 2, "scale_attn_by_inverse_layer_idx": False}, "optim": {"name": "adamw"},
           "protocol": {"name": "fair", "summed_accumulation": [], "warmup_from_zero": False,
                        "extra_final_step": False, "summed_micro_steps": 0}}
    assert identity_differences(old, new) == []
    official = {**new, "model": {"n_layer": 2, "scale_attn_by_inverse_layer_idx": True},
                "protocol": {**new["protocol"], "name": "official"}}
    assert identity_differences(old, official) == [
        "model.scale_attn_by_inverse_layer_idx: False -> True", "protocol.name: 'fair' -> 'official'"]


def test_plan_shows_the_protocol_and_the_implied_clip_threshold(tmp_path, capsys):
    """The plan names the protocol and, for the official AdamW, the clip threshold on the mean gradient; its
    evaluation line counts 200 micro-batches of 96 under the official protocol, the fixed set under the
    fair one."""
    common = ["model=gpt2_small", "train.dry_run=true", f"out_dir={tmp_path}",
              f"data.dir={tmp_path / 'absent'}", "train.device=cpu", "train.micro_batch_size=96"]
    train(compose_train([*common, "optim=adamw", "protocol=official"]))
    official = capsys.readouterr().out
    assert ("protocol: official (adamw's 5 micro-step losses summed, so the clip at 1 is 0.2 on the mean "
            "gradient; warm-up lr·s/W from 0; one extra final step at min_lr; validation on 200 "
            "micro-batches of fresh random windows)") in official
    assert "evaluation: 102 × 19,200 validation sequences (200 micro-batches of fresh windows)" in official
    train(compose_train([*common, "optim=sophia_g", "protocol=official"]))
    sophia_g = ("protocol: official (warm-up lr·s/W from 0; one extra final step at min_lr; validation on "
                "200 micro-batches of fresh random windows)")
    assert sophia_g in capsys.readouterr().out
    train(compose_train([*common, "optim=adamw"]))
    fair = capsys.readouterr().out
    assert "  protocol: fair\n" in fair
    assert "evaluation: 101 × 2,400 validation sequences (a fixed set)" in fair



@pytest.fixture
def validation_draws(monkeypatch):
    """The validation micro-batches handed out: ("sampled", step, index, x, y) or ("fixed", x, y)."""
    seen: list[tuple] = []
    sampled, fixed = BatchLoader.sampled_val_batch, BatchLoader.val_batch

    def sampled_val_batch(self, step, index, batches):
        x, y = sampled(self, step, index, batches)
        seen.append(("sampled", step, index, x, y))
        return x, y

    def val_batch(self, first, count):
        x, y = fixed(self, first, count)
        seen.append(("fixed", x, y))
        return x, y

    monkeypatch.setattr(BatchLoader, "sampled_val_batch", sampled_val_batch)
    monkeypatch.setattr(BatchLoader, "val_batch", val_batch)
    return seen


def sampled_by_step(draws: list[tuple]) -> dict[int, list[tuple]]:
    """The official estimate's (index, x, y) per evaluated step, in batch order."""
    by_step: dict[int, list[tuple]] = {}
    for _, step, index, x, y in (draw for draw in draws if draw[0] == "sampled"):
        by_step.setdefault(step, []).append((index, x, y))
    return {step: sorted(batches, key=lambda batch: batch[0]) for step, batches in by_step.items()}


def test_official_evaluation_is_200_micro_batches_of_fresh_windows(tmp_path, byte_data, validation_draws):
    """protocol=official evaluates as the official `estimate_loss`: eval_iters = 200 micro-batches of
    train.micro_batch_size = 4 fresh windows (800 sequences; train.eval_sequences unused), new windows at
    every evaluation, the loss the mean of the 200 batch means. The step-0 loss is recomputed here from the
    initial model (the trainer's seed) on the batches the loader handed out. Wrong if the official protocol
    evaluates the fixed set, another number of batches or sequences, the same windows twice, or weights
    the batches unequally."""
    out = tmp_path / "official"
    overrides = tiny_run(out, byte_data, "train.max_steps=1", "protocol=official")
    train(compose_train(overrides))
    assert not [draw for draw in validation_draws if draw[0] == "fixed"]
    by_step = sampled_by_step(validation_draws)
    assert sorted(by_step) == [0, 2]  # step 0 and the official run's last step (max_iters + 1 = 2 steps)
    for batches in by_step.values():
        assert [index for index, _, _ in batches] == list(range(200))
        assert [len(x) for _, x, _ in batches] == [4] * 200
    windows = {step: torch.cat([x for _, x, _ in batches]) for step, batches in by_step.items()}
    assert (windows[0] != windows[2]).any(dim=1).float().mean() > 0.9
    settings, _ = load_settings(compose_train(overrides))
    torch.manual_seed(settings.train.seed)  # the trainer's initialisation
    model = GPT(settings.model).eval()
    with torch.no_grad():
        expected = torch.stack([model(x, y)[1] for _, x, y in by_step[0]]).mean().item()
    record = read_records(out)[0]
    assert record["step"] == 0 and record["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_official_evaluation_is_repeated_by_a_resume(tmp_path, byte_data, validation_draws):
    """A run resumed at step 4 evaluates step 8 on the windows the straight run drew there, so its val_loss
    is bit-identical (10 batches per evaluation here, to save time). Wrong if the windows come from
    generator state that a resume loses or resets."""
    extra = ["protocol=official", "protocol.extra_final_step=false", "schedule.decay_steps=8",
             "protocol.eval_batches=10"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose_train(tiny_run(straight, byte_data, *extra)))
    straight_windows = {step: torch.cat([x for _, x, _ in batches])
                        for step, batches in sampled_by_step(validation_draws).items()}
    validation_draws.clear()
    train(compose_train(tiny_run(resumed, byte_data, *extra, "train.max_steps=4")))
    train_resumed(tiny_run(resumed, byte_data, *extra), from_step=4)
    resumed_windows = {step: torch.cat([x for _, x, _ in batches])
                       for step, batches in sampled_by_step(validation_draws).items()}
    assert sorted(straight_windows) == sorted(resumed_windows) == [0, 4, 8]
    for step, windows in straight_windows.items():
        assert torch.equal(windows, resumed_windows[step]), step
    val_losses = [{r["step"]: r["val_loss"] for r in read_records(run) if "val_loss" in r}
                  for run in (straight, resumed)]
    assert val_losses[0] == val_losses[1] and sorted(val_losses[0]) == [0, 4, 8]


def test_fair_evaluation_is_the_fixed_set(tmp_path, byte_data, validation_draws):
    """protocol=fair (the default) evaluates the fixed set of train.eval_sequences = 8 windows at every
    evaluation, the same windows each time, and draws no fresh ones. Wrong if the official estimate leaks
    into the fair protocol. (Its values were also checked bit-identical to the code before the official
    estimate existed on a tiny AdamW and Sophia-G run.)"""
    train(compose_train(tiny_run(tmp_path / "fair", byte_data, "train.max_steps=4")))
    assert all(draw[0] == "fixed" for draw in validation_draws)
    evaluations = [torch.cat([draw[1] for draw in validation_draws[i:i + 2]]) for i in (0, 2)]
    assert len(validation_draws) == 4 and all(len(draw[1]) == 4 for draw in validation_draws)
    assert torch.equal(evaluations[0], evaluations[1])


def test_official_estimate_is_the_mean_over_all_ranks_batches(byte_data):
    """Under DDP the 200 micro-batches are shared over the ranks and the trainer all-reduces each rank's
    (Σ weight·loss, Σ weight): that sum over ranks must be the mean of the 200 batch means, whatever the
    world size, with a loss here standing in for the model's (the mean token id of the batch). Wrong if a
    rank's padding batch is counted, a batch is lost, or the batches are weighted unequally."""
    data = TokenData(byte_data)
    settings = SimpleNamespace(protocol=SimpleNamespace(eval_batches=200))

    def mean_over_ranks(world_size: int) -> float:
        total, weights = 0.0, 0.0
        for rank in range(world_size):
            plan = BatchLayout(8 * world_size, 4, 32, world_size)
            trainer = SimpleNamespace(loader=BatchLoader(data, plan, rank=rank, seed=3), settings=settings,
                                      plan=plan, state=SimpleNamespace(step=6))
            for batch, weight in Trainer._validation_batches(trainer):
                total += weight * batch()[0].double().mean().item()
                weights += weight
        return total / weights

    one = BatchLoader(data, BatchLayout(8, 4, 32), seed=3)
    expected = sum(one.sampled_val_batch(6, i, 200)[0].double().mean().item() for i in range(200)) / 200
    for world_size in (1, 2, 3, 8):
        assert mean_over_ranks(world_size) == pytest.approx(expected, rel=1e-12), world_size
