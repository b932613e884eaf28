"""Validation loss and perplexity of a run, a checkpoint or Hugging Face GPT-2 weights on prepared data.

    python scripts/eval_loss.py runs/quickstart/adamw
    python scripts/eval_loss.py gpt2 --data-dir data_cache/openwebtext_gpt2 --sequences 4000 --batch-size 8

The sequences are the trainer's fixed validation set (the first --sequences windows of the val split, the
same for every run and batch layout), so for a run with its own settings the number equals the `val_loss` the
trainer recorded at the checkpoint's step. A run's data folder, eval sequences, micro-batch and dtype are the
defaults (found from any working directory, also for runs that recorded it relative); for Hugging Face
weights pass --data-dir (its tokenizer must be the model's). See
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import math
from importlib import resources
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from common.errors import UserError
from data.loader import BatchLayout, BatchLoader, TokenData
from data.prepare_command import prepare_command
from gpt.cli import entry_point
from gpt.distributed import autocast_factory, pick_device
from gpt.eval.pretrained import check_exists_or_hub_name, is_project_checkpoint, load_pretrained
from gpt.run_paths import resolve_recorded

TRAIN_DEFAULTS = OmegaConf.load(resources.files("configs") / "train.yaml").train


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader: BatchLoader, sequences: int, autocast) -> float:
    """Mean cross-entropy over the first `sequences` of the fixed validation set: the micro-batches' means
    weighted by their number of sequences, as the trainer computes it."""
    model.eval()
    total = weights = 0.0
    for first, count, weight in tqdm(loader.val_schedule(sequences), desc="evaluating", unit="batch"):
        x, y = loader.val_batch(first, count)
        with autocast():
            total += model(x, y)[1].float().item() * weight
        weights += weight
    return total / weights


def main(argv: list[str] | None = None) -> None:
    defaults = TRAIN_DEFAULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run directory, a checkpoint, a Hugging Face folder or hub name")
    parser.add_argument("--data-dir", help="a prepared data folder (default: the run's data.dir)")
    parser.add_argument("--sequences", type=int, help="validation sequences (default: the run's "
                        f"train.eval_sequences, else {defaults.eval_sequences})")
    parser.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: the run's "
                                                       "micro-batch)")
    parser.add_argument("--block-size", type=int, help="tokens per sequence (default: the model's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="autocast dtype (default: the run's, else float32)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--json", type=Path, help="also write {loss, perplexity, ...} to this file")
    args = parser.parse_args(argv)
    if args.data_dir is None and not is_project_checkpoint(Path(args.model)):
        check_exists_or_hub_name(args.model)  # a missing run is named, not taken for a hub name
        raise UserError("Hugging Face weights come with no data folder; pass --data-dir <a prepared folder>")
    device = pick_device(args.device)
    loaded = load_pretrained(args.model, device)
    run = loaded.run_config or {}
    train = run.get("train", {})
    if args.data_dir is not None:
        data_dir = Path(args.data_dir)
    else:  # the checkpoint lives in <run>/checkpoints/step_N
        data_dir = resolve_recorded(run["data"]["dir"], Path(loaded.source).parent.parent, run, "data.dir")
    if not data_dir.exists():
        where = "--data-dir" if args.data_dir is not None else f"the run's data.dir ({run['data']['dir']})"
        raise UserError(f"data folder {data_dir} does not exist ({where}): prepare it with "
                        f"{prepare_command(run['data'], data_dir) if run else 'python -m data.prepare ...'} "
                        "or pass --data-dir <a prepared folder>")
    sequences = args.sequences or train.get("eval_sequences", defaults.eval_sequences)
    batch_size = args.batch_size or train.get("micro_batch_size")
    if batch_size is None:
        raise UserError("no micro-batch size is known for these weights; pass --batch-size")
    block_size = args.block_size or loaded.model.config.block_size
    if block_size > loaded.model.config.block_size:
        raise UserError(f"--block-size {block_size} is longer than the model's context of "
                        f"{loaded.model.config.block_size}")
    data = TokenData(data_dir, tokenizer=loaded.tokenizer.name)
    if data.vocab_size > loaded.model.config.vocab_size:
        raise UserError(f"{data_dir} has {data.vocab_size} token ids, more than the model's "
                        f"{loaded.model.config.vocab_size}")
    loader = BatchLoader(data, BatchLayout(batch_size, batch_size, block_size), seed=0, device=device,
                         vocab_limit=loaded.model.config.vocab_size)
    autocast = autocast_factory(device, args.dtype or train.get("dtype", "float32"))
    loss = validation_loss(loaded.model, loader, sequences, autocast)
    print(f"val loss {loss:.4f}  perplexity {math.exp(loss):.2f}  ({sequences} sequences × {block_size} "
          f"tokens of {data_dir}, {loaded.source})")
    if args.json:
        record = {"loss": loss, "perplexity": math.exp(loss), "sequences": sequences,
                  "block_size": block_size, "data_dir": str(data_dir), "model": loaded.source}
        args.json.write_text(json.dumps(record, indent=1) + "\n")



cli = entry_point(main)
