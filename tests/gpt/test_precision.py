"""Precision and compilation on CPU: float16 with a gradient scaler (training step and GNB curvature pass),
bfloat16 autocast, and `train.compile=true`, each against a float32 eager run of the tiny model."""

import contextlib
import functools
import inspect
import json
import logging
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from data.loader import BatchLayout, BatchLoader, TokenData
from gpt.curvature_pass import CurvatureSchedule, run_curvature_pass
from gpt.distributed import Runtime
from gpt.model import GPT, GPTConfig
from gpt.trainer import train
from optim import OPTIMIZERS, SophiaG, SophiaH
from tests.hydra_compose import compose_train, tiny_run

short_run = functools.partial(tiny_run, steps=6, interval=6)  # 6 steps, one evaluation and checkpoint


# A curvature pass every 2 steps; the eager update (bit-identical to the compiled one) skips compilation.
SOPHIA_G = ["optim=sophia_g", "optim.hessian_interval=2", "+optim.fused=false"]


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r.get("train_loss", r.get("val_loss")) for r in records}


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory, byte_data) -> Path:
    out = tmp_path_factory.mktemp("float32") / "run"
    train(compose_train(short_run(out, byte_data, *SOPHIA_G)))
    return out


def assert_losses_close(run: Path, reference: Path, rel: float) -> float:
    a, b = losses(run), losses(reference)
    assert a.keys() == b.keys()
    worst = max(abs(a[s] - b[s]) / b[s] for s in b)
    assert worst <= rel, worst
    return worst


def test_float16_with_grad_scaler_trains_like_float32(tmp_path, byte_data, float32_run):
    """float16 autocast on CPU with loss scaling (training steps and Sophia-G's curvature passes): per-step
    losses within 1e-4 relative of float32 (measured 2.6e-6), and the scaler's state is checkpointed. Wrong
    if a scaled gradient reached the optimizer or the Hessian EMA (a 65536× error)."""
    out = tmp_path / "run"
    train(compose_train(short_run(out, byte_data, *SOPHIA_G, "train.dtype=float16")))
    assert_losses_close(out, float32_run, rel=1e-4)
    state = torch.load(out / "checkpoints" / "step_00000006" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 2.0**16


def test_bfloat16_autocast_trains_like_float32(tmp_path, byte_data, float32_run):
    """bfloat16 autocast (weights and optimizer state stay float32): losses within 1e-3 relative of float32
    over six steps (measured 1.6e-5: only the matmuls round to bfloat16's 8 significant bits)."""
    out = tmp_path / "run"
    train(compose_train(short_run(out, byte_data, *SOPHIA_G, "train.dtype=bfloat16")))
    assert_losses_close(out, float32_run, rel=1e-3)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_runs_under_the_float16_scaler_or_refuses(tmp_path, byte_data, name):
    """Each optimizer steps on unscaled gradients under float16 (two steps, within 1e-4 of its float32 run),
    except those needing double backward (Hutchinson), which refuse at start-up with a clear message."""
    entry = OPTIMIZERS[name]
    cls, curvature = entry.cls, entry.curvature
    extra = [f"optim={name}", "train.max_steps=2", "train.eval_interval=2", "train.ckpt_interval=2"]
    extra += [f"schedule={entry.schedules[0]}"] if entry.schedules else []
    extra += ["optim.hessian_interval=1"] if curvature else []
    if cls.__module__.startswith("optim.") and "fused" in inspect.signature(cls).parameters:
        extra.append("+optim.fused=false")  # ours: skip compiling; AdamW's kernel is the registry's choice
    if curvature == "hutchinson":
        with pytest.raises(UserError, match="float16"):
            train(compose_train(short_run(tmp_path / "f16", byte_data, *extra, "train.dtype=float16")))
        return
    runs = {}
    for dtype in ("float32", "float16"):
        runs[dtype] = tmp_path / dtype
        train(compose_train(short_run(runs[dtype], byte_data, *extra, f"train.dtype={dtype}")))
    assert_losses_close(runs["float16"], runs["float32"], rel=1e-4)


# Every curvature optimizer: a curvature pass every 2 steps, eager updates (compilation of the model only).
CURVATURE_OPTIMIZERS = {
    "sophia_g": SOPHIA_G,
    "sophia_h": ["optim=sophia_h", "optim.hessian_interval=2", "+optim.fused=false"],
    "adahessian": ["optim=adahessian", "+optim.fused=false"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CURVATURE_OPTIMIZERS))
def test_compiled_model_trains_like_eager(tmp_path, byte_data, name):
    """train.compile=true (Inductor on CPU) gives the eager run's losses up to kernel rounding (measured 2e-7;
    1e-5 allowed), for every optimizer with a curvature pass. GNB runs through the compiled forward; the
    Hutchinson optimizers' double backward must run on the eager model under the compile wrapper (a compiled
    backward cannot be differentiated again: it would crash)."""
    runs = {}
    for compiled in (False, True):
        runs[compiled] = tmp_path / f"compile-{compiled}"
        train(compose_train(short_run(runs[compiled], byte_data, *CURVATURE_OPTIMIZERS[name],
                                      f"train.compile={str(compiled).lower()}")))
    assert_losses_close(runs[True], runs[False], rel=1e-5)


def curvature_estimate(byte_data: Path, scaler: torch.amp.GradScaler, kind: str = "gnb",
                       poison: bool = False) -> list[torch.Tensor]:
    """h after one curvature pass of the tiny model (Sophia-G's GNB or Sophia-H's Hutchinson), with the given
    scaler; `poison` puts a NaN into one weight first."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=256))
    if poison:
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    optimizer = (SophiaG(model.parameters(), bs=8 * 32, fused=False) if kind == "gnb"
                 else SophiaH(model.parameters(), fused=False))
    loader = BatchLoader(TokenData(byte_data), BatchLayout(8, 4, block_size=32), seed=1)
    runtime = Runtime(0, 0, 1, torch.device("cpu"), "single")
    schedule = CurvatureSchedule(kind, interval=1, batch_size=8, grad_clip=1.0, at_start=True)
    run_curvature_pass(schedule, model, optimizer, loader, 0, 1, runtime, contextlib.nullcontext, scaler)
    return [optimizer.state[p]["hessian"].clone() if p in optimizer.state else torch.zeros_like(p)
            for p in model.parameters()]


def test_gnb_pass_unscales_and_skips_overflow(byte_data, caplog):
    """The GNB pass scales its loss like a training step and unscales before `update_hessian`: with a
    power-of-two scale the estimate is bit-identical to the unscaled pass. An overflowing scale gives a
    non-finite gradient: the update is skipped (h stays 0) with a warning, instead of poisoning h for good."""
    plain = curvature_estimate(byte_data, torch.amp.GradScaler("cpu", enabled=False))
    assert any(h.abs().sum() > 0 for h in plain)
    scaled = curvature_estimate(byte_data, torch.amp.GradScaler("cpu", init_scale=2.0**16))
    for a, b in zip(scaled, plain, strict=True):
        assert torch.equal(a, b)
    with caplog.at_level(logging.WARNING):
        overflowed = curvature_estimate(byte_data, torch.amp.GradScaler("cpu", init_scale=2.0**127))
    assert all(h.abs().sum() == 0 for h in overflowed)
    assert "not finite" in caplog.text


@pytest.mark.parametrize("kind", ["gnb", "hutchinson"])
def test_non_finite_curvature_estimate_is_skipped(byte_data, caplog, kind):
    """A NaN weight makes every estimate NaN: h keeps its previous value (here 0) and a warning says so, for
    the GNB and the Hutchinson pass alike. Without the NaN, the same pass moves h."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert any(h.abs().sum() > 0 for h in curvature_estimate(byte_data, scaler, kind))
    with caplog.at_level(logging.WARNING):
        poisoned = curvature_estimate(byte_data, scaler, kind, poison=True)
    assert all(h.abs().sum() == 0 for h in poisoned)
    assert "not finite" in caplog.text
