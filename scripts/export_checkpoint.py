"""Export a checkpoint to one plain `torch.save` file: merges FSDP shards (torch.distributed.checkpoint)
or copies a single-file checkpoint's state, optionally keeping only the model weights.

    python scripts/export_checkpoint.py runs/owt/gpt2_xl-sophia_g-seed1337 --out gpt2_xl.pt --model-only

A run directory stands for its newest complete checkpoint; the manifest is verified first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common.cli import run_cli
from common.files import commit_file
from gpt.checkpoint import SHARDED_DIR, STATE_FILE
from gpt.eval.pretrained import resolve_checkpoint


def export(checkpoint: Path, out: Path, model_only: bool) -> None:
    if (checkpoint / SHARDED_DIR).is_dir():
        from gpt.checkpoint import load_whole

        state = load_whole(checkpoint / SHARDED_DIR)  # through an allow-list: never runs code
    else:
        state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    if model_only:
        state = state["model"]
    tmp_out = out.with_name(out.name + ".tmp")
    torch.save(state, tmp_out)
    commit_file(tmp_out, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a checkpoint directory or a run directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-only", action="store_true", help="keep only the model's state_dict")
    args = parser.parse_args()
    checkpoint = resolve_checkpoint(args.path)
    export(checkpoint, args.out, args.model_only)
    print(f"exported {checkpoint} -> {args.out}")


if __name__ == "__main__":
    run_cli(main)
