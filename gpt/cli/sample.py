"""Sample text from a run, a checkpoint or Hugging Face GPT-2 weights, in the run's own tokenizer.

    python scripts/sample.py runs/quickstart/adamw --prompt "ROMEO:" --max-new-tokens 200 --seed 1

Temperature 0 decodes greedily; --top-k keeps the k most likely tokens at each step. With the same seed (and
device) the same text comes out. An empty prompt starts from the end-of-text token, as documents do.
"""

from __future__ import annotations

import argparse

import torch

from common.cli import run_cli
from common.errors import UserError
from gpt.distributed import pick_device
from gpt.eval.pretrained import load_pretrained


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run directory, a checkpoint, a Hugging Face folder or hub name")
    parser.add_argument("--prompt", default="", help="text to continue (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=200, help="0 = no top-k filter")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1:
        raise UserError("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and --num-samples >= 1")
    device = pick_device(args.device)
    loaded = load_pretrained(args.model, device)
    prompt = loaded.tokenizer.encode(args.prompt) or [loaded.tokenizer.eot_id]
    torch.manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.num_samples, device=device)
    top_k = args.top_k or None
    out = loaded.model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=top_k)
    for k, row in enumerate(out.tolist()):
        if k:
            print("-" * 40)
        text = loaded.tokenizer.decode(row[len(prompt):])
        print(args.prompt + text)


if __name__ == "__main__":
    run_cli(main)
