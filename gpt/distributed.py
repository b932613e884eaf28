"""Process-group setup and the collectives the trainer needs, for one process or many under torchrun.

One `Runtime` describes this process (rank, world, device); everything the trainer does across ranks goes
through it, so the single-process path is the same code with a world of one. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from common.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    strategy: str  # single | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (sum, max or mean); a no-op for one process."""
        if self.distributed:
            reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "mean": dist.ReduceOp.SUM}[op]
            dist.all_reduce(tensor, op=reduce_op)
            if op == "mean":
                tensor.div_(self.world_size)
        return tensor

    def all_ranks(self, ok: bool) -> bool:
        """True on every rank iff `ok` is true on every rank (a collective when distributed)."""
        failed = torch.full((), float(not ok), device=self.device)  # a fill kernel: no host-to-device copy
        return self.all_reduce(failed, "max").item() == 0

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's value on every rank (e.g. a decision only rank 0 can make)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, action: Callable[[], T]) -> T:
        """Run `action` on rank 0 only; every rank gets its result, or raises its UserError. Without this,
        the other ranks would wait in their next collective for a rank 0 that has already exited: for the
        collective timeout under srun, which has no torchrun to tear the job down."""
        if not self.distributed:
            return action()
        outcome: tuple[str, object] | None = None
        if self.is_main:
            try:
                outcome = ("ok", action())
            except UserError as e:
                outcome = ("error", str(e))
        kind, value = self.broadcast_object(outcome)
        if kind == "error":
            raise UserError(str(value), echo=self.is_main)
        return value


def cuda_index(local_rank: int) -> int:
    """This rank's CUDA device index: its local rank when it sees all of the node's GPUs, 0 when the launcher
    bound one GPU to each task (Slurm's `--gpus-per-task=1`: every task sees its own GPU as device 0)."""
    visible = torch.cuda.device_count()
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise UserError(f"LOCAL_RANK={local_rank} but this process sees only {visible} CUDA devices; start "
                        "at most one rank per GPU (torchrun --nproc_per_node, or Slurm's --gpus-per-task)")
    return local_rank


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """The device for `requested` (auto | cpu | cuda | cuda:N | another torch device name) of the rank with
    this local rank: `auto` is CUDA when available, else CPU; `cuda` is this rank's GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {requested} was asked for but no CUDA device is visible; use cpu")
    if requested == "cuda":
        return torch.device("cuda", cuda_index(local_rank))
    try:
        return torch.device(requested)
    except RuntimeError:
        raise UserError(f"device {requested!r} is not one of auto, cpu, cuda (or cuda:N)") from None


def autocast_factory(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory for the forward passes of `dtype` (float32: no autocast) on `device`."""
    if dtype == "float32":
        return contextlib.nullcontext
    torch_dtype = getattr(torch, dtype)
    return lambda: torch.autocast(device_type=device.type, dtype=torch_dtype)


def _adopt_slurm_environment() -> None:
    """Without torchrun (e.g. one Slurm task per GPU from hydra-submitit-launcher), take ranks from Slurm."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def environment_world_size() -> int:
    """The number of ranks this job will have, read before joining the process group, so that a config
    which cannot work with it (e.g. a batch that does not divide) fails at once on every rank."""
    _adopt_slurm_environment()
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_device(requested: str) -> torch.device:
    """The device this process will train on, known before joining the process group (no side effects)."""
    environment_world_size()  # adopts Slurm's variables, LOCAL_RANK among them
    return pick_device(requested, int(os.environ.get("LOCAL_RANK", "0")))


def _warn_if_restarts_cannot_rendezvous() -> None:
    """By default torchrun's workers build their process group in the agent's TCP store, which outlives a
    restart: restarted workers then read the dead workers' addresses and fail to connect (measured here with
    gloo and torch 2.13). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment gives every restart
    a fresh store."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        log.warning("torchrun --max-restarts=%d: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun, or a "
                    "restart may fail to reconnect the workers (see docs/scaling.md)", restarts)


def init_runtime(strategy: str = "auto", device: str = "auto") -> Runtime:
    """Read torchrun's (or Slurm's) environment, join the process group, pick this rank's device."""
    world_size = environment_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if strategy == "auto":
        strategy = "ddp" if world_size > 1 else "single"
    if strategy == "single" and world_size > 1:
        raise UserError(f"train.strategy=single but WORLD_SIZE={world_size}; use ddp or fsdp under torchrun")
    if strategy in ("ddp", "fsdp") and world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        strategy = "single"  # one process started directly: wrapping would only add overhead
    torch_device = pick_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if rank == 0:
        _warn_if_restarts_cannot_rendezvous()
    # One rank under torchrun with ddp/fsdp asked for explicitly keeps its process group (world size 1): the
    # wrapped path and the backend can be checked on one GPU (scripts/gpu_check.py).
    if strategy in ("ddp", "fsdp") and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), device_id=(
            torch_device if torch_device.type == "cuda" else None))
    return Runtime(rank, local_rank, world_size, torch_device, strategy)


def agree_on_run_dir(runtime: Runtime, out_dir: str) -> str:
    """Rank 0's `out_dir` for every rank. Each rank composed its own config, and an `out_dir` built from
    `${now:...}` can differ by a second between ranks; the copy Hydra created for a differing rank is removed
    if it is still empty, so a job leaves exactly one run directory."""
    agreed = runtime.broadcast_object(out_dir)
    if agreed != out_dir:
        with contextlib.suppress(OSError):
            os.rmdir(out_dir)
    return agreed


def _failure_key() -> str:
    # one key per torchrun restart: the agent's store outlives a restart, and the restarted job is healthy
    return f"sophia_gpt/failures/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _exit_now(code: int) -> None:
    """End the process without Python's clean-up: a process group's destructor could wait on a collective
    that will never complete."""
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


class FailureWatch:
    """When one rank fails, end the others within seconds instead of after the collective timeout.

    The failing rank adds 1 to a counter in the process group's store (no collective: the other ranks are
    in a different one, or in none), prints its traceback, and exits two polls later (under `--standalone`
    it may host the store, which must live until the others have read it). Every rank runs a daemon thread
    that polls the counter each second; on a failure elsewhere it prints one line and ends its process a
    little after the failing one, so that torchrun names the right rank as the root cause. The thread cannot
    wait for the main thread, which may be blocked for good in a collective whose peer is gone (NCCL waits
    for its timeout, 30 minutes, running no Python code meanwhile)."""

    POLL_S = 1.0

    def __init__(self, runtime: Runtime) -> None:
        self.rank = runtime.rank
        self.failed_here = self.announced = False
        self.stopped = threading.Event()
        self.store = None
        self.thread: threading.Thread | None = None
        if runtime.distributed and dist.is_initialized():
            self.store = dist.distributed_c10d._get_default_store()
            self.thread = threading.Thread(target=self._watch, name="failure-watch", daemon=True)
            self.thread.start()

    def _announce(self) -> None:
        if not self.announced:
            self.announced = True
            print(f"rank {self.rank}: stopped because another rank failed (that rank shows the error)",
                  file=sys.stderr, flush=True)

    def _watch(self) -> None:
        while not self.stopped.wait(self.POLL_S):
            try:
                failures = self.store.add(_failure_key(), 0)
            except Exception:  # the store's host has gone; torchrun tears the job down
                continue
            if failures and not self.failed_here and not self.stopped.is_set():
                self._announce()
                time.sleep(4 * self.POLL_S)  # after the failing rank, which exits 2 polls after its report
                _exit_now(1)

    def stop(self) -> None:
        self.stopped.set()

    def finish(self) -> None:
        """Stop and wait for the thread (a poll at most) before the process group goes: a daemon thread still
        inside the store's C++ client when the interpreter exits is ended by a forced unwind that aborts the
        process ("terminate called without an active exception", seen in CI after successful runs)."""
        self.stop()
        if self.thread is not None:
            self.thread.join(timeout=30.0)  # a store call returns fast while the store's host is up

    def report(self, error: BaseException) -> None:
        """Called on this rank's exception: with other ranks, show it (if this rank failed first) and end
        the process; alone, return, and the caller re-raises it."""
        self.failed_here = True
        self.stop()
        if self.store is None:
            return
        if self.announced:  # a consequence of the other rank's failure (its exit broke our collective):
            time.sleep(4 * self.POLL_S)  # the watcher ends the process, after the failing rank's exit
            _exit_now(1)
        try:
            first = self.store.add(_failure_key(), 1) == 1
        except Exception:  # the store's host has gone: it failed first
            first = False
        if first:
            traceback.print_exception(error)
            log.error("rank %d failed with %s (its traceback is on stderr)", self.rank, type(error).__name__)
            time.sleep(2 * self.POLL_S)
        else:
            self._announce()
        _exit_now(1)


@contextlib.contextmanager
def leaving_together(runtime: Runtime, keep_process_group: bool = False, out_of_memory_advice: str = ""
                     ) -> Iterator[None]:
    """Run a job and leave the process group: together (a barrier) after success or a `UserError`, which
    every rank raises at the same point; alone after any other exception, which may be one rank's alone (an
    out-of-memory error): a barrier there would wait for ranks that wait elsewhere, and nothing would
    complete until the collective timeout. An out-of-memory error is logged with `out_of_memory_advice`."""
    watch = FailureWatch(runtime)
    try:
        yield
    except UserError:
        watch.finish()
        if not keep_process_group:
            shutdown()
        raise
    except BaseException as error:
        if isinstance(error, torch.OutOfMemoryError) and out_of_memory_advice:
            log.error("rank %d: %s", runtime.rank, out_of_memory_advice)
        watch.report(error)
        raise
    watch.finish()
    if not keep_process_group:
        shutdown()


def shutdown() -> None:
    """Leave the process group together: a rank that tears down its gloo pairs or rank 0's store while a
    peer is still finishing its last collective can abort that peer. A no-op without a process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def checkpoint_activations(model: nn.Module) -> None:
    """Activation checkpointing per transformer block: each block keeps only its input for the backward and
    recomputes its activations there (dropout masks included: the RNG state is replayed). Applied from
    outside, like the wrapping below: the block's forward is replaced on the instance, so parameter names,
    state dicts and the model file stay as they are. Non-reentrant checkpointing also supports the double
    backward of the Hessian-vector products."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        forward = block.forward
        block.forward = functools.partial(checkpoint, forward, use_reentrant=False)


def wrap_model(model: nn.Module, runtime: Runtime, *, activation_checkpointing: bool = False,
               dtype: str = "float32") -> nn.Module:
    """The module the training forward/backward goes through: the model itself, DDP, or FSDP2-sharded.

    FSDP2 shards every block and then the root (embeddings, final LayerNorm and the tied head). Under a
    16-bit `dtype` its `MixedPrecisionPolicy` all-gathers parameters in that dtype for the compute (half the
    traffic of fp32) and reduce-scatters gradients in fp32; the sharded parameters, gradients and optimizer
    state stay fp32. The trainer's autocast runs on top of it, as under DDP.
    """
    if activation_checkpointing:
        checkpoint_activations(model)
    if runtime.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if runtime.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if dtype != "float32":
            policy = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under `torch.compile`'s wrapper and DDP (FSDP2 shards in place: nothing to unwrap).

    The compile wrapper goes first: it forwards attribute look-ups to the module it wraps, so without it a
    compiled GPT (which has no `.module`) would be returned as it is, and a double backward through its
    compiled graph fails ("compiled with non-empty donated buffers")."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly sharded (FSDP DTensor) result, e.g. a gradient norm; every rank must
    call it, since it may all-reduce. Plain tensors are returned as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-step (entered before its forward)."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        # Keep the parameters gathered after the backward, so the next micro-step's forward gathers nothing;
        # the last micro-step reshards (and reduce-scatters), freeing them before the optimizer step.
        model.set_requires_gradient_sync(False)
        model.set_reshard_after_backward(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
            model.set_reshard_after_backward(True)
    else:
        yield
