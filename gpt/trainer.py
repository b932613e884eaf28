"""The training loop: build everything from a validated config, resume if a checkpoint exists, train.

`train` takes the run directory (its lock first: `gpt.run_dir`) before anything is decided or written there.
`Trainer._loop` reads top to bottom: per step the learning rate, the curvature pass when due, gradient
accumulation (`_step`), the update policy (`_update`: the optimizer step, or a skip or stop on a non-finite
loss), the metrics record (`_record`) with an evaluation when due, and a checkpoint when the checkpoint
component says one is due. The loop's own state (`gpt.loop_state.LoopState`, the metrics window included) is
one more stateful part of the checkpoint. Every random draw is derived from (seed, step, ...), and the data
order is a pure function of the step, so a resumed run continues exactly as the straight run would have.
Stop signals are honoured within `train.stop_grace_s` (`gpt.stop_signal`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig

from common.errors import UserError
from data.loader import BatchLoader, TokenData
from data.prepare import prepare, unprepared_reason
from data.split_size import validation_warning
from data.tokenizers import get_tokenizer
from gpt.checkpoint import CheckpointDir
from gpt.checkpoint.checkpointer import Checkpointer
from gpt.config import BatchPlan, Settings
from gpt.curvature_pass import CurvatureSchedule, run_curvature_pass
from gpt.device_defaults import check_memory_fits, out_of_memory_advice
from gpt.distributed import (
    Runtime,
    agree_on_run_dir,
    autocast_factory,
    full_value,
    gradient_sync,
    init_runtime,
    leaving_together,
    planned_device,
    wrap_model,
)
from gpt.eval.hellaswag import PeriodicHellaSwag
from gpt.eval.pretrained import init_weights
from gpt.loop_state import LoopState
from gpt.memory import meta_model
from gpt.metrics import MetricsLog, format_line
from gpt.model import GPT
from gpt.plan import describe_plan, peak_flops, training_flops_per_token
from gpt.protocol import micro_loss_divisor
from gpt.run_dir import RunDirectory, disk_error, is_empty, read_config, remove_if_empty
from gpt.run_identity import check_compatible
from gpt.run_paths import with_resolved_identity_paths
from gpt.seeding import derive_seed
from gpt.settings import load_settings
from gpt.step_probe import CpuEstimate, cpu_estimate, probe_shape, time_micro_step
from gpt.stop_signal import StopRequested, measured_cpu_flops, step_time_warning
from optim import (
    GroupSchedule,
    build_optimizer,
    check_run,
    evaluation_weights,
    optimized_parameters,
    trainer_settings,
)

log = logging.getLogger(__name__)
__all__ = ["LoopState", "StopRequested", "Trainer", "train"]


def train(cfg: DictConfig, *, keep_process_group: bool = False) -> dict[str, Any]:
    """Run (or resume) the job described by a composed config; returns the final metrics record.

    `keep_process_group` leaves the process group up for the next job of a Hydra multirun in this process,
    which then joins it again (`distributed.shutdown()` ends it after the last job). Under torchrun, a
    second `init_process_group` in the same workers waits forever in the agent's rendezvous store.

    A job that fails (or a dry run) removes the `out_dir` it found empty (Hydra creates it before the job),
    if it is still empty: the files this job created there are already gone (`RunDirectory`), and a
    directory another run has written into is never removed."""
    found_empty = int(os.environ.get("RANK", 0)) == 0 and is_empty(cfg.out_dir)  # rank 0 tidies up
    try:
        # Every rule is checked here, on every rank, before any rendezvous (e.g. a batch that cannot be split
        # over the ranks), and so is a plan that cannot fit the memory of this machine at all.
        settings, plan = load_settings(cfg)
        if not settings.train.dry_run:
            check_memory_fits(settings, plan, planned_device(settings.train.device))
        runtime = init_runtime(settings.train.strategy, settings.train.device)
        out_dir = agree_on_run_dir(runtime, settings.out_dir)
        with leaving_together(runtime, keep_process_group, out_of_memory_advice(settings)):
            with RunDirectory(out_dir, runtime, lock=not settings.train.dry_run) as run_dir:
                result = Trainer(settings, runtime, plan, run_dir).run()
    except BaseException:
        if found_empty:
            remove_if_empty(cfg.out_dir)
        raise
    if found_empty and settings.train.dry_run:
        remove_if_empty(cfg.out_dir)
    return result


@dataclass
class StepOutcome:
    """One optimizer step as the metrics record reports it."""

    lr: float
    loss: float
    grad_norm: float
    skipped: bool = False
    clipped: bool = False
    spike: bool = False


class Trainer:
    """The run's parts (model, optimizer, schedule, curvature schedule, scaler, loop state, checkpoints)
    built from validated settings before any data work; `run()` opens the data, resumes and trains."""

    def __init__(self, settings: Settings, runtime: Runtime, plan: BatchPlan,
                 run_dir: RunDirectory | None = None) -> None:
        """`run_dir`: the run directory all ranks agreed on, held (default: `settings.out_dir`, not held,
        for a dry run)."""
        t = settings.train
        self.run_dir = run_dir or RunDirectory(settings.out_dir, runtime, lock=False)
        self.out_dir = self.run_dir.path
        self.run_dir.start_logging()
        self.settings, self.runtime, self.plan = settings, runtime, plan
        # the protocol's: the accumulation count (a mean), or 1 where the official AdamW script sums
        self.micro_loss_divisor = micro_loss_divisor(settings.protocol, settings.optim["name"], plan)
        self.config = settings.record()  # the resolved config, as written to config.yaml
        runtime.on_main(self._check_run_dir)
        if runtime.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(t.seed)  # initialisation depends on the seed only: identical across optimizers
        if t.dry_run:  # the plan needs shapes only: no memory, no initialisation, no wrapping
            self.model = self.wrapped = meta_model(settings.model)
        else:
            self.model = GPT(settings.model).to(runtime.device)
            if t.init_from and not CheckpointDir(self.out_dir / "checkpoints").complete_steps():
                init_weights(self.model, t.init_from)  # a resume loads its checkpoint instead
            self.wrapped = wrap_model(self.model, runtime, dtype=t.dtype,
                                      activation_checkpointing=t.activation_checkpointing)
        check_run(settings.optim, strategy=runtime.strategy, schedule=settings.schedule.name)
        self.optimizer = build_optimizer(settings.optim, self.model, self.plan.tokens_per_step)
        self.params = optimized_parameters(self.optimizer)
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
        self.state = LoopState()
        self.checkpoints = Checkpointer(
            self.out_dir / "checkpoints", runtime, self.config, interval=t.ckpt_interval,
            keep=t.keep_checkpoints, max_steps=t.max_steps,
            states={"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler},
            records={"loop": self.state}, evaluation_weights=self.evaluation_weights,
            async_saves=bool(t.async_checkpoint))
        self.forward = torch.compile(self.wrapped) if t.compile else self.wrapped
        self.flops_per_token = training_flops_per_token(self.model, settings.optim, t.global_batch_size)
        self.peak = peak_flops(runtime.device, t.dtype, t.gpu)
        self.hellaswag = (PeriodicHellaSwag(t.hellaswag_interval, t.hellaswag_data, t.hellaswag_limit,
                                            get_tokenizer(settings.data["tokenizer"]))
                          if t.hellaswag_interval and not t.dry_run else None)

    def _check_run_dir(self) -> None:
        previous = read_config(self.out_dir)
        if previous is not None:
            recorded = with_resolved_identity_paths(previous, self.out_dir)
            check_compatible(recorded, self.config, f"out_dir {self.out_dir}")

    def _open_loader(self) -> BatchLoader:
        d, runtime, vocab_size = self.settings.data, self.runtime, self.settings.model.vocab_size
        problem = unprepared_reason(d)
        if problem is not None:
            if not d.get("auto_prepare", False):
                raise UserError(problem)
            log.info("preparing %s into %s", d["name"], d["dir"])
            runtime.on_main(lambda: prepare(d))
        data = TokenData(d["dir"], tokenizer=d["tokenizer"])
        runtime.on_main(data.verify_sampled_blocks)
        if runtime.is_main and (warning := validation_warning(data.meta)):
            log.warning("warning: %s", warning)
        if data.vocab_size > vocab_size:
            raise UserError(
                f"data in {d['dir']} uses tokenizer {data.tokenizer!r} with {data.vocab_size} tokens but "
                f"model.vocab_size={vocab_size}; set model.vocab_size >= {data.vocab_size}"
            )
        return BatchLoader(data, self.plan, rank=runtime.rank, seed=self.settings.train.seed,
                           device=runtime.device, vocab_limit=vocab_size)

    def _curvature_schedule(self) -> CurvatureSchedule | None:
        kind = getattr(self.optimizer, "curvature", None)
        if kind is None:
            return None
        interval, _, clip = trainer_settings(self.settings.optim)
        return CurvatureSchedule(kind, interval, self.plan.hessian_batch_size,
                                 self.settings.train.grad_clip if clip else 0.0,
                                 getattr(self.optimizer, "requires_initial_hessian", False),
                                 self.plan.hessian_micro_batch_size)

    # ------------------------------------------------------------------------------------- evaluation

    def evaluate(self, stop: StopRequested | None = None) -> float | None:
        """The validation loss at the optimizer's evaluation weights (schedule-free: the averaged iterate);
        None if a stop signal abandoned it."""
        with self.evaluation_weights():
            return self._evaluate(stop)

    def _validation_batches(self) -> Iterator[tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], float]]:
        """This rank's validation micro-batches (each a loader call) and their weights (0: a repeat that keeps
        the ranks' forwards matched): the fixed set of `train.eval_sequences` sequences, or, where
        `protocol.eval_batches` asks for the official estimate, that many micro-batches of fresh windows
        drawn for this step, whose mean over all ranks is the mean of the batch means."""
        loader, batches, step = self.loader, self.settings.protocol.eval_batches, self.state.step
        if batches:
            weight = float(self.plan.micro_batch_size)
            for index, counts in loader.rank_share(batches):
                yield partial(loader.sampled_val_batch, step, index, batches), weight if counts else 0.0
        else:
            for first, count, weight in loader.val_schedule(self.settings.train.eval_sequences):
                yield partial(loader.val_batch, first, count), weight

    @torch.no_grad()
    def _evaluate(self, stop: StopRequested | None) -> float | None:
        """Mean loss over the validation sequences (`_validation_batches`), split across ranks in
        micro-batches, each weighted by its number of sequences. Every rank runs the same number of forwards
        (FSDP's all-gathers are collectives); a rank past the end repeats a batch with weight 0. A stop
        signal (on any rank) abandons it between two micro-batches: None."""
        self.model.eval()
        total = torch.zeros(2, device=self.runtime.device)
        for batch, weight in self._validation_batches():
            if stop is not None and self._stop_agreed(stop):
                log.warning("evaluation abandoned for the stop signal: a rerun evaluates this step again")
                self.model.train()
                return None
            x, y = batch()
            with self.autocast():
                _, loss = self.model(x, y)
            total += torch.stack([loss.float() * weight, torch.full((), weight, device=self.runtime.device)])
        self.runtime.all_reduce(total)
        self.model.train()
        return (total[0] / total[1]).item()

    def _downstream(self, step: int) -> dict[str, float]:
        """Downstream scores due at this evaluation (train.hellaswag_interval)."""
        if self.hellaswag is None or not self.hellaswag.due(step, self.settings.train.max_steps):
            return {}
        with self.evaluation_weights():
            return self.hellaswag(self.model, self.runtime, self.autocast)

    def _evaluations(self, stop: StopRequested) -> dict[str, float] | None:
        """The validation loss and the downstream scores due after `self.state.step` steps; None if a stop
        signal abandoned the evaluation."""
        val_loss = self.evaluate(stop)
        return None if val_loss is None else {"val_loss": val_loss, **self._downstream(self.state.step)}

    def _stop_agreed(self, stop: StopRequested) -> bool:
        """Whether any rank was signalled to stop: a collective when distributed, no device sync alone. Once
        agreed, the loop acts on the stop, and its watchdog stands down."""
        signalled = stop.signal is not None
        agreed = not self.runtime.all_ranks(not signalled) if self.runtime.distributed else signalled
        if agreed:
            stop.honoured()
        return agreed

    # ------------------------------------------------------------------------------------------ loop

    def run(self) -> dict[str, Any]:
        t, rt = self.settings.train, self.runtime
        plan = describe_plan(self.settings, self.plan, self.model, self.optimizer, rt, self._cpu_estimate())
        log.info(plan)
        if t.dry_run:
            return {}
        if rt.is_main and (warning := self._step_time_warning()):
            log.warning(warning)
        with StopRequested(t.stop_grace_s, self._abandon) as stop:
            stop.busy("the start of the run (data, resume)")
            self.loader = self._open_loader()
            self.checkpoints.data_identity = self.loader.data.identity()
            self.checkpoints.resume()
            state = self.state
            metrics = MetricsLog(self.out_dir, rt.is_main)
            # wandb before the directory holds a run: a wandb that cannot start leaves no half-made run
            self.run_dir.note_creation(self.out_dir / "wandb")
            state.wandb_id = rt.on_main(lambda: metrics.start_wandb(self.settings.wandb, self.config,
                                                                    state.wandb_id))
            self.run_dir.start(self.config, plan)
            rt.on_main(lambda: self._cut_back(metrics))
            # this session's first record: step 0's, the pending one of the checkpoint's step, or the next
            first = state.step + (state.step > 0 and state.pending_record is None)
            rt.on_main(lambda: metrics.start_files(self.settings, first))
            if state.step >= t.max_steps and state.pending_record is None:
                log.info("already at step %d = train.max_steps: nothing to do", state.step)
                return {"step": state.step}
            record = self._loop(metrics, stop)
        metrics.close()
        if rt.is_main:
            log.info("run directory: %s (metrics.jsonl, train.log, checkpoints/)", self.out_dir)
        return record

    def _cpu_estimate(self) -> CpuEstimate | None:
        """The plan's time on this CPU, from micro-steps of the model timed now; None off the CPU, in a dry
        run (no weights) and under FSDP (sharded weights)."""
        t, plan = self.settings.train, self.plan
        if self.runtime.device.type != "cpu" or t.dry_run or self.runtime.strategy == "fsdp":
            return None
        sequences, length = probe_shape(plan.micro_batch_size, plan.block_size)
        probe_s = time_micro_step(self.model, sequences, length, self.runtime.device, self.autocast)
        flops = self.model.flops_per_token
        micro_step_s = probe_s * (plan.micro_batch_size * plan.block_size * flops(plan.block_size)
                                  / (sequences * length * flops(length)))
        return cpu_estimate(micro_step_s, grad_accum_steps=plan.grad_accum_steps,
                            micro_batch_size=plan.micro_batch_size,
                            compute_factor=self.flops_per_token / self.model.flops_per_token(),
                            max_steps=t.max_steps, eval_interval=t.eval_interval,
                            eval_sequences=t.eval_sequences)

    def _step_time_warning(self) -> str | None:
        """Whether one step will outlast what a stop signal waits for: the plan's FLOPs per rank at the GPU's
        peak × train.assumed_mfu, or at a matmul rate measured on this CPU (both optimistic)."""
        t = self.settings.train
        rate = self.peak * t.assumed_mfu if self.peak else measured_cpu_flops()
        flops = self.flops_per_token * self.plan.tokens_per_step / self.runtime.world_size
        return step_time_warning(flops, rate, t.stop_grace_s, t.log_interval)

    def _cut_back(self, metrics: MetricsLog) -> None:
        """metrics.jsonl back to the checkpoint's step (rank 0)."""
        try:
            metrics.resume(self.state.step, record_pending=self.state.pending_record is not None)
        except OSError as e:
            raise disk_error(metrics.path, e, "cut back") from None

    def _abandon(self, why: str, status: int) -> None:
        """End the run from the stop watchdog's thread while the main thread is still inside a step or an
        evaluation: one line with the checkpoint a rerun resumes from, the lock released, logs flushed."""
        if self.runtime.is_main:
            done = self.checkpoints.dir.complete_steps()
            resume = (f"rerun to resume from {self.checkpoints.dir.last_complete()}" if done
                      else "rerun to start over")
            log.warning("%s; nothing of it is saved: %s", why, resume)
            self.run_dir.release()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    def _loop(self, metrics: MetricsLog, stop: StopRequested) -> dict[str, Any]:
        """Train from `self.state.step` to train.max_steps (or a stop); returns the last metrics record."""
        t, state, rank = self.settings.train, self.state, self.runtime.rank
        state.start_clock()
        record, hessian_time = {}, None
        if self._stop_agreed(stop):  # signalled while the run started
            stop.hand_over(f"before step {state.step + 1}: nothing new to save")
            return record
        if state.pending_record is not None or state.step == 0:
            stop.busy(f"the evaluation of step {state.step}")
            if (scores := self._evaluations(stop)) is None:
                saved = "its checkpoint is saved" if state.step else "nothing trained, nothing to save"
                stop.hand_over(f"during the evaluation of step {state.step}: {saved}")
                return {}
            # a record whose evaluation a stop abandoned is completed now (at the checkpoint's weights)
            record = {**(state.pending_record or {"step": 0, "tokens": 0}), **scores}
            record.pop("partial", None)
            if state.step == 0:
                record["elapsed_s"] = 0.0
            state.pending_record = None
            self._write(metrics, record)
        for step in range(state.step, t.max_steps):
            stop.busy(f"step {step + 1}")
            torch.manual_seed(derive_seed(t.seed, "step", step, rank))  # dropout: a function of the step
            lr = self.schedule.apply(step)  # each group's own base rate × the schedule's factor
            if self.curvature is not None and self.curvature.due(step):
                hessian_time = run_curvature_pass(self.curvature, self.forward, self.optimizer, self.loader,
                                                  step, t.seed, self.runtime, self.autocast, self.scaler)
            loss, grad_norm, stopping = self._step(step, stop)
            if stopping:
                stop.honoured()
            outcome = self._update(StepOutcome(lr, loss, grad_norm))
            is_eval = state.step % t.eval_interval == 0 or state.step == t.max_steps
            if is_eval or outcome.spike or outcome.skipped or state.step % t.log_interval == 0:
                record, scores = self._record(outcome, hessian_time), {}
                if is_eval:
                    stop.busy(f"the evaluation of step {state.step}")
                    scores = self._evaluations(stop)
                if scores is None:  # abandoned for a stop: saved to be completed by the resumed run
                    stopping, record["partial"] = True, True
                    state.pending_record = dict(record)
                record.update(scores or {})
                self._write(metrics, record)
                state.new_window()
            elif stopping:  # the window so far, marked partial: the resumed run continues the window
                record = {**self._record(outcome, hessian_time), "partial": True}
                self._write(metrics, record)
            if self.checkpoints.due(state.step, stopping):
                self.checkpoints.save(state.step, stopping)
            if stopping:
                stop.hand_over(f"after step {state.step}, checkpoint saved: rerun to resume")
                break
        return record

    def _step(self, step: int, stop: StopRequested) -> tuple[float, float, bool]:
        """Accumulate gradients of the global batch and unscale them. Returns the loss and gradient norm
        averaged over ranks, and whether any rank was signalled to stop (one collective for all three)."""
        t, rt = self.settings.train, self.runtime
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
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.params, max_norm))  # FSDP: the global norm
        flag = torch.full((), float(stop.signal is not None), device=rt.device)  # read last: stop after it
        stats = rt.all_reduce(torch.stack([loss_sum / accum, grad_norm.float(), flag]), "mean")
        train_loss, grad_norm_value, stop_votes = stats.tolist()
        return train_loss, grad_norm_value, stop_votes > 0

    def _update(self, outcome: StepOutcome) -> StepOutcome:
        """The update policy: the optimizer step, or no update for a non-finite loss or gradient norm.
        Advances the loop state by the step and fills in `outcome`'s skipped, clipped and spike."""
        state, grad_clip = self.state, self.settings.train.grad_clip
        finite = math.isfinite(outcome.loss) and math.isfinite(outcome.grad_norm)
        # fp16: the scaler detects non-finite gradients itself and skips the step, lowering its scale
        outcome.skipped = not finite and not self.scaler.is_enabled()
        if outcome.skipped:
            state.skipped_in_row += 1
            self._skip_or_stop(outcome)
        else:
            state.skipped_in_row = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
        outcome.clipped = not outcome.skipped and 0 < grad_clip < outcome.grad_norm
        outcome.spike = state.end_step(outcome.loss, outcome.skipped, outcome.clipped)
        return outcome

    def _skip_or_stop(self, outcome: StepOutcome) -> None:
        """A non-finite step: skipped with a warning (train.on_nonfinite=skip, fewer than
        train.max_skipped in a row), or the run stops before the update with nothing saved."""
        t, in_row = self.settings.train, self.state.skipped_in_row
        what = "loss" if not math.isfinite(outcome.loss) else "gradient norm"
        message = (f"non-finite {what} in step {self.state.step + 1} (loss {outcome.loss}, "
                   f"grad norm {outcome.grad_norm})")
        if t.on_nonfinite == "skip" and in_row < t.max_skipped:
            log.warning("%s: update skipped (%d in a row)", message, in_row)
            return
        why = ("train.on_nonfinite=stop; train.on_nonfinite=skip would skip such steps"
               if t.on_nonfinite == "stop" else f"{in_row} in a row = train.max_skipped")
        last_good = self.checkpoints.last_complete()
        raise UserError(f"{message}: stopped before its update ({why}), nothing saved. Last good checkpoint: "
                        f"{last_good}. A lower optim.lr is another experiment: give it a new out_dir")

    def _record(self, outcome: StepOutcome, hessian_time: float | None) -> dict[str, Any]:
        """The metrics record of the step just finished; its windowed values (clip fraction, throughput)
        cover the `window_steps` steps since the last record, across resumes."""
        now = time.perf_counter()
        state, tokens_per_step = self.state, self.plan.tokens_per_step
        steps, clock = state.window_steps, state.clock(now)
        tokens_per_sec = steps * tokens_per_step / max(clock - state.window.start_s, 1e-9)
        record = {
            "step": state.step, "tokens": state.step * tokens_per_step, "train_loss": outcome.loss,
            "lr": outcome.lr, "grad_norm": outcome.grad_norm, "clipped": outcome.clipped,
            "clip_fraction": state.window.clipped / steps, "window_steps": steps,
            "tokens_per_sec": tokens_per_sec,
            "mfu": (self.flops_per_token * tokens_per_sec / (self.peak * self.runtime.world_size)
                    if self.peak else None),
            "elapsed_s": clock,
        }
        if outcome.spike:
            record["loss_spike"] = True
        if outcome.skipped:
            record["skipped_update"] = True
            record["skipped_in_row"] = state.skipped_in_row
        if hasattr(self.optimizer, "win_rate"):
            record["win_rate"] = self.optimizer.win_rate()
            record["hessian_norm"] = self.optimizer.hessian_norm()
            record["hessian_time_s"] = hessian_time
        return record

    def _write(self, metrics: MetricsLog, record: dict[str, Any]) -> None:
        """Append the record (rank 0) and log its line; a failed append (a full disk) stops every rank."""
        def append() -> None:
            try:
                metrics.write(record)
            except OSError as e:
                last = self.checkpoints.last_complete()
                raise UserError(f"cannot append the record of step {record['step']} to {metrics.path} "
                                f"({e.strerror or e}); the file keeps its whole lines. Free disk space and "
                                f"rerun to resume from the last checkpoint, {last}") from None
        self.runtime.on_main(append)
        log.info(format_line(record, self.settings.train.max_steps))
