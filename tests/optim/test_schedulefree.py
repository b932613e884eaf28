"""`optim=adamw_schedulefree` against the `schedulefree` package's AdamWScheduleFree driven by hand, as its
README prescribes: train() before training, eval() around every evaluation, a constant rate after warm-up."""

import torch

from optim import GroupSchedule, build_optimizer, evaluation_weights
from tests.tiny_model import tiny_gpt

CFG = {"name": "adamw_schedulefree", "lr": 2e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
WARMUP, STEPS, EVALUATIONS = 4, 12, (3, 7, 8)
MODEL = {"n_embd": 16, "block_size": 8, "vocab_size": 13, "bias": True}


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 13, (4, 8), generator=torch.Generator().manual_seed(step))


def test_steps_and_evaluation_weights_equal_the_package_driven_by_hand():
    """12 steps (4 of warm-up, then constant) with evaluations after steps 3, 7 and 8: parameters while
    training, the evaluated losses and the final weights all bit-identical to the package's optimizer built
    by hand over the same decay / no-decay split. Wrong if the registry built other groups or betas, warmed
    up twice (the package's own warmup_steps on top of the schedule's), evaluated at the training iterate y
    instead of the average x, or did not switch back to y after an evaluation."""
    import schedulefree

    model, by_hand_model = tiny_gpt(**MODEL), tiny_gpt(**MODEL)
    optimizer = build_optimizer(CFG, model, tokens_per_step=32)
    schedule = GroupSchedule(optimizer, "constant", reference_lr=2e-3, warmup_steps=WARMUP, decay_steps=None,
                             min_lr=0.0)
    linear = {f"transformer.h.{i}.{part}.weight" for i in range(2)
              for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    named = dict(by_hand_model.named_parameters())
    by_hand = schedulefree.AdamWScheduleFree(
        [{"params": [p for n, p in named.items() if n in linear], "weight_decay": 0.1},
         {"params": [p for n, p in named.items() if n not in linear], "weight_decay": 0.0}],
        lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    by_hand.train()
    losses, by_hand_losses = [], []
    for step in range(STEPS):
        schedule.apply(step)
        for group in by_hand.param_groups:
            group["lr"] = 2e-3 * min(step + 1, WARMUP + 1) / (WARMUP + 1)
        for net, opt in ((model, optimizer), (by_hand_model, by_hand)):
            opt.zero_grad()
            net(batch(step), batch(step))[1].backward()
            opt.step()
        for a, b in zip(model.parameters(), by_hand_model.parameters(), strict=True):
            assert torch.equal(a, b), step
        if step in EVALUATIONS:
            with torch.no_grad(), evaluation_weights(optimizer, CFG):
                losses.append(model(batch(-1), batch(-1))[1].item())
            with torch.no_grad():
                by_hand.eval()
                by_hand_losses.append(by_hand_model(batch(-1), batch(-1))[1].item())
                by_hand.train()
                training_weights_loss = by_hand_model(batch(-1), batch(-1))[1].item()
            assert losses[-1] != training_weights_loss  # x and y differ: the switch matters
    assert losses == by_hand_losses
    for a, b in zip(model.parameters(), by_hand_model.parameters(), strict=True):
        assert torch.equal(a, b)
