"""End-to-end training on the tiny model: metrics, checkpoints, and exact resume."""

import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from common.errors import UserError
from gpt.checkpoint import CheckpointDir, read_manifest
from gpt.trainer import train
from optim import OPTIMIZERS
from tests.hydra_compose import compose_train, losses, read_records, tiny_run, train_resumed

TINY_RATES = sorted((Path(__file__).resolve().parents[2] / "configs" / "hparams").glob("gpt2_tiny_*.yaml"))






def test_run_directory_contract(tmp_path, byte_data):
    """Wrong if a contracted file or metrics key is missing, or accumulation changes the tokens counted."""
    out = tmp_path / "run"
    train(compose_train(tiny_run(out, byte_data)))
    assert (out / "config.yaml").exists() and (out / "train.log").exists()
    records = read_records(out)
    assert records[0]["step"] == 0 and "val_loss" in records[0]
    step_records = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in step_records] == list(range(1, 9))
    for key in ("step", "tokens", "train_loss", "lr", "grad_norm", "clipped", "tokens_per_sec", "mfu",
                "elapsed_s"):
        assert key in step_records[0], key
    assert step_records[-1]["tokens"] == 8 * 8 * 32
    assert "val_loss" in step_records[3] and "val_loss" in step_records[7]
    assert CheckpointDir(out / "checkpoints").complete_steps() == [8, 4]
    state = torch.load(out / "checkpoints" / "step_00000008" / "state.pt", weights_only=True)
    assert set(state) == {"model", "optimizer", "scaler"}
    assert read_manifest(out / "checkpoints" / "step_00000008")["step"] == 8


@pytest.mark.parametrize("model", [[], ["model.scale_attn_by_inverse_layer_idx=true"]],
                         ids=["plain", "official"])
def test_resume_is_exact(tmp_path, byte_data, model):
    """N steps straight and N/2 + restart: bit-identical losses (data order and RNG are pure functions), with
    plain attention and with the official runs' per-layer attention scaling."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # the schedule's length apart from the budget
    extra = ["model.dropout=0.1", "schedule.decay_steps=8", *model]
    train(compose_train(tiny_run(straight, byte_data, *extra)))
    train(compose_train(tiny_run(resumed, byte_data, *extra, "train.max_steps=4")))
    train_resumed(tiny_run(resumed, byte_data, *extra), from_step=4)
    assert losses(straight) == losses(resumed)
    steps = [r["step"] for r in read_records(resumed)]
    assert steps == sorted(set(steps)), "metrics.jsonl has duplicated records after the resume"


def test_sophia_resume_across_a_hessian_step_is_exact(tmp_path, byte_data):
    """Resume at step 4 with a curvature pass due at step 6 (interval 3): identical to the straight run."""
    extra = ["optim=sophia_g", "optim.hessian_interval=3", "optim.hessian_batch_size=4",
             "schedule.decay_steps=8"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(compose_train(tiny_run(straight, byte_data, *extra)))
    train(compose_train(tiny_run(resumed, byte_data, *extra, "train.max_steps=4")))
    train_resumed(tiny_run(resumed, byte_data, *extra), from_step=4)
    assert losses(straight) == losses(resumed)
    records = [r for r in read_records(straight) if "win_rate" in r]
    assert records and all(0.0 <= r["win_rate"] <= 1.0 for r in records)
    assert records[-1]["hessian_time_s"] > 0


def test_accumulation_matches_one_big_batch(tmp_path, byte_data):
    """2 micro-steps of 4 equal 1 micro-step of 8: gradients are averaged, not summed."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(compose_train(tiny_run(a, byte_data, "train.max_steps=3")))
    train(compose_train(tiny_run(b, byte_data, "train.max_steps=3", "train.micro_batch_size=8")))
    for step, loss in losses(a).items():
        assert math.isclose(loss, losses(b)[step], rel_tol=1e-5)


def test_validation_loss_does_not_depend_on_the_micro_batch_size(tmp_path, byte_data):
    """6 validation sequences as micro-batches of 8, of 4 + 2, and of 2 + 2 + 2: the same set, each sequence
    weighted once, so the same val_loss up to summation order. Wrong if the set or the weighting follows the
    micro-batch size (a resume with another micro-batch size would be evaluated on other data)."""
    val_losses = []
    for micro in (8, 4, 2):
        out = tmp_path / f"micro{micro}"
        train(compose_train(tiny_run(out, byte_data, "train.max_steps=2", "train.eval_interval=2",
                                     "train.eval_sequences=6", f"train.micro_batch_size={micro}")))
        val_losses.append({r["step"]: r["val_loss"] for r in read_records(out) if "val_loss" in r})
    for other in val_losses[1:]:
        assert other.keys() == val_losses[0].keys() == {0, 2}
        for step, loss in other.items():
            assert math.isclose(loss, val_losses[0][step], rel_tol=1e-6), (step, loss, val_losses[0][step])


def test_other_experiment_in_out_dir_is_refused(tmp_path, byte_data):
    out = tmp_path / "run"
    train(compose_train(tiny_run(out, byte_data, "train.max_steps=2")))
    with pytest.raises(UserError, match=re.escape("optim.name: 'adamw' -> 'lion'")):
        train(compose_train(tiny_run(out, byte_data, "optim=lion")))


def test_resume_with_another_budget_that_reshapes_the_schedule_is_refused(tmp_path, byte_data):
    """The cosine follows max_steps unless schedule.decay_steps is set: a 2-step run resumed with
    max_steps=4 would continue on another schedule than its steps were trained with. Refused, with the
    setting that trains on at the final learning rate, which is then accepted."""
    out = tmp_path / "run"
    train(compose_train(tiny_run(out, byte_data, "train.max_steps=2", "schedule.warmup_steps=1")))
    with pytest.raises(UserError, match=re.escape("schedule.decay_steps: 2 -> 4")) as refused:
        train(compose_train(tiny_run(out, byte_data, "train.max_steps=4", "schedule.warmup_steps=1")))
    assert "set schedule.decay_steps=2)" in str(refused.value)
    resumed = tiny_run(out, byte_data, "train.max_steps=4", "schedule.warmup_steps=1",
                       "schedule.decay_steps=2")
    record = train_resumed(resumed, from_step=2)
    min_lr = compose_train(resumed).schedule.min_lr
    assert record["step"] == 4 and record["lr"] == min_lr  # held after the original horizon


def test_dry_run_prints_plan_without_data(tmp_path, capsys):
    cfg = compose_train(["optim=sophia_g", "model=gpt2_medium", "train.dry_run=true", f"out_dir={tmp_path}",
                         f"data.dir={tmp_path / 'absent'}", "train.device=cpu"])
    train(cfg)
    out = capsys.readouterr().out
    assert "480 sequences × 1024 tokens = 491,520 tokens/step" in out
    assert "GPU-hours" in out


@pytest.mark.slow
@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_every_optimizer_lowers_the_quickstart_validation_loss(tmp_path, byte_data, optim):
    """Each registered optimizer, with its configured defaults, trains the quick-start model: wrong if an
    update has the wrong sign or scale, or a curvature estimate never reaches it."""
    out = tmp_path / optim
    schedules = OPTIMIZERS[optim].schedules
    extra = [f"schedule={schedules[0]}"] if schedules else []
    train(compose_train(tiny_run(out, byte_data, f"optim={optim}", "train.max_steps=40",
                                 "train.eval_interval=40", "schedule.warmup_steps=5", *extra)))
    val = [r["val_loss"] for r in read_records(out) if "val_loss" in r]
    assert val[-1] < val[0] - 0.3, val


@pytest.mark.parametrize("path", TINY_RATES, ids=[p.stem for p in TINY_RATES])
def test_quickstart_uses_each_optimizers_tuned_rate(path):
    """Wrong if the quick start's model override keeps the specialisation file from applying (the optimizer
    would run at its GPT-2-small paper rate on the tiny model), or a file's final learning rate is not the
    paper's 0.05 × lr (a decaying schedule), or an optimizer that needs its own schedule (schedule-free's
    constant one) does not get it."""
    values = OmegaConf.load(path)
    name = path.stem.removeprefix("gpt2_tiny_")
    cfg = compose_train(["experiment=quickstart", f"optim={name}"])
    assert cfg.optim.lr == values.optim.lr
    if OPTIMIZERS[name].schedules:
        assert cfg.schedule.name in OPTIMIZERS[name].schedules
    else:
        assert cfg.schedule.min_lr == values.schedule.min_lr == pytest.approx(0.05 * values.optim.lr)
