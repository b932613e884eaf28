"""Run under `torchrun --nproc_per_node=2`: every optimizer whose registry entry says it steps FSDP2 shards,
on sharded (DTensor) parameters against the same optimizer on an unsharded copy in the same process; rank 0
writes the largest differences as JSON.

The model's shapes are chosen so that FSDP's dim-0 shards are uneven (255 token rows, 33 positions) and one
Adam-mini attention head straddles the shard boundary (c_attn has 144 rows: q 0-47, k 48-95 in heads of 16,
the shards split at row 72, inside k's second head). Each optimizer takes a few steps on real GPT gradients;
curvature optimizers get an estimate before every step (Sophia-G from `.grad`, the Hutchinson ones from
fixed random tensors, sharded like their parameters), so their statistics are exercised too. The sharded
runs of the optimizers the trainer allows under FSDP (all but the Hutchinson ones) also save a sharded
checkpoint after the first step and continue from it in a fresh model and optimizer, as a resumed run does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from gpt.checkpoint import load_training_state, save_training_state
from gpt.distributed import shutdown
from gpt.model import GPT, GPTConfig
from optim import OPTIMIZERS, build_optimizer

STEPS = 3
MICRO_BATCH = 2
CONFIG = GPTConfig(n_layer=2, n_head=3, n_embd=48, block_size=33, vocab_size=255)
SETTINGS = {
    "adamw": {"lr": 1e-3, "weight_decay": 0.1},
    "lion": {"lr": 1e-3, "weight_decay": 0.1},
    "sophia_g": {"lr": 1e-3, "rho": 0.05, "weight_decay": 0.1, "hessian_interval": 1},
    "sophia_h": {"lr": 1e-3, "rho": 0.01, "weight_decay": 0.1, "hessian_interval": 1},
    "sgd_sai": {"lr": 1e-3, "weight_decay": 0.1},
    "adam_mini": {"lr": 1e-3, "weight_decay": 0.1},
    "adahessian": {"lr": 1e-3, "hessian_interval": 1},
}
SHARDED = [name for name, entry in OPTIMIZERS.items() if entry.shards]  # the others refuse FSDP


def settings(name: str) -> dict:
    """SETTINGS, or for an optimizer not listed there its configs/optim/<name>.yaml at lr 1e-3."""
    if name in SETTINGS:
        return SETTINGS[name]
    path = Path(__file__).resolve().parents[2] / "configs" / "optim" / f"{name}.yaml"
    cfg = {key: value for key, value in OmegaConf.to_container(OmegaConf.load(path)).items() if key != "name"}
    return {**cfg, "lr": 1e-3, **({"hessian_interval": 1} if "hessian_interval" in cfg else {})}


def build(name: str, sharded: bool) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    if sharded:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    optimizer = build_optimizer({"name": name, **settings(name)}, model, tokens_per_step=4 * 33)
    return model, optimizer


def backward(model: GPT, step: int, rows: slice) -> None:
    """Gradient of the mean loss over this process's rows of the step's global batch."""
    tokens = torch.randint(0, CONFIG.vocab_size, (2 * MICRO_BATCH, CONFIG.block_size + 1),
                           generator=torch.Generator().manual_seed(step))[rows]
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()


def estimates_for(optimizer: torch.optim.Optimizer, step: int) -> list[torch.Tensor]:
    """Fixed Hutchinson-like estimates (full tensors, or sharded like each parameter)."""
    generator = torch.Generator().manual_seed(1000 + step)
    out = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            full = torch.randn(param.shape, generator=generator) * 1e-3
            if isinstance(param, DTensor):
                full = distribute_tensor(full, param.device_mesh, param.placements)
            out.append(full)
    return out


def resume(name: str, model: GPT, optimizer: torch.optim.Optimizer, directory: Path
           ) -> tuple[GPT, torch.optim.Optimizer]:
    """Save sharded, then load into a freshly built model and optimizer (as after a restart)."""
    save_training_state(directory, model, optimizer, {}, sharded=True, is_main=dist.get_rank() == 0)
    dist.barrier()
    model, optimizer = build(name, sharded=True)
    load_training_state(directory, model, optimizer, {}, sharded=True, device=torch.device("cpu"))
    return model, optimizer


def train(name: str, sharded: bool, rank: int, checkpoint: Path | None = None
          ) -> tuple[dict[str, torch.Tensor], list[float]]:
    model, optimizer = build(name, sharded)
    rows = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH) if sharded else slice(None)
    diagnostics = []
    for step in range(STEPS):
        if step == 1 and checkpoint is not None:
            model, optimizer = resume(name, model, optimizer, checkpoint / name)
        curvature = getattr(optimizer, "curvature", None)
        if curvature == "gnb":
            backward(model, 100 + step, rows)
            optimizer.update_hessian()
            optimizer.zero_grad(set_to_none=True)
        elif curvature == "hutchinson":
            optimizer.update_hessian(estimates_for(optimizer, step))
        backward(model, step, rows)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        diagnostics.append(float(norm.full_tensor() if isinstance(norm, DTensor) else norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(optimizer, "win_rate"):
            diagnostics += [optimizer.win_rate(), optimizer.hessian_norm()]
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in model.named_parameters()}
    return params, diagnostics


def main() -> None:
    dist.init_process_group("gloo")
    try:
        compare(dist.get_rank())
    except BaseException:  # exiting with gloo's threads alive aborts, hiding the exception that ended the run
        dist.destroy_process_group()
        raise
    shutdown()  # together: a rank that leaves while its peer is still in a collective can abort the peer


def compare(rank: int) -> None:
    report = {}
    for name in SHARDED:
        reference, reference_diagnostics = train(name, sharded=False, rank=rank)
        resumable = OPTIMIZERS[name].curvature != "hutchinson"
        sharded, diagnostics = train(name, sharded=True, rank=rank,
                                     checkpoint=Path(sys.argv[2]) if resumable else None)
        report[name] = {
            "param_max_abs_diff": max((sharded[n] - reference[n]).abs().max().item() for n in reference),
            "param_max_abs_change": max((reference[n] - p).abs().max().item()
                                        for n, p in build(name, False)[0].named_parameters()),
            "diagnostics_max_rel_diff": max(abs(a - b) / max(abs(b), 1e-30)
                                            for a, b in zip(diagnostics, reference_diagnostics, strict=True)),
        }
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
