"""The plan printed at start and by `train.dry_run=true`, checked against GPT-2 medium's numbers worked out by
hand from the paper's setup, and the dry run's promise to build nothing."""

import re

import pytest

from gpt.config import batch_plan, load_settings
from gpt.distributed import init_runtime
from gpt.trainer import Trainer
from tests.hydra_compose import compose_train


def dry_run(tmp_path, *overrides: str) -> Trainer:
    cfg = compose_train(["train.dry_run=true", f"out_dir={tmp_path}", "train.device=cpu", *overrides])
    settings = load_settings(cfg)
    runtime = init_runtime(settings.train.strategy, settings.train.device)
    return Trainer(settings, runtime, batch_plan(settings, runtime.world_size))


def test_gpt2_medium_sophia_g_plan(tmp_path, capsys):
    """Wrong if any printed number drifts from the arithmetic: 24 blocks of 12·d² + 2·d parameters (no
    biases) plus the final LayerNorm, tied 50304×1024 embedding, 1024 positions; FLOPs per token
    6·N + 12·L·d·T with N all but the position table (the head's matmul counts); a GNB pass over a full batch
    every 10 steps adds 10%; A100 at 312 TFLOP/s bf16 and 40% MFU."""
    trainer = dry_run(tmp_path, "optim=sophia_g", "model=gpt2_medium")
    trainer.run()
    plan = capsys.readouterr().out
    d, layers, vocab, context = 1024, 24, 50304, 1024
    non_embedding = layers * (12 * d * d + 2 * d) + d
    params = non_embedding + vocab * d + context * d
    tokens_per_step = 480 * 1024
    flops_per_step = (6 * (non_embedding + vocab * d) + 12 * layers * d * context) * tokens_per_step * 1.1
    total_flops = flops_per_step * 100_000
    a100_hours = total_flops / (312e12 * 0.4) / 3600
    assert f"({params / 1e6:.2f} M parameters)" in plan
    assert "world size: 1" in plan
    assert "micro 12 × accumulation 40 × world 1 = 480 sequences × 1024 tokens = 491,520 tokens/step" in plan
    assert f"100,000 → {100_000 * tokens_per_step / 1e9:.2f} B tokens" in plan
    assert f"{flops_per_step / 1e15:.2f} PFLOP per step, {total_flops / 1e18:.2f} EFLOP in total" in plan
    assert f"optimizer state ≈ {2 * params * 4 / 2**30:.2f} GiB" in plan
    hours = re.search(r"40% MFU on A100 .*: ([\d,]+) GPU-hours = ([\d.]+) h on 8 GPUs", plan)
    assert hours and int(hours[1].replace(",", "")) == round(a100_hours)
    assert float(hours[2]) == pytest.approx(a100_hours / 8, abs=0.05)
    assert "H100" in plan


def test_dry_run_allocates_no_model(tmp_path):
    """A dry run reads shapes only: gpt2_xl's 1.5B parameters live on the meta device (no memory, no
    initialisation), so planning the largest model takes no time on a laptop."""
    trainer = dry_run(tmp_path, "model=gpt2_xl")
    assert all(p.is_meta for p in trainer.model.parameters())
    assert trainer.run() == {}
