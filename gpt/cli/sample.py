"""Sample text from a run, a checkpoint or Hugging Face GPT-2 weights, in the run's own tokenizer.

    sophia-sample runs/quickstart/adamw --prompt "ROMEO:" --max-new-tokens 200 --seed 1
    sophia-sample runs/quickstart/adamw --prompt FILE:prompt.txt --stop $'\\n\\n' --top-p 0.9

Text is streamed to the terminal as it is sampled (one sample; several are printed whole, one after another).
A sample ends at the end-of-text token (unless --ignore-eot) or just before the first --stop string, or after
--max-new-tokens. Temperature 0 decodes greedily; --top-k and --top-p filter each step's distribution, in that
order. With the same seed (and device) the same text comes out. An empty prompt starts from the end-of-text
token, as documents do. The defaults are configs/sample.yaml's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from common.errors import UserError
from gpt.cli import entry_point
from gpt.distributed import pick_device
from gpt.eval.continuation import Continuation
from gpt.eval.pretrained import load_pretrained
from gpt.model import GPT
from gpt.sampling import sampling_defaults

FILE_PREFIX = "FILE:"  # nanoGPT's convention: --prompt FILE:path reads the prompt from a file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = sampling_defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", help="a run directory, a checkpoint, a Hugging Face folder or hub name")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="",
                        help=f"text to continue; {FILE_PREFIX}path reads it from a file")
    prompt.add_argument("--prompt-file", type=Path, help="read the text to continue from this file")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = no top-k filter")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1 = no nucleus filter")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end a sample just before this text (repeatable)")
    parser.add_argument("--ignore-eot", action="store_true",
                        help="sample past the end-of-text token instead of ending there")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples, help="samples to draw")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="torch seed of the draws")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no-stream", action="store_true", help="print each sample only once it is complete")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1:
        raise UserError("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and --num-samples >= 1")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], not {args.top_p}")
    return args


def read_prompt(args: argparse.Namespace) -> str:
    path = args.prompt_file
    if path is None and args.prompt.startswith(FILE_PREFIX):
        path = Path(args.prompt[len(FILE_PREFIX) :])
    if path is None:
        return args.prompt
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the prompt file {path}: {e.strerror or e}") from None


def without_padding(model: GPT, vocab_size: int) -> GPT:
    """The model over the tokenizer's tokens only: the rows that pad the token table (to a multiple of 64)
    are dropped, so they are never sampled. Every real token's logit stays the same."""
    if model.config.vocab_size == vocab_size:
        return model
    state = {name: tensor[:vocab_size] if name in ("transformer.wte.weight", "lm_head.weight") else tensor
             for name, tensor in model.state_dict().items()}
    device = next(model.parameters()).device
    with torch.device("meta"):
        smaller = GPT(dataclasses.replace(model.config, vocab_size=vocab_size))
    smaller.load_state_dict(state, assign=True)
    if model.lm_head.weight is model.transformer.wte.weight:
        smaller.lm_head.weight = smaller.transformer.wte.weight  # tied, as in the model it came from
    return smaller.to(device).eval()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    text = read_prompt(args)
    device = pick_device(args.device)
    loaded = load_pretrained(args.model, device)
    tokenizer = loaded.tokenizer
    model = without_padding(loaded.model, tokenizer.vocab_size)
    prompt = tokenizer.encode(text) or [tokenizer.eot_id]
    samples = [Continuation(tokenizer, args.stop, stop_at_eot=not args.ignore_eot)
               for _ in range(args.num_samples)]
    stream = args.num_samples == 1 and not args.no_stream
    if stream:
        print(text, end="", flush=True)

    torch.manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.num_samples, device=device)
    for tokens in model.stream(idx, args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k or None, top_p=args.top_p):
        for sample, token in zip(samples, tokens[:, 0].tolist(), strict=True):
            new = sample.add(token)
            if stream and new:
                print(new, end="", flush=True)
        if all(sample.done for sample in samples):
            break
    for k, sample in enumerate(samples):
        rest = sample.finish()
        if stream:
            print(rest, flush=True)
            continue
        if k:
            print("-" * 40)
        print(text + sample.text)
    sys.stdout.flush()


cli = entry_point(main)
