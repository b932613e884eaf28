"""Process-group setup and the collectives the trainer needs, for one process or many under torchrun.

One `Runtime` describes this process (rank, world, device); everything the trainer does across ranks goes
through it, so the single-process path is the same code with a world of one. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
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


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise UserError(f"train.device={requested!r} is not one of auto, cpu, cuda")


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
    if strategy in ("ddp", "fsdp") and world_size == 1:
        strategy = "single"  # one rank: wrapping would only add overhead
    torch_device = _pick_device(device, local_rank)
    if rank == 0:
        _warn_if_restarts_cannot_rendezvous()
    if world_size > 1 and not dist.is_initialized():
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


def shutdown() -> None:
    """Leave the process group together: a rank that tears down its gloo pairs or rank 0's store while a
    peer is still finishing its last collective can abort that peer ("terminate called without an active
    exception", seen in CI at exit after a successful run). A no-op without a process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """The module the training forward/backward goes through: the model itself, DDP, or FSDP2-sharded.

    FSDP2 shards every block and then the root (embeddings, final LayerNorm and the tied head). Parameters
    stay fp32 and precision comes from the trainer's autocast, as under DDP (no MixedPrecisionPolicy), so
    the numbers of a run do not depend on the strategy.
    """
    if runtime.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if runtime.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
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
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
