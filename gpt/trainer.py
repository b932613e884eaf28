"""The training loop: build everything from a validated config, resume if a checkpoint exists, train.

Read top to bottom: setup (runtime, data, model, optimizer, resume), then per step: the curvature pass when
due, gradient accumulation, the non-finite check, clipping, the optimizer step, logging, evaluation and
checkpoints. Every random draw is derived from (seed, step, ...), and the data order is a pure function of
the step, so a resumed run continues exactly as the straight run would have.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from common.errors import UserError
from data.loader import BatchLoader, TokenData
from data.prepare import prepare, unprepared_reason
from data.split_size import validation_warning
from data.tokenizers import get_tokenizer
from gpt.checkpoint import (
    CheckpointDir,
    first_nonfinite,
    load_training_state,
    read_manifest,
    save_training_state,
)
from gpt.config import Settings, load_settings, plan_batches
from gpt.curvature_pass import CurvatureSchedule, run_curvature_pass
from gpt.device_defaults import out_of_memory_advice, resolve_device_defaults
from gpt.distributed import (
    Runtime,
    agree_on_run_dir,
    environment_world_size,
    full_value,
    gradient_sync,
    init_runtime,
    leaving_together,
    planned_device,
    wrap_model,
)
from gpt.hellaswag import PeriodicHellaSwag
from gpt.memory_check import check_memory_fits
from gpt.metrics import MetricsLog, format_line
from gpt.model import GPT, GPTConfig
from gpt.plan import describe_plan, peak_flops, training_flops_per_token
from gpt.pretrained import init_weights
from gpt.protocol import apply_protocol
from gpt.run_dir import (
    PLAN_FILE,
    check_compatible,
    check_same_data,
    discard_unstarted,
    is_empty,
    read_config,
    setup_logging,
    write_config,
)
from gpt.run_lock import holding_out_dir
from gpt.seeding import derive_seed
from optim import GroupSchedule, build_optimizer, check_run, evaluation_weights, trainer_settings

log = logging.getLogger(__name__)
SPIKE_FACTOR = 5.0  # a loss above this multiple of the recent median is recorded as a spike


def train(cfg: DictConfig, *, keep_process_group: bool = False) -> dict[str, Any]:
    """Run (or resume) the job described by a composed config; returns the final metrics record.

    `keep_process_group` leaves the process group up for the next job of a Hydra multirun in this process,
    which then joins it again (`distributed.shutdown()` ends it after the last job). Under torchrun, a
    second `init_process_group` in the same workers waits forever in the agent's rendezvous store."""
    fresh = is_empty(cfg.out_dir) and int(os.environ.get("RANK", 0)) == 0  # rank 0 tidies up
    try:
        settings = load_settings(cfg)
        world_size = environment_world_size()
        resolve_device_defaults(settings, world_size, planned_device(settings.train.device))
        # A batch that cannot be split over the ranks fails here, on every rank, before any rendezvous.
        plan_batches(settings.train, settings.model.block_size, world_size)
        runtime = init_runtime(settings.train.strategy, settings.train.device)
        settings.out_dir = agree_on_run_dir(runtime, settings.out_dir)
        with leaving_together(runtime, keep_process_group, out_of_memory_advice(settings)):
            with holding_out_dir(settings.out_dir, runtime, enabled=not settings.train.dry_run):
                result = Trainer(settings, runtime).run()
    except UserError:
        if fresh:
            discard_unstarted(cfg.out_dir)
        raise
    if fresh and settings.train.dry_run:
        discard_unstarted(cfg.out_dir)
    return result


def autocast_factory(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype == "float32":
        return contextlib.nullcontext
    torch_dtype = getattr(torch, dtype)
    return lambda: torch.autocast(device_type=device.type, dtype=torch_dtype)


class StopRequested:
    """SIGTERM/SIGINT/SIGUSR1 set a flag; the loop finishes the step, saves, then hands the signal to the
    handler that was installed before (e.g. submitit's requeue on USR1) or exits cleanly. A second Ctrl-C
    does not wait for a long step: it interrupts at once (the last checkpoint is still intact)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)

    def __enter__(self) -> StopRequested:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def hand_over(self) -> None:
        self.restore()
        handler = self.previous.get(self.signal)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signal, None)


class Trainer:
    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.s, self.rt = settings, runtime
        t = settings.train
        self.out_dir = Path(settings.out_dir)
        setup_logging(self.out_dir, runtime.is_main)
        resolve_device_defaults(settings, runtime.world_size, runtime.device)
        self.plan = plan_batches(t, settings.model.block_size, runtime.world_size)
        # the protocol's: the accumulation count (a mean), or 1 where the official AdamW script sums (the
        # summed count is recorded in the config: it defines the run)
        self.micro_loss_divisor = apply_protocol(settings, self.plan)
        self.config = asdict(settings)  # the resolved config, as written to config.yaml
        runtime.on_main(self._check_run_dir)
        if not t.dry_run:
            check_memory_fits(settings, self.plan, runtime.strategy, runtime.device)
        if runtime.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(t.seed)  # initialisation depends on the seed only: identical across optimizers
        model_config = GPTConfig(**{k: v for k, v in asdict(settings.model).items() if k != "name"})
        if t.dry_run:  # the plan needs shapes only: no memory, no initialisation, no wrapping
            with torch.device("meta"):
                self.model = GPT(model_config)
            self.wrapped = self.model
        else:
            self.model = GPT(model_config).to(runtime.device)
            if t.init_from and not CheckpointDir(self.out_dir / "checkpoints").complete_steps():
                init_weights(self.model, t.init_from)  # a resume loads its checkpoint instead
            self.wrapped = wrap_model(self.model, runtime, dtype=t.dtype,
                                      activation_checkpointing=t.activation_checkpointing)
        check_run(settings.optim, strategy=runtime.strategy, schedule=settings.schedule.name)
        self.optimizer = build_optimizer(settings.optim, self.model, self.plan.tokens_per_step)
        schedule = settings.schedule
        self.schedule = GroupSchedule(self.optimizer, schedule.name, reference_lr=settings.optim["lr"],
                                      warmup_steps=schedule.warmup_steps, decay_steps=schedule.decay_steps,
                                      min_lr=schedule.min_lr,
                                      warmup_from_zero=settings.protocol.warmup_from_zero)
        # Evaluations and checkpoints see the optimizer's evaluation weights (schedule-free: the average)
        self.evaluation_weights = lambda: evaluation_weights(self.optimizer, settings.optim)
        self.curvature = self._curvature_schedule()
        self.autocast = autocast_factory(runtime.device, t.dtype)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=t.dtype == "float16")
        self.ckpts = CheckpointDir(self.out_dir / "checkpoints", keep=t.keep_checkpoints)
        self.forward = torch.compile(self.wrapped) if t.compile else self.wrapped
        self.flops_per_token = training_flops_per_token(self.model, settings.optim, t.global_batch_size)
        self.peak = peak_flops(runtime.device, t.dtype, t.gpu)
        self.hellaswag = (PeriodicHellaSwag(t.hellaswag_interval, t.hellaswag_data, t.hellaswag_limit,
                                            get_tokenizer(settings.data["tokenizer"]))
                          if t.hellaswag_interval and not t.dry_run else None)

    def _check_run_dir(self) -> None:
        previous = read_config(self.out_dir)
        if previous is not None:
            check_compatible(previous, self.config, f"out_dir {self.out_dir}")

    def _open_loader(self) -> BatchLoader:
        d, t = self.s.data, self.s.train
        problem = unprepared_reason(d)
        if problem is not None:
            if not d.get("auto_prepare", False):
                raise UserError(problem)
            log.info("preparing %s into %s", d["name"], d["dir"])
            self.rt.on_main(lambda: prepare(d))
        data = TokenData(d["dir"], tokenizer=d["tokenizer"])
        self.rt.on_main(data.verify_sampled_blocks)
        if self.rt.is_main and (warning := validation_warning(data.meta)):
            log.warning("warning: %s", warning)
        if data.vocab_size > self.s.model.vocab_size:
            raise UserError(
                f"data in {d['dir']} uses tokenizer {data.tokenizer!r} with {data.vocab_size} tokens but "
                f"model.vocab_size={self.s.model.vocab_size}; set model.vocab_size >= {data.vocab_size}"
            )
        return BatchLoader(
            data, block_size=self.s.model.block_size, global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size, world_size=self.rt.world_size, rank=self.rt.rank,
            seed=t.seed, device=self.rt.device, vocab_limit=self.s.model.vocab_size,
        )

    def _curvature_schedule(self) -> CurvatureSchedule | None:
        kind = getattr(self.optimizer, "curvature", None)
        if kind is None:
            return None
        interval, batch_size, clip = trainer_settings(self.s.optim)
        if kind == "hutchinson" and self.rt.strategy == "fsdp":
            raise UserError(f"optim={self.s.optim['name']} needs Hessian-vector products, which FSDP cannot "
                            "run; use train.strategy=ddp")
        if kind == "hutchinson" and self.s.train.dtype == "float16":
            raise UserError(f"optim={self.s.optim['name']} cannot run its double backward in float16; "
                            "use bfloat16")
        clip_value = self.s.train.grad_clip if clip else 0.0
        return CurvatureSchedule(kind, interval, batch_size or self.s.train.global_batch_size, clip_value,
                                 getattr(self.optimizer, "requires_initial_hessian", False),
                                 self.s.train.hessian_micro_batch_size)

    # ----------------------------------------------------------------------------------------- resume

    def _resume(self) -> dict[str, Any]:
        """Load the newest complete checkpoint (rank 0 chooses, all ranks load); returns its manifest."""
        path, manifest = self.rt.on_main(self._resume_point)
        if path is None:
            return {}
        scaler = {"scaler": self.scaler.state_dict()}
        with self.evaluation_weights():  # a checkpoint holds them; leaving switches to the training weights
            extra = load_training_state(path, self.model, self.optimizer, scaler, self.rt.strategy == "fsdp",
                                        self.rt.device)
        self.scaler.load_state_dict(extra["scaler"])
        log.info("resumed from %s (step %d)", path, manifest["step"])
        return manifest

    def _resume_point(self) -> tuple[Path | None, dict[str, Any]]:
        """Run by rank 0 alone: the checkpoint to resume and its manifest, checked against this run."""
        path = self.ckpts.resume_point()
        if path is None:
            return None, {}
        manifest = read_manifest(path)
        check_compatible(manifest["config"], self.config, f"checkpoint {path}")
        check_same_data(manifest, self.loader.data.identity(), self.config, f"checkpoint {path}")
        return path, manifest

    def _save(self, step: int, elapsed: float, wandb_id: str | None, loop_state: dict[str, Any]) -> None:
        """Every rank takes part (FSDP writes a shard per rank); rank 0 seals and renames.

        A write that fails (a full disk, a quota) stops the run on every rank: the partial checkpoint is
        removed and the previous one is intact. Training on would only add steps that cannot be saved, and a
        full disk rarely empties itself; the lost work is bounded by train.ckpt_interval.
        """
        is_main = self.rt.is_main
        problem = first_nonfinite(self.model, self.optimizer)
        if not self._all_ranks(problem is None):
            last_good = self.ckpts.last_complete()
            raise UserError(f"after step {step}, {problem or 'a tensor on another rank'} is not finite: its "
                            f"checkpoint was not written. Last good checkpoint: {last_good}. A lower "
                            "optim.lr is another experiment: give it a new out_dir", echo=is_main)
        meta = {"config": self.config, "elapsed_s": elapsed, "wandb_id": wandb_id, "loop": loop_state,
                "data": self.loader.data.identity()}
        phases: list[Callable[[], object]] = [
            lambda: self.ckpts.begin(step) if is_main else None,
            lambda: save_training_state(self.ckpts.staging(step), self.model, self.optimizer,
                                        {"scaler": self.scaler.state_dict()}, self.rt.strategy == "fsdp",
                                        is_main),
            lambda: log.info("saved %s", self.ckpts.commit(step, meta)) if is_main else None,
        ]
        error: OSError | None = None
        for phase in phases:
            try:
                phase()
            except OSError as e:
                error = e
            if not self._all_ranks(error is None):  # also the barrier between the phases
                break
        else:
            return
        if is_main:
            self.ckpts.discard(step)
        cause = f"{type(error).__name__}: {error}" if error else "the write failed on another rank"
        raise UserError(f"could not write the checkpoint of step {step} ({cause}); its partial files were "
                        f"removed. Last good checkpoint: {self.ckpts.last_complete()}. Free disk space and "
                        "rerun to resume from it")

    def _stop_agreed(self, stop: StopRequested) -> bool:
        """Whether any rank was signalled to stop: a collective when distributed, no device sync alone."""
        signalled = stop.signal is not None
        return not self._all_ranks(not signalled) if self.rt.distributed else signalled

    def _all_ranks(self, ok: bool) -> bool:
        """True on every rank iff `ok` is true on every rank (a collective)."""
        failed = torch.full((), float(not ok), device=self.rt.device)  # a fill kernel: no host-to-device copy
        return self.rt.all_reduce(failed, "max").item() == 0

    # ------------------------------------------------------------------------------------------ loop

    def evaluate(self, stop: StopRequested | None = None) -> float | None:
        """The validation loss at the optimizer's evaluation weights (schedule-free: the averaged iterate);
        None if a stop signal abandoned it."""
        with self.evaluation_weights():
            return self._evaluate(stop)

    @torch.no_grad()
    def _evaluate(self, stop: StopRequested | None) -> float | None:
        """Mean loss over the fixed validation set (`train.eval_sequences` sequences), split across ranks in
        micro-batches, each weighted by its number of sequences. Every rank runs the same number of forwards
        (FSDP's all-gathers are collectives); a rank past the end repeats a batch with weight 0. A stop
        signal (on any rank) abandons it between two micro-batches: None."""
        self.model.eval()
        total = torch.zeros(2, device=self.rt.device)
        for first, count, weight in self.loader.val_schedule(self.s.train.eval_sequences):
            if stop is not None and self._stop_agreed(stop):
                log.warning("evaluation abandoned for the stop signal: its val_loss is not recorded")
                self.model.train()
                return None
            x, y = self.loader.val_batch(first, count)
            with self.autocast():
                _, loss = self.model(x, y)
            total += torch.stack([loss.float() * weight, torch.full((), weight, device=self.rt.device)])
        self.rt.all_reduce(total)
        self.model.train()
        return (total[0] / total[1]).item()

    def _downstream(self, step: int) -> dict[str, float]:
        """Downstream scores due at this evaluation (train.hellaswag_interval)."""
        if self.hellaswag is None or not self.hellaswag.due(step, self.s.train.max_steps):
            return {}
        with self.evaluation_weights():
            return self.hellaswag(self.model, self.rt, self.autocast)

    def run(self) -> dict[str, Any]:
        t, rt = self.s.train, self.rt
        plan = describe_plan(self.s, self.plan, self.model, self.optimizer, rt)
        log.info(plan)
        if rt.is_main and not t.dry_run:
            (self.out_dir / PLAN_FILE).write_text(plan + "\n")
        if t.dry_run:
            return {}
        self.loader = self._open_loader()
        if rt.is_main:
            self.ckpts.remove_partial()
        state = self._resume()
        start_step = state.get("step", 0)
        elapsed_before = state.get("elapsed_s", 0.0)
        if rt.is_main:
            write_config(self.out_dir, self.config)
        metrics = MetricsLog(self.out_dir, rt.is_main, resume_step=start_step)
        wandb_id = metrics.start_wandb(self.s.wandb, self.config, state.get("wandb_id"), self.out_dir)
        loop_state = state.get("loop", {})
        del state
        if start_step >= t.max_steps:
            log.info("already at step %d = train.max_steps: nothing to do", start_step)
            return {"step": start_step}

        with StopRequested() as stop:
            return self._loop(start_step, elapsed_before, metrics, wandb_id, stop, loop_state)

    def _step(self, step: int, params: list[nn.Parameter], stop: StopRequested) -> tuple[float, float, bool]:
        """Accumulate gradients of the global batch and unscale them. Returns the loss and gradient norm
        averaged over ranks, and whether any rank was signalled to stop (one collective for all three)."""
        t, rt = self.s.train, self.rt
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=rt.device)
        accum = self.plan.grad_accum_steps
        for micro in range(accum):
            x, y = self.loader.train_batch(step, micro)
            with gradient_sync(self.forward, micro == accum - 1):
                with self.autocast():
                    _, loss = self.forward(x, y)
                self.scaler.scale(loss / self.micro_loss_divisor).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(params, max_norm))  # FSDP: the global norm
        flag = torch.full((), float(stop.signal is not None), device=rt.device)  # read last: stop after it
        stats = rt.all_reduce(torch.stack([loss_sum / accum, grad_norm.float(), flag]), "mean")
        train_loss, grad_norm_value, stop_votes = stats.tolist()
        return train_loss, grad_norm_value, stop_votes > 0

    def _loop(self, start_step: int, elapsed_before: float, metrics: MetricsLog, wandb_id: str | None,
              stop: StopRequested, loop_state: dict[str, Any]) -> dict[str, Any]:
        """`loop_state` (saved with each checkpoint) carries the spike window and the skip streak across a
        resume, so a resumed run flags and stops exactly where the straight run would."""
        t, rt = self.s.train, self.rt
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        tokens_per_step = self.plan.tokens_per_step
        recent_losses: deque[float] = deque(loop_state.get("recent_losses", []), maxlen=100)
        skipped_in_row = loop_state.get("skipped_in_row", 0)
        clipped_count = interval_steps = 0
        hessian_time = None
        run_start = interval_start = time.perf_counter()
        record: dict[str, Any] = {}
        if start_step == 0:
            val_loss = self.evaluate(stop)
            if val_loss is None:
                log.info("stopped during the evaluation of step 0: nothing trained, nothing to save")
                stop.hand_over()
                return {}
            record = {"step": 0, "tokens": 0, "val_loss": val_loss, "elapsed_s": 0.0, **self._downstream(0)}
            metrics.write(record)
            log.info(format_line(record))

        for step in range(start_step, t.max_steps):
            torch.manual_seed(derive_seed(t.seed, "step", step, rt.rank))  # dropout: a function of the step
            lr = self.schedule.apply(step)  # each group's own base rate × the schedule's factor
            if self.curvature is not None and self.curvature.due(step):
                hessian_time = run_curvature_pass(self.curvature, self.forward, self.optimizer, self.loader,
                                                  step, t.seed, rt, self.autocast, self.scaler)
            train_loss, grad_norm, stopping = self._step(step, params, stop)
            done = step + 1

            # fp16: the scaler detects non-finite gradients itself and skips the step, lowering its scale
            finite = math.isfinite(train_loss) and math.isfinite(grad_norm)
            skipped = not finite and not self.scaler.is_enabled()
            if skipped:
                skipped_in_row += 1
                what = "loss" if not math.isfinite(train_loss) else "gradient norm"
                message = f"non-finite {what} in step {done} (loss {train_loss}, grad norm {grad_norm})"
                if t.on_nonfinite == "stop" or skipped_in_row >= t.max_skipped:
                    why = ("train.on_nonfinite=stop; train.on_nonfinite=skip would skip such steps"
                           if t.on_nonfinite == "stop" else f"{skipped_in_row} in a row = train.max_skipped")
                    raise UserError(f"{message}: stopped before its update ({why}), nothing saved. Last good "
                                    f"checkpoint: {self.ckpts.last_complete()}. A lower optim.lr is another "
                                    "experiment: give it a new out_dir")
                log.warning("%s: update skipped (%d in a row)", message, skipped_in_row)
            else:
                skipped_in_row = 0
                self.scaler.step(self.optimizer)
                self.scaler.update()
            clipped = not skipped and t.grad_clip > 0 and grad_norm > t.grad_clip
            clipped_count += clipped
            interval_steps += 1

            spike = (not skipped and len(recent_losses) >= 10
                     and train_loss > SPIKE_FACTOR * statistics.median(recent_losses))
            if not skipped:
                recent_losses.append(train_loss)
            is_eval = done % t.eval_interval == 0 or done == t.max_steps
            if is_eval or spike or skipped or done % t.log_interval == 0:
                now = time.perf_counter()
                tokens_per_sec = interval_steps * tokens_per_step / max(now - interval_start, 1e-9)
                record = {
                    "step": done, "tokens": done * tokens_per_step, "train_loss": train_loss, "lr": lr,
                    "grad_norm": grad_norm, "clipped": bool(clipped),
                    "clip_fraction": clipped_count / interval_steps, "tokens_per_sec": tokens_per_sec,
                    "mfu": (self.flops_per_token * tokens_per_sec / (self.peak * rt.world_size)
                            if self.peak else None),
                    "elapsed_s": elapsed_before + now - run_start,
                }
                if spike:
                    record["loss_spike"] = True
                if skipped:
                    record["skipped_update"] = True
                    record["skipped_in_row"] = skipped_in_row
                if hasattr(self.optimizer, "win_rate"):
                    record["win_rate"] = self.optimizer.win_rate()
                    record["hessian_norm"] = self.optimizer.hessian_norm()
                    record["hessian_time_s"] = hessian_time
                if is_eval:
                    val_loss = self.evaluate(stop)
                    stopping = stopping or val_loss is None  # abandoned for a stop: save and go
                    if val_loss is not None:
                        record["val_loss"] = val_loss
                        record.update(self._downstream(done))
                metrics.write(record)
                log.info(format_line(record))
                interval_start, interval_steps, clipped_count = time.perf_counter(), 0, 0

            if done % t.ckpt_interval == 0 or done == t.max_steps or stopping:
                with self.evaluation_weights():  # what a checkpoint holds (schedule-free: the average)
                    self._save(done, elapsed_before + time.perf_counter() - run_start, wandb_id,
                               {"recent_losses": list(recent_losses), "skipped_in_row": skipped_in_row})
            if stopping:
                name = signal.Signals(stop.signal).name if stop.signal else "a signal on another rank"
                log.info("stopped by %s after step %d, checkpoint saved: rerun to resume", name, done)
                stop.hand_over()
                break

        metrics.close()
        if rt.is_main:
            log.info("run directory: %s (metrics.jsonl, train.log, checkpoints/)", self.out_dir)
        return record
