"""`train.activation_checkpointing=true`: every block recomputes its activations in the backward. It must
change memory only: the same losses, gradients and Hessian-vector products as without it, the same parameter
names, and a training run with the same curve."""

import json

import pytest
import torch

from data.prepare import prepare
from gpt.distributed import checkpoint_activations
from gpt.model import GPT, GPTConfig, math_attention
from gpt.trainer import train
from optim.curvature import hessian_vector_products, rademacher_like
from tests.determinism import assert_same_numbers
from tests.hydra_compose import compose_train, tiny_run

CONFIG = GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=256, dropout=0.1)


def pair() -> tuple[GPT, GPT]:
    """Two identical models; the second checkpoints its blocks."""
    torch.manual_seed(0)
    plain = GPT(CONFIG)
    checkpointed = GPT(CONFIG)
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_activations(checkpointed)
    return plain, checkpointed


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.block_size + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def test_same_loss_and_gradients_with_dropout():
    """With dropout on, the recomputed forward must replay the same masks: loss and every gradient equal
    the plain model's bit for bit (the same operations in the same order on CPU). A recomputation with fresh
    masks would change the gradients of every block. Parameter names and the state dict are unchanged."""
    plain, checkpointed = pair()
    x, y = batch()
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(2)
        _, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_same_hessian_vector_products():
    """The Hutchinson optimizers' double backward through checkpointed blocks (the curvature pass runs on
    the same model) gives the plain model's H·u; wrong if the recomputation dropped the second-order graph."""
    plain, checkpointed = pair()
    plain.eval(), checkpointed.eval()
    x, y = batch()
    probes = rademacher_like(list(plain.parameters()), torch.Generator().manual_seed(3))
    products = []
    with math_attention():
        for model in (plain, checkpointed):
            _, loss = model(x, y)
            products.append(hessian_vector_products(loss, list(model.parameters()), probes))
    for a, b in zip(*products, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.slow
def test_training_run_has_the_same_curve(tmp_path):
    """A Sophia-G run (training steps and GNB passes) with train.activation_checkpointing=true logs the
    same losses as without it: exactly, since the recomputation repeats the same CPU operations."""
    data = tmp_path / "data"
    prepare(compose_train(["experiment=quickstart", f"data.dir={data}"]).data)
    curves = []
    for enabled in ("false", "true"):
        out = tmp_path / f"checkpointing-{enabled}"
        train(compose_train(tiny_run(out, data, "optim=sophia_g", "optim.hessian_interval=2",
                                     "+optim.fused=false", "model.dropout=0.1", "train.max_steps=4",
                                     f"train.activation_checkpointing={enabled}")))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curves.append([(r["step"], r.get("train_loss"), r.get("val_loss")) for r in records])
    assert_same_numbers({0: curves[0]}, {0: curves[1]})
    assert len(curves[0]) == 5
