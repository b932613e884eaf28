"""Load exported folders with whatever `transformers` this interpreter has and report how they compare with
what this project computed: run by tests/gpt/test_hf_versions.py under the newest transformers (the test's
own interpreter) and under the oldest one the `hf` extra allows (a second environment that has only torch,
transformers and safetensors, so this file imports nothing of the project).

    python tests/hf_versions/check_export.py FOLDER...  # each holding an export and expected.pt

Prints one JSON object: per folder, the largest logit difference under the attention implementation the
folder's config.json selects and under SDPA forced (null where GPT-2 has no SDPA path), the tokenizer's ids
and text against the expected ones, and the special token ids of the tokenizer and of
generation_config.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

DTYPE_KEY = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def max_difference(folder: Path, expected: dict, **kwargs) -> tuple[float, str]:
    model = AutoModelForCausalLM.from_pretrained(folder, **{DTYPE_KEY: torch.float32}, **kwargs).eval()
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    return (logits - expected["logits"]).abs().max().item(), model.config._attn_implementation


def check(folder: Path) -> dict:
    expected = torch.load(folder / "expected.pt")
    difference, attention = max_difference(folder, expected)
    try:
        sdpa_difference, _ = max_difference(folder, expected, attn_implementation="sdpa")
    except ValueError:  # GPT-2 had no SDPA path before 4.4x
        sdpa_difference = None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in expected["texts"]]
    generation = GenerationConfig.from_pretrained(folder)
    return {
        "max_abs_difference": difference, "attention": attention, "sdpa_max_abs_difference": sdpa_difference,
        "tokenizer_class": type(tokenizer).__name__,
        "ids_equal": ids == expected["token_ids"],
        "decoded_equal": [tokenizer.decode(i) for i in ids] == expected["texts"],
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "generation_eos_token_id": generation.eos_token_id,
    }


if __name__ == "__main__":
    report = {"transformers": transformers.__version__,
              "exports": {folder: check(Path(folder)) for folder in sys.argv[1:]}}
    print(json.dumps(report))
