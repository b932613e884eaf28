"""The one resolution of a config into final settings (`gpt.settings.load_settings`): frozen once made, with
the batch rules checked once, each with its one message."""

import dataclasses

import pytest
import torch

from common.errors import UserError
from gpt.config import BatchPlan, ReadOnlyDict
from gpt.settings import load_settings
from tests.hydra_compose import compose_train

CPU = torch.device("cpu")


def resolved(*overrides: str, world_size: int = 1):
    return load_settings(compose_train(["out_dir=unused", *overrides]), world_size=world_size, device=CPU)


def sections(value, path="settings"):
    """Every dataclass and mapping reachable from `value`, with the path that reaches it."""
    if dataclasses.is_dataclass(value):
        yield path, value
        for f in dataclasses.fields(value):
            yield from sections(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, dict):
        yield path, value
        for key, item in value.items():
            yield from sections(item, f"{path}[{key!r}]")


def test_settings_cannot_be_changed_once_resolved():
    """Every section of the resolved settings refuses assignment, and the optim and data sections refuse
    changes: whatever config.yaml, the plan and the checkpoints record is what the run does. Wrong if any
    module could still adjust a setting after the run's record was made."""
    settings, _ = resolved("optim=sophia_g", "protocol=official")
    seen = 0
    for path, section in sections(settings):
        seen += 1
        if isinstance(section, dict):
            assert isinstance(section, ReadOnlyDict), path
            with pytest.raises(TypeError):
                section["lr"] = 1.0
            with pytest.raises(TypeError):
                section.update(lr=1.0)
            with pytest.raises(TypeError):
                section.pop(next(iter(section)), None)
        else:
            name = dataclasses.fields(section)[0].name
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(section, name, getattr(section, name))
    assert seen >= 8  # settings, model, train, schedule, wandb, protocol, optim, data
    assert isinstance(settings.protocol.summed_accumulation, tuple)
    assert isinstance(settings.optim["betas"], tuple)


def test_record_is_plain_data_that_round_trips():
    """config.yaml and checkpoints store `record()`: plain dicts and lists, equal to the settings' values."""
    settings, _ = resolved("optim=sophia_g")
    record = settings.record()
    assert type(record["optim"]) is dict and type(record["optim"]["betas"]) is list
    assert record["optim"]["betas"] == list(settings.optim["betas"])
    assert record["train"]["micro_batch_size"] == settings.train.micro_batch_size == 12


def test_values_left_open_and_derived_are_resolved_once():
    """`null` micro-batches, compile and background saves are decided for the device, the schedule's length
    recorded and the official protocol's extra step and summed micro-steps resolved, in one call."""
    settings, plan = resolved("optim=adamw", "protocol=official")
    t = settings.train
    assert (t.micro_batch_size, t.compile, t.async_checkpoint) == (12, False, False)
    assert settings.schedule.decay_steps == 100_000 and t.max_steps == 100_001
    assert settings.protocol.summed_micro_steps == plan.grad_accum_steps == 40


@pytest.mark.parametrize(("plan_args", "message"), [
    ((480, 12, 1024, 7), r"^train\.global_batch_size=480 does not split over world size 7;"),
    ((480, 7, 1024, 8), r"^train\.global_batch_size=480 is not divisible by train\.micro_batch_size=7 × "
                        r"world size 8;"),
    ((480, 12, 1024, 8, 100), r"^optim\.hessian_batch_size=100 does not split over world size 8;"),
    ((480, 12, 1024, 8, 240, 7), r"^optim\.hessian_batch_size=240 is not divisible by "
                                 r"train\.hessian_micro_batch_size=7 × world size 8;"),
])
def test_batch_rules_are_refused_with_one_message(plan_args, message):
    """Each batch rule, for the training batch and the curvature pass's, is checked by the batch plan alone,
    naming both keys; wrong if a run could start with accumulation over part of a batch."""
    with pytest.raises(UserError, match=message):
        BatchPlan(*plan_args)


def test_the_curvature_pass_rule_reaches_the_user_from_the_config():
    """The curvature micro-batch rule from a composed config: the same one message, before any work."""
    with pytest.raises(UserError, match=r"train\.hessian_micro_batch_size=7 × world size 1"):
        resolved("optim=sophia_g", "train.hessian_micro_batch_size=7")
    _, plan = resolved("optim=sophia_g", "optim.hessian_batch_size=240", "train.hessian_micro_batch_size=6")
    assert (plan.hessian_batch_size, plan.hessian_accum_steps, plan.grad_accum_steps) == (240, 40, 40)
