"""Print docs/scaling.md's memory table: the estimated peak per GPU of each paper model (bf16, AdamW or
Sophia state) at a micro-batch of 12 (nanoGPT's default), and the micro-batches the framework picks on 40,
80 and 141 GiB GPUs for 480 sequences over 8 GPUs, with and without activation checkpointing. Estimates
(gpt/memory.py), not measurements: `bash scripts/gpu_check.sh` prints the measured peak next to them."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_module

from common.errors import UserError
from gpt.memory import GiB, estimate_memory, meta_model
from gpt.settings import load_settings

MODELS = ("gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl")
GPUS_GIB = (40, 80, 141)  # A100 40GB, A100/H100 80GB, H200
WORLD_SIZE = 8


def config_for(model: str, optim: str, checkpointing: bool):
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return compose(config_name="train", overrides=[f"model={model}", f"optim={optim}", "out_dir=unused",
                                                       f"train.activation_checkpointing={checkpointing}"])


def chosen(model: str, optim: str, memory_gib: int, checkpointing: bool) -> str:
    cfg = config_for(model, optim, checkpointing)
    try:
        settings, _ = load_settings(cfg, world_size=WORLD_SIZE, device=torch.device("cpu"),
                                    gpu_memory=memory_gib * GiB)
    except UserError:
        return "does not fit"
    t = settings.train
    curvature = f" / {t.hessian_micro_batch_size}" if t.hessian_micro_batch_size else ""
    return f"{t.micro_batch_size}{curvature}"


def main() -> None:
    print("| model | step, micro 12 | same, checkpointed | GNB pass, 12 | Hutchinson pass, 12 |")
    print("|---|---|---|---|---|")
    for model in MODELS:
        cfg = config_for(model, "sophia_g", False)
        settings, _ = load_settings(cfg, world_size=1, device=torch.device("cpu"))
        shapes = meta_model(settings.model)
        cells = []
        for kind, checkpointing in (("train", False), ("train", True), ("gnb", False), ("hutchinson", False)):
            estimate = estimate_memory(shapes, micro_batch_size=12, dtype="bfloat16", state_tensors=2,
                                       kind=kind, activation_checkpointing=checkpointing)
            cells.append(f"{estimate.total / GiB:.0f} GiB")
        print(f"| {model} | " + " | ".join(cells) + " |")
    print()
    header = " | ".join(f"{gib} GiB{', ckpt' if ckpt else ''}" for gib in GPUS_GIB for ckpt in (False, True))
    print(f"| model | optimizer | {header} |")
    print("|---|---|" + "---|" * (2 * len(GPUS_GIB)))
    for model in MODELS:
        for optim in ("adamw", "sophia_g", "sophia_h"):
            cells = [chosen(model, optim, gib, ckpt) for gib in GPUS_GIB for ckpt in (False, True)]
            print(f"| {model} | {optim} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
