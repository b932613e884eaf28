"""Two ranks under torchrun (gloo on CPU) against one process: DDP and FSDP2 train the same model, resume,
survive a killed worker, leave one run directory, refuse a batch they cannot split, and export.

Runs are launched as subprocesses (`python -m torch.distributed.run`, the venv's torchrun) on the tiny model
and shared between tests through the `runs` fixture: each configuration trains once per session.

Tolerances. With the same global batch, 2 ranks × 1 micro-batch and 1 process × 2 micro-batches add the
same per-sequence gradients in a different order: DDP all-reduces (g0 + g1) and divides by 2, accumulation
adds g0/2 + g1/2 — equal in binary floating point (halving is exact), and measured bit-identical here; FSDP
reduce-scatters flattened shards, whose summation order differs, and its gradient norm is a sum of per-shard
partial norms: measured ≤ 5e-7 absolute (≈ 1e-7 relative) on losses near 5.5 over 8 steps. We allow 1e-5
relative, 20× the measured difference, far below any real error (a wrong gradient scale or a missing
all-reduce changes the loss at step 2 by ≥ 1e-3). A resumed or restarted run repeats the same operations on
the same number of ranks, so it must match its straight run exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.eval.pretrained import load_checkpoint
from gpt.model import GPT, GPTConfig
from optim import OPTIMIZERS
from tests.determinism import assert_same_numbers

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
RELATIVE_TOLERANCE = 1e-5
TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=256)
OPTIMIZER_OVERRIDES = {
    "adamw": ["optim=adamw"],
    # A curvature pass every 2 steps, inside every run; the eager update (`fused=false`, bit-identical to the
    # compiled one) saves each launch ~15 s of kernel compilation. The compiled kernels run on sharded
    # parameters in test_every_optimizer_matches_the_unsharded_one.
    "sophia_g": ["optim=sophia_g", "optim.hessian_interval=2", "+optim.fused=false"],
}
# Today's baselines, compared with one process under DDP (Muon and SOAP refuse FSDP; schedule-free's FSDP
# steps are checked in test_every_optimizer_matches_the_unsharded_one).
BASELINE_OVERRIDES = {
    "muon": ["optim=muon"],
    "adamw_schedulefree": ["optim=adamw_schedulefree", "schedule=constant"],
    "soap": ["optim=soap"],
}
# Shared runs: name -> (ranks, strategy, optimizer). Resumed runs are built by `Runs.resumed`.
RUNS = {f"{optimizer}-{kind}": (1 if kind == "single" else 2, kind, optimizer)
        for optimizer in OPTIMIZER_OVERRIDES for kind in ("single", "ddp", "fsdp")}
RUNS |= {f"{optimizer}-{kind}": (1 if kind == "single" else 2, kind, optimizer)
         for optimizer in BASELINE_OVERRIDES for kind in ("single", "ddp")}
RUNS["adamw_schedulefree-fsdp"] = (2, "fsdp", "adamw_schedulefree")
# Runs whose periodic (step-4) checkpoint is written in the background; the final one never is.
BACKGROUND_SAVES = {"adamw-fsdp": ["train.async_checkpoint=true"]}


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CI="true")
    # torchrun keeps its TCP store across restarts by default, and restarted workers then read the dead
    # workers' addresses (docs/scaling.md): a fresh store per restart.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def failure(output: str) -> str:
    """What a failed launch printed, for an assertion message: lines naming an abort or error, the first
    traceback (a worker's; torchrun's own summary comes after it and would push it out of a plain tail) and
    the last lines."""
    notable = [line for line in output.splitlines() if "terminate called" in line or "rror" in line][:10]
    first = output.find("Traceback (most recent call last)")
    head = output[first:first + 3000] + "\n...\n" if 0 <= first < len(output) - 2000 else ""
    return "\n".join(notable) + "\n...\n" + head + output[-2000:]


def torchrun(script: Path, *args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", str(script), *args]


def command(ranks: int, *args: str, restarts: int = 0) -> list[str]:
    """`python train.py ...` for one rank, torchrun with two for two."""
    script = REPO / "train.py"
    return [sys.executable, str(script), *args] if ranks == 1 else torchrun(script, *args, restarts=restarts)


def overrides(data_dir: Path, optimizer: str, strategy: str, *extra: str) -> list[str]:
    return [
        "experiment=quickstart", f"data.dir={data_dir}", f"train.max_steps={STEPS}",
        f"schedule.decay_steps={STEPS}", "train.log_interval=1",
        "train.eval_interval=4", "train.eval_sequences=12", "train.ckpt_interval=4",
        "train.global_batch_size=8", "train.micro_batch_size=4",
        *(f"model.{k}={v}" for k, v in TINY.items() if k != "vocab_size"),
        f"train.strategy={'auto' if strategy == 'single' else strategy}",
        *(OPTIMIZER_OVERRIDES | BASELINE_OVERRIDES)[optimizer],
        *extra,
    ]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def series(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run) if r.get(key) is not None}


class Runs:
    """Each named run trains once, in its own working directory `<root>/<name>/` with out_dir `run`."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.root, self.data_dir = root, data_dir
        self.done: dict[str, Path] = {}

    def launch(self, name: str, ranks: int, args: list[str], restarts: int = 0) -> subprocess.Popen:
        cwd = self.root / name
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(command(ranks, *args, "out_dir=run", restarts=restarts), cwd=cwd,
                                env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def run(self, name: str, ranks: int, args: list[str]) -> str:
        process = self.launch(name, ranks, args)
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, failure(output)
        return output

    def __call__(self, name: str) -> Path:
        if name not in self.done:
            ranks, strategy, optimizer = RUNS[name]
            extra = BACKGROUND_SAVES.get(name, [])
            self.run(name, ranks, overrides(self.data_dir, optimizer, strategy, *extra))
            self.done[name] = self.root / name / "run"
        return self.done[name]

    def resumed(self, name: str) -> Path:
        """The run `name` stopped after half its steps and started again with the same out_dir."""
        key = f"{name}-resumed"
        if key not in self.done:
            ranks, strategy, optimizer = RUNS[name]
            for steps in (STEPS // 2, STEPS):
                output = self.run(key, ranks, overrides(self.data_dir, optimizer, strategy,
                                                        f"train.max_steps={steps}"))
            assert f"(step {STEPS // 2})" in output, output[-3000:]
            self.done[key] = self.root / key / "run"
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, byte_data) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), byte_data)


def assert_close_series(a: dict[int, float], b: dict[int, float], what: str) -> float:
    assert a.keys() == b.keys(), what
    worst = max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in b)
    assert worst <= RELATIVE_TOLERANCE, f"{what}: relative difference {worst:.2e}"
    return worst


@pytest.mark.parametrize("optimizer", list(OPTIMIZER_OVERRIDES))
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(runs, optimizer, strategy):
    """Wrong if gradients are summed instead of averaged over ranks, a micro-step syncs too early or not at
    all, the curvature pass sees other labels or batches than one process would, the evaluation is split
    wrongly across ranks, or an FSDP statistic (gradient norm, win rate) covers one shard only. (DDP is also
    held to bit-identity: test_ddp_is_bit_identical_to_one_process.)"""
    reference, run = runs(f"{optimizer}-single"), runs(f"{optimizer}-{strategy}")
    keys = ["train_loss", "val_loss", "grad_norm"]
    if optimizer != "adamw":
        keys += ["win_rate", "hessian_norm"]
    for key in keys:
        assert_close_series(series(run, key), series(reference, key), f"{strategy} {key}")
    assert sorted(series(run, "train_loss")) == list(range(1, STEPS + 1))
    if optimizer != "adamw":
        assert series(reference, "hessian_norm")[STEPS] > 0, "no curvature pass ran"


def test_fsdp_with_gradient_accumulation_matches_one_process(runs):
    """FSDP over 2 ranks × 2 micro-steps of 2 sequences against one process × 2 micro-steps of 4: the
    parameters stay gathered between the micro-steps (no reshard after a backward without gradient sync),
    which must change the traffic only, not the numbers. Wrong if a micro-step's gradient were lost or
    reduce-scattered twice. (Validation losses are not compared: the validation set is counted in
    micro-batches, so a smaller micro-batch evaluates fewer sequences.)"""
    reference = runs("adamw-single")
    runs.run("adamw-fsdp-accum", 2, overrides(runs.data_dir, "adamw", "fsdp", "train.micro_batch_size=2"))
    run = runs.root / "adamw-fsdp-accum" / "run"
    assert "accumulation 2 × world 2" in (run / "plan.txt").read_text()
    for key in ("train_loss", "grad_norm"):
        assert_close_series(series(run, key), series(reference, key), f"fsdp accumulation {key}")


@pytest.mark.parametrize("optimizer", [*OPTIMIZER_OVERRIDES, *BASELINE_OVERRIDES])
def test_ddp_is_bit_identical_to_one_process(runs, optimizer):
    """AdamW, Sophia-G, Muon, schedule-free AdamW and SOAP (what README's "DDP is bit-identical to one
    process" names): DDP's averaged gradient equals one process's accumulated one bit for bit (see the
    module docstring), and each optimizer's step is a function of that gradient alone, so every training
    loss, gradient norm and curvature statistic, and the final checkpoint's weights and optimizer state are
    identical. Validation losses add the ranks' batch losses in another order: within 1e-6 relative. Wrong if
    an update depended on the rank (a local statistic, a per-rank Newton-Schulz or eigenbasis, a curvature
    estimate from one rank's batch), or schedule-free evaluated or saved other weights on a rank."""
    reference, run = runs(f"{optimizer}-single"), runs(f"{optimizer}-ddp")
    for key in ("train_loss", "grad_norm", "win_rate", "hessian_norm"):
        assert series(run, key) == series(reference, key), key
    val, reference_val = series(run, "val_loss"), series(reference, "val_loss")
    assert sorted(val) == [0, 4, 8]
    assert all(math.isclose(val[s], reference_val[s], rel_tol=1e-6) for s in val), (val, reference_val)
    final = [torch.load(r / "checkpoints" / f"step_{STEPS:08d}" / "state.pt", weights_only=True)
             for r in (run, reference)]
    for name, tensor in final[1]["model"].items():
        assert torch.equal(final[0]["model"][name], tensor), name
    for index, state in final[1]["optimizer"]["state"].items():
        for key, value in state.items():
            other = final[0]["optimizer"]["state"][index][key]
            assert torch.equal(other, value) if torch.is_tensor(value) else other == value, (index, key)


def test_schedule_free_fsdp_resume_matches_the_straight_run(runs):
    """Schedule-free under FSDP, stopped at step 4 (an evaluation and a sharded checkpoint of the evaluation
    weights) and resumed: bit-identical to the straight FSDP run. Wrong if the sharded load found no state
    to fill (torch.distributed.checkpoint skips an optimizer it believes initialised) or did not switch the
    loaded weights back to the training iterate."""
    straight, resumed = runs("adamw_schedulefree-fsdp"), runs.resumed("adamw_schedulefree-fsdp")
    for key in ("train_loss", "val_loss"):
        assert series(resumed, key) == series(straight, key), key


def test_ddp_resume_matches_the_straight_run(runs):
    """Same ranks, same operations: a run stopped at step 4 and resumed is bit-identical to the straight run
    (Sophia's curvature passes at steps 2, 4, 6 included). Wrong if any state is missing from the checkpoint
    or any draw depends on the process's history."""
    straight, resumed = runs("sophia_g-ddp"), runs.resumed("sophia_g-ddp")
    for key in ("train_loss", "val_loss", "win_rate"):
        assert_same_numbers(series(resumed, key), series(straight, key), key)


def test_fsdp_checkpoint_resumes_and_exports_to_one_file(runs, tmp_path):
    """Sharded (torch.distributed.checkpoint) save and load: the resumed run is bit-identical to the straight
    one. The export merges the shards into one file whose weights load into a fresh GPT and equal those of
    the one-process run up to the FSDP tolerance, and exactly those the evaluation tools load. Wrong if a
    shard is lost or misplaced, or a key renamed."""
    straight, resumed = runs("adamw-fsdp"), runs.resumed("adamw-fsdp")
    assert_same_numbers(series(resumed, "train_loss"), series(straight, "train_loss"))
    assert [p.name for p in (straight / "checkpoints" / f"step_{STEPS:08d}" / "sharded").iterdir()
            if p.suffix == ".distcp"], "no shard files"
    # Each rank hashed its own files (step 4 in the background, step 8 not): the manifest must still list
    # every file with its size and a SHA-256 equal to one computed here.
    for step in (STEPS // 2, STEPS):
        directory = straight / "checkpoints" / f"step_{step:08d}"
        listed = json.loads((directory / "manifest.json").read_text())["files"]
        files = {str(p.relative_to(directory)): p for p in directory.rglob("*")
                 if p.is_file() and p.name != "manifest.json"}
        assert listed.keys() == files.keys(), step
        for name, path in files.items():
            assert listed[name] == {"bytes": path.stat().st_size,
                                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}, name

    exported = tmp_path / "model.pt"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "export_checkpoint.py"), str(straight),
                             "--out", str(exported), "--model-only"], env=environment(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    model = GPT(GPTConfig(**TINY))
    model.load_state_dict(torch.load(exported, weights_only=True))  # strict: every key, every shape
    single = torch.load(runs("adamw-single") / "checkpoints" / f"step_{STEPS:08d}" / "state.pt",
                        weights_only=True)["model"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, single[name], rtol=0, atol=1e-5, msg=name)
    evaluated = load_checkpoint(straight).model.state_dict()  # what the evaluation tools read
    assert all(torch.equal(evaluated[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("target", ["single", "ddp"])
def test_fsdp_checkpoint_resumes_resharded_as_one_process_or_ddp(runs, target):
    """The straight FSDP run on 2 ranks, its step-8 checkpoint removed, resumed as one process (e.g. a
    smaller allocation) or as DDP from its step-4 checkpoint (written in the background while step 5 trained):
    torch.distributed.checkpoint reshards the saved shards to the new layout, and steps 5-8 match the
    straight FSDP run within the FSDP tolerance. Wrong if the resume is refused, loses a shard or the
    optimizer state (the losses after step 4 would drift far beyond 1e-5), or the background save wrote
    state of a later step than its own."""
    key = f"adamw-fsdp-then-{target}"
    straight = runs("adamw-fsdp")
    shutil.copytree(straight, runs.root / key / "run")
    shutil.rmtree(runs.root / key / "run" / "checkpoints" / f"step_{STEPS:08d}")
    output = runs.run(key, 1 if target == "single" else 2, overrides(runs.data_dir, "adamw", target))
    assert "(step 4)" in output and "resumed from" in output, output[-3000:]
    run = runs.root / key / "run"
    for key_name in ("train_loss", "val_loss", "grad_norm"):
        assert_close_series(series(run, key_name), series(straight, key_name), f"{target} {key_name}")


def test_killed_worker_restarts_from_the_last_checkpoint(runs):
    """SIGKILL one worker after the first checkpoint (written in the background, `train.async_checkpoint`):
    torchrun (--max-restarts=1) restarts both, they resume from that checkpoint, and the finished job's
    losses equal the straight run's (synchronous saves) exactly."""
    straight = runs("sophia_g-ddp")
    args = overrides(runs.data_dir, "sophia_g", "ddp", "train.ckpt_interval=2", "train.async_checkpoint=true")
    process = runs.launch("sophia_g-ddp-killed", 2, args, restarts=1)
    run = runs.root / "sophia_g-ddp-killed" / "run"
    deadline = time.monotonic() + 300
    while not list((run / "checkpoints").glob("step_[0-9]*[0-9]/manifest.json")):  # renamed: complete
        assert process.poll() is None and time.monotonic() < deadline, failure(process.communicate()[0])
        time.sleep(0.01)
    workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, failure(output)
    assert "resumed from" in output, "the restarted workers did not resume from a checkpoint"
    for key in ("train_loss", "val_loss", "win_rate"):
        assert_same_numbers(series(run, key), series(straight, key), key)
    steps = [r["step"] for r in records(run)]
    assert steps == sorted(set(steps)), "duplicated records after the restart"


@pytest.mark.parametrize("name", ["adamw-ddp", "adamw-fsdp"])
def test_one_run_directory_written_by_rank_0_only(runs, name):
    """Every rank runs Hydra; the job must leave exactly one run directory (no per-rank copies, no
    outputs/, no .hydra/), and its files must be written once (rank 0), not once per rank."""
    run = runs(name)
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl",
                                                       "plan.txt", "train.log"]
    steps = [r["step"] for r in records(run)]
    assert steps == [0, *range(1, STEPS + 1)], steps
    log = (run / "train.log").read_text()
    assert log.count("world size: 2") == 1 and log.count(f"step {STEPS}/{STEPS} |") == 1


def test_batch_that_does_not_split_over_the_ranks_is_a_one_line_error(runs, tmp_path):
    """global_batch_size=6 with micro_batch_size=2 on 2 ranks: every rank stops before the rendezvous with
    exit code 2 and the one-line message, no traceback of ours. torchrun then reports the workers' exit code
    2 (and, being torchrun, its own ChildFailedError summary); a rank started directly exits 2 with exactly
    one line on stderr."""
    bad = ["experiment=quickstart", f"data.dir={runs.data_dir}", "train.global_batch_size=6",
           "train.micro_batch_size=2", "out_dir=run"]
    message = "error: train.global_batch_size=6 is not divisible by train.micro_batch_size=2 × world size 2"
    launched = subprocess.run(command(2, *bad), cwd=tmp_path, env=environment(), capture_output=True,
                              text=True, timeout=300)
    assert launched.returncode != 0
    assert message in launched.stderr and "exitcode  : 2" in launched.stderr, launched.stderr[-3000:]
    assert "gpt/" not in launched.stderr and "train.py\", line" not in launched.stderr

    one_rank = subprocess.run(command(1, *bad), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env=dict(environment(), WORLD_SIZE="2", RANK="1", LOCAL_RANK="1"))
    assert one_rank.returncode == 2
    assert one_rank.stderr.strip().splitlines() == [one_rank.stderr.strip()]
    assert one_rank.stderr.startswith(message), one_rank.stderr


def test_error_found_by_rank_0_alone_stops_every_rank(runs, tmp_path):
    """Two ranks started directly, as srun starts them (no torchrun to tear the job down), with an out_dir
    that holds another experiment. Only rank 0 reads the run directory; it must hand its error to rank 1,
    which would otherwise wait in DDP's first broadcast for the 30-minute collective timeout. Both exit 2
    within seconds, and the message is printed once (by rank 0)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("optim:\n  name: lion\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [
        subprocess.Popen(command(1, *overrides(runs.data_dir, "adamw", "ddp"), "out_dir=run"), cwd=tmp_path,
                         env=dict(environment(), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    try:
        (_, rank0_err), (_, rank1_err) = (rank.communicate(timeout=120) for rank in ranks)
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [2, 2], rank0_err[-2000:] + rank1_err[-2000:]
    assert re.match(r"error: out_dir \S*run holds a different experiment \(", rank0_err), rank0_err
    assert "optim.name: 'lion' -> 'adamw'" in rank0_err and rank0_err.count("\n") == 1
    assert rank1_err == ""


def test_multirun_under_torchrun_runs_every_job_like_a_fresh_launch(runs):
    """`torchrun ... train.py -m` runs its jobs one after another in the same two workers. A second
    rendezvous in torchrun's agent store would hang, so the second job must reuse the process group the
    first left up, and train exactly as a fresh launch does: the 8-step job's losses equal the adamw-ddp run's
    bit for bit. TORCH_DISABLE_SHARE_RDZV_TCP_STORE is unset here; with it, re-rendezvous would work."""
    cwd = runs.root / "multirun"
    cwd.mkdir()
    args = [a for a in overrides(runs.data_dir, "adamw", "ddp") if not a.startswith("train.max_steps=")]
    env = environment()
    del env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
    result = subprocess.run(torchrun(REPO / "train.py", "-m", *args, "train.max_steps=4,8",
                                     "out_dir=run${train.max_steps}"),
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + failure(result.stderr)
    straight = series(runs("adamw-ddp"), "train_loss")
    assert series(cwd / "run8", "train_loss") == straight
    assert series(cwd / "run4", "train_loss") == {step: straight[step] for step in range(1, 5)}


def test_every_optimizer_matches_the_unsharded_one(tmp_path):
    """Each registered optimizer, stepping FSDP2-sharded (DTensor) parameters, against itself on an unsharded
    copy (see fsdp_optimizers_check.py beside this file): parameters within 2e-5 after 3 steps of lr 1e-3
    (measured ≤ 2.6e-6, Sophia-H, whose ratio divides by small random curvature; a per-tensor statistic taken
    over one shard, or a sign flipped by a wrong reduction, moves a coordinate by ~lr = 1e-3), and per-step
    gradient norm, win rate and curvature norm within 1e-5 relative (measured ≤ 2.5e-7)."""
    report_path, checkpoints = tmp_path / "report.json", tmp_path / "checkpoints"
    checkpoints.mkdir()
    script = REPO / "tests" / "integration" / "fsdp_optimizers_check.py"
    result = subprocess.run(torchrun(script, str(report_path), str(checkpoints)), env=environment(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, failure(result.stderr)
    report = json.loads(report_path.read_text())
    assert sorted(report) == sorted(name for name, entry in OPTIMIZERS.items() if entry.shards)
    for name, numbers in report.items():
        assert numbers["param_max_abs_change"] > 1e-3, f"{name} did not move"
        assert numbers["param_max_abs_diff"] <= 2e-5, (name, numbers)
        assert numbers["diagnostics_max_rel_diff"] <= 1e-5, (name, numbers)


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_exception_on_one_rank_ends_the_job_within_seconds(runs, tmp_path, failing_rank):
    """An exception on one rank mid-step (between its micro-steps, while the other rank waits in the
    backward's all-reduce): the whole torchrun job must end within seconds, not after the 30-minute
    collective timeout, with the error's traceback shown once; the other rank says in one line why it
    stopped. Wrong if the failing rank entered a collective on its way out (a barrier the others never
    reach), or if every rank printed a traceback. Rank 0 also hosts the process group's store."""
    stamp = tmp_path / "failed_at"
    args = [*overrides(runs.data_dir, "adamw", "ddp", "train.global_batch_size=16"), "out_dir=run"]
    env = dict(environment(), FAIL_RANK=str(failing_rank), FAIL_STEP="3", FAIL_STAMP=str(stamp))
    script = REPO / "tests" / "integration" / "fail_on_one_rank.py"
    process = subprocess.Popen(torchrun(script, *args), cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=150)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and its workers, if they hang
    ended = time.time()
    assert stamp.exists(), output[-3000:]
    assert process.returncode != 0
    assert ended - float(stamp.read_text()) < 30, f"the job took {ended - float(stamp.read_text()):.0f} s"
    assert output.count(f"RuntimeError: injected failure on rank {failing_rank}") == 1, output[-3000:]
    ours = [t for t in output.split("Traceback (most recent call last)") if 'fail_on_one_rank.py", line' in t]
    assert len(ours) == 1, output[-3000:]  # torchrun's own ChildFailedError traceback aside
    assert f"rank {1 - failing_rank}: stopped because another rank failed" in output, output[-3000:]
    root_cause = output.split("Root Cause")[1][:600]
    assert f"local_rank: {failing_rank})" in root_cause, "torchrun blames another rank"

