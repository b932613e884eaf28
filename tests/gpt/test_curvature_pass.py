"""The curvature pass's own micro-batch (`train.hessian_micro_batch_size`): how the pass's sequences are split
into micro-steps must not change Hutchinson's estimate, which is a sum over the same sequences."""

import contextlib
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from data.loader import BatchLayout, BatchLoader, TokenData
from gpt.curvature_pass import CurvatureSchedule, run_curvature_pass
from gpt.distributed import Runtime
from gpt.model import GPT, GPTConfig
from gpt.trainer import train
from optim import AdaHessian, SophiaH
from tests.hydra_compose import compose_train, tiny_run


def hutchinson_estimate(byte_data: Path, optimizer_class: type, micro_batch_size: int | None
                        ) -> list[torch.Tensor]:
    """The optimizer's curvature state after one Hutchinson pass over 8 sequences, split into training
    micro-batches of 4 (None: today's behaviour) or the pass's own `micro_batch_size`."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=256))
    optimizer = optimizer_class(model.parameters(), fused=False)
    loader = BatchLoader(TokenData(byte_data), BatchLayout(8, 4, block_size=32), seed=1)
    runtime = Runtime(0, 0, 1, torch.device("cpu"), "single")
    schedule = CurvatureSchedule("hutchinson", interval=1, batch_size=8, grad_clip=0.0, at_start=True,
                                 micro_batch_size=micro_batch_size)
    run_curvature_pass(schedule, model, optimizer, loader, 0, 1, runtime, contextlib.nullcontext,
                       torch.amp.GradScaler("cpu", enabled=False))
    key = "hessian" if optimizer_class is SophiaH else "exp_hessian_diag_sq"
    return [optimizer.state[p][key].clone() for p in model.parameters()]


@pytest.mark.parametrize(("optimizer_class", "micro_batch_size"),
                         [(SophiaH, 1), (SophiaH, 8), (AdaHessian, 2)])
def test_hessian_micro_batch_gives_the_same_estimate(byte_data, optimizer_class, micro_batch_size):
    """Splitting the pass's 8 sequences into micro-batches of 1, 2 or 8 instead of the training micro-batch
    of 4 gives today's estimate up to float32 rounding of the sums: entries within 1e-5 of the tensor's
    largest (u⊙Hu sums terms of both signs, so an entry that nearly cancels has no relative precision). Wrong
    if a micro-step read other sequences, drew another probe, or scaled its loss by the wrong accumulation."""
    today = hutchinson_estimate(byte_data, optimizer_class, None)
    split = hutchinson_estimate(byte_data, optimizer_class, micro_batch_size)
    assert any(h.abs().sum() > 0 for h in today)
    for a, b in zip(split, today, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


def test_hessian_micro_batch_that_does_not_divide_is_a_user_error(byte_data, tmp_path):
    """A pass micro-batch whose product with the world size does not divide the pass's batch is refused at
    start-up with the key named, not at the first pass (which may be many steps in)."""
    cfg = compose_train(tiny_run(tmp_path / "run", byte_data, "optim=sophia_h",
                                 "train.hessian_micro_batch_size=3"))
    with pytest.raises(UserError, match=r"train\.hessian_micro_batch_size=3"):
        train(cfg)
