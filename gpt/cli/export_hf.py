"""Export a run or checkpoint to a Hugging Face GPT-2 folder: `config.json`, `model.safetensors`, the
tokenizer's files, `generation_config.json` and a model card (README.md), so that `transformers` (4.40 on),
lm-evaluation-harness, vLLM and other tools load it offline.

    sophia-export-hf runs/owt/gpt2_small-sophia_g-seed1337 --out exports/gpt2_small
    python -c "import transformers as t; print(t.pipeline('text-generation', 'exports/gpt2_small')('Hi'))"

A run directory stands for its newest complete checkpoint; sharded (FSDP) checkpoints are merged. Needs the
`hf` extra (`pip install -e '.[hf]'`). What is exported, and what is not, is in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt.cli import entry_point
from gpt.cli.model_card import model_card
from gpt.eval.hf import export_hf, require_hf
from gpt.eval.pretrained import load_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a run directory or one of its checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (new or empty)")
    args = parser.parse_args(argv)
    require_hf()
    print(f"loading {args.path} ...", flush=True)  # the stages of a long export (stderr: errors only)
    loaded = load_checkpoint(args.path)
    card = model_card(loaded.model, loaded.tokenizer, Path(loaded.source))
    print(f"writing {loaded.model.num_params():,} parameters to {args.out} ...", flush=True)
    export_hf(loaded.model, loaded.tokenizer, args.out, card)
    print(f"exported {loaded.source} -> {args.out} (tokenizer {loaded.tokenizer.name})")



cli = entry_point(main)
