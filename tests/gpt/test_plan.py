"""The plan printed at start and by `train.dry_run=true`, checked against GPT-2 medium's numbers worked out by
hand from the paper's setup, and the dry run's promise to build nothing."""

import re

import pytest
import torch

from gpt.distributed import init_runtime
from gpt.plan import peak_flops
from gpt.settings import load_settings
from gpt.step_probe import cpu_estimate
from gpt.trainer import Trainer, train
from tests.hydra_compose import compose_train, tiny_run


def dry_run(tmp_path, *overrides: str) -> Trainer:
    cfg = compose_train(["train.dry_run=true", f"out_dir={tmp_path}", "train.device=cpu", *overrides])
    settings, plan = load_settings(cfg)  # as train() does first
    return Trainer(settings, init_runtime(settings.train.strategy, settings.train.device), plan)


def test_gpt2_medium_sophia_g_plan(tmp_path, capsys):
    """Wrong if any printed number drifts from the arithmetic: 24 blocks of 12·d² + 2·d parameters (no
    biases) plus the final LayerNorm, tied 50304×1024 embedding, 1024 positions; FLOPs per token
    6·N + 12·L·d·T with N all but the position table (the head's matmul counts); a GNB pass over a full batch
    every 10 steps adds 10%; 101 evaluations (step 0 and every 1,000) of the fixed 2,400 sequences, a forward
    each (a third of a training token's FLOPs), count in the time; A100 at 312 TFLOP/s bf16 and 40% MFU."""
    trainer = dry_run(tmp_path, "optim=sophia_g", "model=gpt2_medium")
    trainer.run()
    plan = capsys.readouterr().out
    d, layers, vocab, context = 1024, 24, 50304, 1024
    non_embedding = layers * (12 * d * d + 2 * d) + d
    params = non_embedding + vocab * d + context * d
    tokens_per_step = 480 * 1024
    flops_per_token = 6 * (non_embedding + vocab * d) + 12 * layers * d * context
    flops_per_step = flops_per_token * tokens_per_step * 1.1
    total_flops = flops_per_step * 100_000
    eval_flops = 101 * 2400 * context * flops_per_token / 3
    a100_hours = (total_flops + eval_flops) / (312e12 * 0.4) / 3600
    assert f"({params / 1e6:.2f} M parameters)" in plan
    assert "world size: 1" in plan
    assert "micro 12 × accumulation 40 × world 1 = 480 sequences × 1024 tokens = 491,520 tokens/step" in plan
    assert f"100,000 → {100_000 * tokens_per_step / 1e9:.2f} B tokens" in plan
    assert f"{flops_per_step / 1e15:.2f} PFLOP per step, {total_flops / 1e18:.2f} EFLOP in total" in plan
    assert (f"evaluation: 101 × 2,400 validation sequences (a fixed set): {eval_flops / 1e15:.2f} PFLOP, "
            f"{eval_flops / total_flops:.2%} of training") in plan
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


def test_small_run_plan_uses_units_that_fit(tmp_path, capsys):
    """Wrong if a run of a few minutes prints "0.00 B tokens", "0.00 GiB" or "0 GPU-hours": the quick start's
    300 steps of 4,096 tokens are 1.23 M tokens, its 836,736 fp32 weights 3.19 MiB, and its 7.0 TFLOP at 40%
    of an A100's 156 TFLOP/s fp32 peak (with its 31 evaluations' share) a fraction of a GPU-second."""
    dry_run(tmp_path, "experiment=quickstart").run()
    plan = capsys.readouterr().out
    params = 836_736
    assert f"300 → {300 * 4096 / 1e6:.2f} M tokens" in plan
    assert f"weights {params * 4 / 2**20:.2f} MiB fp32" in plan
    seconds = re.search(r"40% MFU on A100 .*: ([\d.]+) GPU-seconds = ([\d.]+) s on 8 GPUs", plan)
    flops = float(re.search(r"([\d.]+) TFLOP in total", plan)[1]) * 1e12
    evaluation = float(re.search(r"evaluation: 31 × 128 .*, ([\d.]+)% of training", plan)[1]) / 100
    assert seconds and float(seconds[1]) == pytest.approx(flops * (1 + evaluation) / (156e12 * 0.4), rel=0.05)
    assert float(seconds[2]) == pytest.approx(float(seconds[1]) / 8, rel=0.05)
    assert " 0 GPU" not in plan and "0.00 " not in plan


@pytest.mark.parametrize(("device_name", "peak"), [
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA B200", 2250e12),
])
def test_peak_flops_per_gpu(device_name, peak):
    """The dense bf16 peaks of the vendors' data sheets for the names CUDA reports (half for TF32 fp32 runs).
    Wrong if the H200 or B200 had no peak (MFU would be null there) or an H100 PCIe/NVL got the SXM part's
    989 TFLOP/s (its MFU would read 1.3× too low)."""
    cuda = torch.device("cuda", 0)  # with train.gpu given, no CUDA device is queried
    assert peak_flops(cuda, "bfloat16", gpu=device_name) == peak
    assert peak_flops(cuda, "float32", gpu=device_name) == peak / 2


@pytest.mark.parametrize("optim", ["muon", "soap"])
def test_the_plan_states_the_optimizer_memory_its_registry_entry_declares(tmp_path, capsys, optim):
    """GPT-2 medium, counted by hand: Muon keeps one momentum per hidden matrix (4 per block: 12·d² of the
    block's parameters) and AdamW's m and v for the rest; SOAP keeps m and v everywhere plus, per rotated
    side of every matrix (sides up to 10,000 long, so not the vocabulary side of wte), a factor and a basis
    of side² each. Wrong if the plan assumed AdamW's two tensors per parameter for every optimizer."""
    dry_run(tmp_path, f"optim={optim}", "model=gpt2_medium").run()
    plan = capsys.readouterr().out
    d, layers, vocab, context = 1024, 24, 50304, 1024
    hidden = layers * 12 * d * d
    params = layers * (12 * d * d + 2 * d) + d + vocab * d + context * d
    if optim == "muon":
        numel = hidden + 2 * (params - hidden)
    else:
        def sides(m: int, n: int) -> int:  # a factor and a basis per side of an m×n matrix
            return 2 * m**2 + 2 * n**2

        per_block = sides(3 * d, d) + sides(d, d) + sides(4 * d, d) + sides(d, 4 * d)
        numel = 2 * params + layers * per_block + 2 * d**2 + sides(context, d)  # wte: its short side only
    assert f"optimizer state ≈ {numel * 4 / 2**30:.2f} GiB" in plan


def test_cpu_estimate_arithmetic():
    """Wrong if a step were not its micro-steps (times the curvature share), or the evaluations were
    miscounted: the quick start evaluates at step 0 and every 10 of its 300 steps (31 times), 128
    sequences in 8 micro-batches of 16, each a third of a forward+backward."""
    estimate = cpu_estimate(0.3, grad_accum_steps=2, micro_batch_size=16, compute_factor=1.0, max_steps=300,
                            eval_interval=10, eval_sequences=128)
    assert estimate.step_s == pytest.approx(0.6) and estimate.evaluations == 31
    assert estimate.eval_s == pytest.approx(0.3 * 8 / 3)
    assert estimate.total_s == pytest.approx(300 * 0.6 + 31 * 0.8)
    uneven = cpu_estimate(1.0, grad_accum_steps=1, micro_batch_size=4, compute_factor=1.5, max_steps=25,
                          eval_interval=10, eval_sequences=6)
    assert uneven.evaluations == 4 and uneven.step_s == pytest.approx(1.5)  # steps 0, 10, 20 and 25
    assert uneven.eval_s == pytest.approx(2 / 3)  # 6 sequences: 2 micro-batches of 4


def test_a_cpu_run_plans_its_time_from_a_probe_of_its_model(tmp_path, byte_data, capsys):
    """Wrong if a CPU run's plan gave only GPU times, or its estimate were not the probe's arithmetic; a dry
    run (no weights to time) says when it will be measured."""
    dry_run(tmp_path / "dry", "experiment=quickstart").run()
    assert "time on this CPU: measured when the run starts" in capsys.readouterr().out
    train(compose_train(tiny_run(tmp_path / "run", byte_data, steps=2, interval=2)))
    plan = (tmp_path / "run" / "plan.txt").read_text()
    found = re.search(r"time on this CPU \(measured at start: ([\d.e-]+) s per micro-step → ([\d.e-]+) s per "
                      r"step, ([\d.e-]+) s per evaluation × 2\): ≈ ([\d.,]+) (seconds|minutes)", plan)
    assert found, plan
    micro, step, evaluation, total = (float(found[i].replace(",", "")) for i in range(1, 5))
    assert step == pytest.approx(2 * micro, rel=0.01)  # 8 sequences in micro-batches of 4
    assert evaluation == pytest.approx(2 * micro / 3, rel=0.01)  # 8 validation sequences: 2 forwards
    seconds = total * (60 if found[5] == "minutes" else 1)
    assert seconds == pytest.approx(2 * step + 2 * evaluation, rel=0.05)
    assert "time at 40% MFU on A100" in plan  # and the GPU table still


def test_the_cpu_probe_times_at_most_its_token_budget_and_small_micro_batches_whole():
    """Wrong if a huge context is timed whole (a 100,000-token forward takes longer than a stop signal's
    grace, before the run has even started) or a micro-batch that fits is timed in part (the quick start's
    estimate would then rest on a FLOPs scaling it does not need)."""
    from gpt.step_probe import PROBE_MAX_TOKENS, probe_shape

    assert probe_shape(16, 128) == (16, 128)
    assert probe_shape(1, 100_000) == (1, PROBE_MAX_TOKENS)
    sequences, length = probe_shape(64, 1024)
    assert length == 1024 and sequences * length <= PROBE_MAX_TOKENS and sequences >= 1
