"""Export a checkpoint to one plain `torch.save` file: merges FSDP shards (torch.distributed.checkpoint)
or copies a single-file checkpoint's state, optionally keeping only the model weights.

    python scripts/export_checkpoint.py runs/owt/gpt2_xl-sophia_g-seed1337 --out gpt2_xl.pt --model-only

A run directory stands for its newest complete checkpoint; the manifest is verified first, and the files are
read as data (a checkpoint holding anything else is refused, or skipped for the previous one in a run
directory). The file is written under a temporary name of its own beside `--out` and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.cli import run_cli
from common.errors import UserError
from common.files import commit_file
from gpt.checkpoint import SHARDED_DIR, STATE_FILE, load_state_file
from gpt.eval.pretrained import resolve_checkpoint


def read_state(checkpoint: Path) -> dict[str, Any]:
    if (checkpoint / SHARDED_DIR).is_dir():
        from gpt.checkpoint import load_whole

        return load_whole(checkpoint / SHARDED_DIR)  # through an allow-list: never runs code
    return load_state_file(checkpoint / STATE_FILE, ("model",))


def write_state(state: dict[str, Any], out: Path) -> None:
    """`state` to `out`, through a temporary file this call creates (and removes on failure)."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; pass a file name, e.g. {out / 'model.pt'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); choose another --out") from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        commit_file(tmp, out)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = e.__context__ if isinstance(e, RuntimeError) else e  # torch's report of a failed write
        if isinstance(cause, OSError):
            raise UserError(f"cannot write {out} ({cause.strerror or cause}); free disk space and rerun"
                            ) from None
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a checkpoint directory or a run directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-only", action="store_true", help="keep only the model's state_dict")
    args = parser.parse_args()
    checkpoint, state = resolve_checkpoint(args.path, read_state)
    write_state(state["model"] if args.model_only else state, args.out)
    print(f"exported {checkpoint} -> {args.out}")


if __name__ == "__main__":
    run_cli(main)
