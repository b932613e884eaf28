"""Benchmark `GPT.generate` with its KV cache against recomputing the context for every token, in one run: the
ratio is what the cache buys (absolute times depend on the machine and its load, which the report states).

The model is a run, a checkpoint or a Hugging Face folder (as scripts/sample.py takes it), or, with
`--config`, a configs/model/<name>.yaml model from its initialisation (vocabulary 256, as the quick start's).
Both paths decode greedily from the same prompt; the report says whether their tokens are identical, which
they must be. The paths take turns, `--rounds` times, and each reports its median.

    python scripts/bench_generate.py runs/quickstart/adamw [--new-tokens 500] [--rounds 3] [--out bench.json]
    python scripts/bench_generate.py --config llama_tiny --new-tokens 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_optim import machine
from omegaconf import OmegaConf

from common.cli import run_cli
from common.errors import UserError
from gpt.distributed import pick_device
from gpt.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[GPT, list[int]]:
    """The model to time and the prompt's tokens."""
    if args.config:
        path = REPO / "configs" / "model" / f"{args.config}.yaml"
        if not path.is_file():
            raise UserError(f"--config {args.config}: no {path.relative_to(REPO)}")
        fields = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "name"}
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**fields, "vocab_size": 256})).to(device).eval()
        return model, list(args.prompt.encode())
    from gpt.eval.pretrained import load_pretrained

    loaded = load_pretrained(args.model, device)
    return loaded.model, loaded.tokenizer.encode(args.prompt) or [loaded.tokenizer.eot_id]


def timed(model: GPT, idx: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple[float, torch.Tensor]:
    if idx.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(idx, new_tokens, temperature=0, use_cache=use_cache)
    if idx.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", nargs="?", help="a run directory, a checkpoint or a Hugging Face folder")
    parser.add_argument("--config", help="instead: a configs/model/ name, initialised from seed 0")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--out", default="bench_generate.json")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.config is None):
        raise UserError("give a model (run, checkpoint or Hugging Face folder) or --config NAME, not both")
    if min(args.new_tokens, args.batch, args.rounds) < 1:
        raise UserError("--new-tokens, --batch and --rounds must be at least 1")
    device = pick_device(args.device)
    model, prompt = load_model(args, device)
    idx = torch.tensor([prompt] * args.batch, device=device)
    timed(model, idx, min(8, args.new_tokens), use_cache=True)  # warm-up: first-call allocations
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {"cached": [], "recomputed": []}
    outputs = {}
    for round_ in range(args.rounds):
        for path in (("cached", "recomputed") if round_ % 2 == 0 else ("recomputed", "cached")):
            elapsed, outputs[path] = timed(model, idx, args.new_tokens, use_cache=path == "cached")
            seconds[path].append(elapsed)
    median = {path: statistics.median(times) for path, times in seconds.items()}
    identical = torch.equal(outputs["cached"], outputs["recomputed"])
    tokens = args.new_tokens * args.batch
    source = args.model or f"--config {args.config}"
    print(f"{source}: {args.new_tokens} new tokens × {args.batch}, block_size {model.config.block_size}, "
          f"{device.type}, {torch.get_num_threads()} threads, load average {load_before[0]:.2f}")
    print(f"{'path':<12}{'median s':>10}{'tokens/s':>10}{'× recomputed':>14}")
    for path in ("recomputed", "cached"):
        ratio = median["recomputed"] / median[path]
        print(f"{path:<12}{median[path]:>10.3f}{tokens / median[path]:>10.0f}{ratio:>14.2f}")
    print(f"tokens identical: {'yes' if identical else 'NO'}")
    Path(args.out).write_text(json.dumps({
        "machine": machine(), "command": " ".join(sys.argv), "args": vars(args), "device": device.type,
        "block_size": model.config.block_size,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "seconds": seconds, "median_seconds": median, "speedup": median["recomputed"] / median["cached"],
        "tokens_identical": identical,
    }, indent=2) + "\n")
    if not identical:
        raise SystemExit("the cached and recomputed paths decoded different tokens")


if __name__ == "__main__":
    run_cli(main)
