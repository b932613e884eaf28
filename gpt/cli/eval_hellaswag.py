"""Score a run, a checkpoint or Hugging Face GPT-2 weights on HellaSwag, completion style.

    python scripts/eval_hellaswag.py runs/owt/gpt2_small-sophia_g-seed1337 --json hellaswag.json
    python scripts/eval_hellaswag.py gpt2 --data hellaswag_val.jsonl --limit 1000

`acc` picks the ending with the highest summed log-likelihood, `acc_norm` the highest per-token mean. Without
--data the 10,042 validation items come from the Hugging Face hub (cached by `datasets` after the first run).
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpt.cli import entry_point
from gpt.distributed import autocast_factory, pick_device
from gpt.eval.hellaswag import encode_items, evaluate_hellaswag, read_items
from gpt.eval.pretrained import load_pretrained


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run directory, a checkpoint, a Hugging Face folder or hub name")
    parser.add_argument("--data", help="a local jsonl in HellaSwag's format (default: the hub's validation)")
    parser.add_argument("--limit", type=int, help="score only the first N items")
    parser.add_argument("--json", type=Path, help="also write {acc, acc_norm, n, ...} to this file")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward (4 per item)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    rows = read_items(args.data, args.limit)
    device = pick_device(args.device)
    loaded = load_pretrained(args.model, device)
    items = encode_items(rows, loaded.tokenizer)
    result = evaluate_hellaswag(loaded.model, items, batch_size=args.batch_size, progress=True,
                                autocast=autocast_factory(device, args.dtype))
    print(f"HellaSwag ({result['n']} items, {loaded.source}): acc {result['acc']:.4f}  "
          f"acc_norm {result['acc_norm']:.4f}")
    if args.json:
        record = {**result, "model": loaded.source, "data": args.data or "hub:Rowan/hellaswag"}
        args.json.write_text(json.dumps(record, indent=1) + "\n")



cli = entry_point(main)
