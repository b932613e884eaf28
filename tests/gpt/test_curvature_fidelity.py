"""When the trainer runs the curvature pass, and what Sophia-G's pass folds into h, checked from outside the
trainer's schedule code against the official script (`train_sophiag.py`).

The official loop runs the pass at the end of iteration s − 1 for every s that is a multiple of k, after that
iteration's update: the parameters the pass sees are those after s updates, and no pass runs before the first
update. Its ĝ (the gradient of the loss against labels sampled from the model) is clipped to global norm
`grad_clip` before `update_hessian()` folds ĝ⊙ĝ into h. Every other trainer test compares this project's runs
with each other, so a pass one step late or a dropped clip would pass them; these tests count the optimizer's
own calls and recompute ĝ from a copy of the model.
"""

import copy

import pytest
import torch

import gpt.curvature_pass
import gpt.trainer
from gpt.trainer import train
from optim import AdaHessian, SophiaG, SophiaH
from tests.hydra_compose import compose_train, tiny_run


@pytest.mark.parametrize(("optim", "optimizer_class", "interval", "at_start", "steps"), [
    pytest.param("sophia_g", SophiaG, 7, False, 200, id="sophia_g"),
    # the same schedule code, fewer steps: their double backward makes each step slower
    pytest.param("sophia_h", SophiaH, 7, False, 50, id="sophia_h", marks=pytest.mark.slow),
    # refuses to step without an estimate: one pass before step 0
    pytest.param("adahessian", AdaHessian, 3, True, 30, id="adahessian", marks=pytest.mark.slow),
])
def test_curvature_passes_run_after_step_s_minus_1_for_s_a_multiple_of_k(
    tmp_path, byte_data, monkeypatch, optim, optimizer_class, interval, at_start, steps,
):
    """Over 200 steps (Sophia-G; 50 and 30 for the others), each `update_hessian` call is placed by the
    number of optimizer steps taken before it (counted by wrapping the optimizer class's own `step`): the
    passes must come after exactly s steps for every multiple s of k below the step count (k = 7 over 200:
    s = 7, 14, …, 196), never at s = 0 (AdaHessian, which cannot step without an estimate: also at s = 0),
    one pass each, and none after the last step. Wrong if the pass runs one step late (after step s, as
    s % k == k − 1 would read), one early, at step 0, or twice."""
    events: list[str] = []
    step, update_hessian = optimizer_class.step, optimizer_class.update_hessian

    def counted_step(self, *args, **kwargs):
        events.append("step")
        return step(self, *args, **kwargs)

    def counted_update_hessian(self, *args, **kwargs):
        events.append("pass")
        return update_hessian(self, *args, **kwargs)

    monkeypatch.setattr(optimizer_class, "step", counted_step)
    monkeypatch.setattr(optimizer_class, "update_hessian", counted_update_hessian)
    train(compose_train(tiny_run(
        tmp_path / optim, byte_data, f"optim={optim}", f"optim.hessian_interval={interval}",
        "optim.hessian_batch_size=4", "+optim.fused=false", "train.log_interval=50", steps=steps,
        interval=steps)))
    passes_after = [events[:i].count("step") for i, event in enumerate(events) if event == "pass"]
    expected = [s for s in range(0 if at_start else 1, steps) if s % interval == 0]
    assert passes_after == expected
    assert events.count("step") == steps


@pytest.mark.parametrize("clip", [True, False], ids=["clipped", "hessian_grad_clip=false"])
def test_the_gnb_gradient_is_clipped_before_it_enters_h(tmp_path, byte_data, monkeypatch, clip):
    """One Sophia-G pass (k = 2, at the start of step 2) with `train.grad_clip` c = 0.01, far below ĝ's norm.
    A copy of the model taken just before the pass recomputes ĝ on the pass's own sequences, with the
    labels' generator states the pass used: h after the pass (from zeros) must be (1 − β2)·(c·ĝ/‖ĝ‖)², the
    clip of `torch.nn.utils.clip_grad_norm_` that the official script applies, and with
    `optim.hessian_grad_clip=false` (1 − β2)·ĝ². Wrong if the clip is dropped, applied to another norm (per
    tensor, or after the square), or applied where it is switched off."""
    c = 0.01
    captured: dict = {}
    generator_states: list[torch.Tensor] = []
    run_pass, gnb_loss = gpt.trainer.run_curvature_pass, gpt.curvature_pass.gnb_loss

    def recorded_gnb_loss(logits, generator):
        generator_states.append(generator.get_state())
        return gnb_loss(logits, generator)

    def recorded_pass(schedule, model, optimizer, loader, step, *args, **kwargs):
        captured.update(schedule=schedule, loader=loader, step=step, model=copy.deepcopy(model),
                        beta2=optimizer.param_groups[0]["betas"][1])
        seconds = run_pass(schedule, model, optimizer, loader, step, *args, **kwargs)
        named = model.named_parameters()
        captured["h"] = {name: optimizer.state[p]["hessian"].clone() for name, p in named}
        return seconds

    monkeypatch.setattr(gpt.curvature_pass, "gnb_loss", recorded_gnb_loss)
    monkeypatch.setattr(gpt.trainer, "run_curvature_pass", recorded_pass)
    train(compose_train(tiny_run(
        tmp_path / "run", byte_data, "optim=sophia_g", "optim.hessian_interval=2",
        f"optim.hessian_grad_clip={str(clip).lower()}", f"train.grad_clip={c}", "+optim.fused=false",
        steps=3)))
    assert captured["step"] == 2
    schedule, loader, model = captured["schedule"], captured["loader"], captured["model"]
    accum = schedule.batch_size // (schedule.micro_batch_size or loader.plan.micro_batch_size)
    assert len(generator_states) == accum
    for micro, state in enumerate(generator_states):
        x, _ = loader.hessian_batch(2, micro, schedule.batch_size, schedule.micro_batch_size)
        generator = torch.Generator().set_state(state)
        (gnb_loss(model(x)[0], generator) / accum).backward()
    raw = {name: p.grad for name, p in model.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in raw.values())).item()
    assert norm > 10 * c, "the clip would not bind"
    scale = c / (norm + 1e-6) if clip else 1.0  # torch's clip_grad_norm_ coefficient
    one_minus_beta2 = 1 - captured["beta2"]
    for name, g in raw.items():
        torch.testing.assert_close(captured["h"][name], one_minus_beta2 * (scale * g) ** 2,
                                   rtol=1e-5, atol=1e-12, msg=name)
