"""Identity by default: every setting that shapes a run's trajectory is fixed for the run's life, only the
documented list may change on resume, and runs written before a key existed still resume."""

import re

import pytest
import yaml

from common.errors import UserError
from gpt.run_identity import MAY_CHANGE_ON_RESUME, flatten, identity_differences
from gpt.settings import load_settings
from gpt.trainer import train
from tests.hydra_compose import compose_train, tiny_run

# Settings that change what is trained, named by the issue or chosen to cover every config group: each must
# be refused on resume. (The reference is this list, not the code's rule.)
TRAJECTORY = {
    "train.grad_clip": "0.5", "train.dtype": "bfloat16", "train.seed": "7", "train.on_nonfinite": "skip",
    "train.max_skipped": "3", "train.global_batch_size": "16", "train.init_from": "gpt2",
    "optim.lr": "0.01", "model.dropout": "0.1", "data.split_seed": "1", "data.text_field": "body",
    "schedule.warmup_steps": "3", "schedule.min_lr": "0.0", "protocol.warmup_from_zero": "true",
}
# Settings the documentation promises may change (docs/training.md): bookkeeping, evaluation, loggers, how
# and where the same arithmetic runs, where the data lives.
MAY_CHANGE = {
    "train.max_steps": "9", "train.log_interval": "3", "train.eval_interval": "2", "train.ckpt_interval": "5",
    "train.keep_checkpoints": "1", "train.async_checkpoint": "true", "train.stop_grace_s": "5",
    "train.eval_sequences": "16", "train.hellaswag_interval": "100", "train.micro_batch_size": "2",
    "train.strategy": "single", "train.compile": "true", "train.activation_checkpointing": "true",
    "data.dir": "elsewhere", "data.num_proc": "1", "wandb.project": "other", "wandb.mode": "offline",
}


def record(*overrides: str) -> dict:
    settings, _ = load_settings(compose_train(["experiment=quickstart", "out_dir=run", "train.device=cpu",
                                               "schedule.decay_steps=8", *overrides]))
    return settings.record()


@pytest.mark.parametrize(("key", "value"), sorted(TRAJECTORY.items()))
def test_a_setting_that_shapes_the_trajectory_is_refused_on_resume(key, value):
    """Wrong if a resume may change it (the issue: train.grad_clip and train.dtype accepted silently)."""
    old, new = record(), record(f"{key}={value}")
    differences = identity_differences(old, new)
    assert [line.split(":")[0] for line in differences] == [key], differences


@pytest.mark.parametrize(("key", "value"), sorted(MAY_CHANGE.items()))
def test_a_documented_bookkeeping_setting_may_change_on_resume(key, value):
    """Wrong if a cadence, a logger, the budget or the batch split refuses a resume."""
    old, new = record(), record(f"{key}={value}")
    assert flatten(old)[key] != flatten(new)[key]
    assert identity_differences(old, new) == []


def test_the_allow_list_names_only_real_keys():
    """Wrong if an entry is misspelt: it would allow nothing, and its key would silently stay fixed."""
    keys = set(flatten(record())) | set(flatten(record("data=openwebtext", "data.tokenizer=byte")))
    for entry in MAY_CHANGE_ON_RESUME:
        assert any(key.startswith(entry) for key in keys) if entry.endswith(".") else entry in keys, entry


def test_a_run_older_than_keys_added_since_still_resumes():
    """The first config.yaml this project wrote had `train.eval_steps` (since replaced by eval_sequences),
    and lacked train.init_from, hellaswag_*, activation_checkpointing, hessian_micro_batch_size,
    async_checkpoint, protocol and model.scale_attn_by_inverse_layer_idx (git history of configs/). Resuming
    it with the values it was trained with is no change; a key this code no longer has is ignored."""
    new = record()
    old = yaml.safe_load(yaml.safe_dump(new))
    for key in ("init_from", "hellaswag_interval", "hellaswag_data", "hellaswag_limit", "eval_sequences",
                "activation_checkpointing", "hessian_micro_batch_size", "async_checkpoint", "stop_grace_s"):
        del old["train"][key]
    old["train"]["eval_steps"] = 20
    del old["protocol"], old["model"]["scale_attn_by_inverse_layer_idx"]
    assert identity_differences(old, new) == []
    assert identity_differences(old, record("train.init_from=gpt2")) == ["train.init_from: None -> 'gpt2'"]


def test_a_resume_changing_the_clip_is_refused_naming_it_and_keeps_the_record(tmp_path, byte_data):
    """End to end: wrong if the resume trains on, or rewrites config.yaml (the record of how the first steps
    were trained), or does not name the key."""
    out = tmp_path / "run"
    # The schedule's length is fixed apart from max_steps, so that the longer resume differs in nothing else.
    fixed = ("train.ckpt_interval=2", "schedule.decay_steps=4")
    train(compose_train(tiny_run(out, byte_data, "train.max_steps=2", *fixed)))
    before = (out / "config.yaml").read_text()
    for override, change in (("train.grad_clip=0.5", "train.grad_clip: 1.0 -> 0.5"),
                             ("train.dtype=bfloat16", "train.dtype: 'float32' -> 'bfloat16'")):
        with pytest.raises(UserError, match=re.escape(change)):
            train(compose_train(tiny_run(out, byte_data, "train.max_steps=4", *fixed, override)))
        assert (out / "config.yaml").read_text() == before
    train(compose_train(tiny_run(out, byte_data, "train.max_steps=4", *fixed)))  # without the change: resumes
