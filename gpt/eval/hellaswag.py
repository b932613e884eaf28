"""HellaSwag, completion style: which of four endings does the model find most likely after the context?

Each ending is scored as the log-likelihood of " " + ending given the context, in the run's own tokenizer.
`acc` picks the ending with the highest summed log-likelihood, `acc_norm` the one with the highest mean per
token, so long endings are not penalised for their length. This is the scoring of nanoGPT's lineage (llm.c,
modded-nanogpt); lm-evaluation-harness's `hellaswag` task also cleans the text and normalises by bytes, so
its numbers (GPT-2 124M: about 31% acc_norm there, about 29.6% here) are not comparable with these.
The data is the 10,042-item validation split, from the Hugging Face hub or a local jsonl in HellaSwag's own
format (one object per line with `ctx`, `endings` (4 strings) and `label`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from data.tokenizers import Tokenizer
from gpt.eval.scoring import score_continuations
from gpt.model import GPT

HUB_DATASET = "Rowan/hellaswag"
HUB_REVISION = "refs/convert/parquet"  # the hub's parquet conversion: datasets>=4 runs no loading script
N_ENDINGS = 4


@dataclass(frozen=True)
class Item:
    context: list[int]
    endings: list[list[int]]  # " " + ending, tokenized
    label: int


def read_items(data: str | None, limit: int | None = None) -> list[dict[str, Any]]:
    """The raw validation items: from a local jsonl file, or (data=None) from the hub through `datasets`."""
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise UserError(f"HellaSwag file {path} does not exist; pass a jsonl in HellaSwag's format")
        rows = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise UserError(f"{path}:{number} is not JSON ({e})") from None
                if limit is not None and len(rows) >= limit:
                    break
        return rows
    from datasets import load_dataset

    try:
        dataset = load_dataset(HUB_DATASET, split="validation", revision=HUB_REVISION)
    except Exception as e:  # offline mode and network failures surface as several exception types
        raise UserError(f"cannot load {HUB_DATASET} from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); connect once so that "
                        "datasets caches it, or pass a local jsonl with --data") from None
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return list(dataset)


def encode_items(rows: list[dict[str, Any]], tokenizer: Tokenizer) -> list[Item]:
    items = []
    for number, row in enumerate(rows, 1):
        endings = row.get("endings") if isinstance(row, dict) else None
        try:
            label = int(row["label"])
        except (KeyError, TypeError, ValueError):
            label = -1
        if not (isinstance(row.get("ctx"), str) and isinstance(endings, list) and len(endings) == N_ENDINGS
                and all(isinstance(e, str) for e in endings) and 0 <= label < N_ENDINGS):
            raise UserError(f"HellaSwag item {number} is not in HellaSwag's format (a string `ctx`, a list "
                            f"of {N_ENDINGS} strings `endings`, a `label` in 0..{N_ENDINGS - 1})")
        items.append(Item(tokenizer.encode(row["ctx"]), [tokenizer.encode(" " + e) for e in endings], label))
    return items


def predictions(model: GPT, items: list[Item], *, batch_size: int = 32, progress: bool = False,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                ) -> list[tuple[int, int]]:
    """(choice by summed log-likelihood, choice by per-token mean) for each item."""
    requests = [(item.context, ending) for item in items for ending in item.endings]
    scores = score_continuations(model, requests, batch_size=batch_size, autocast=autocast, progress=progress)
    choices = []
    for k in range(len(items)):
        four = scores[k * N_ENDINGS : (k + 1) * N_ENDINGS]
        choices.append((max(range(N_ENDINGS), key=lambda j: four[j].logprob),
                        max(range(N_ENDINGS), key=lambda j: four[j].logprob / four[j].n_tokens)))
    return choices


def evaluate_hellaswag(model: GPT, items: list[Item], *, rank: int = 0, world_size: int = 1,
                       all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, batch_size: int = 32,
                       autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                       progress: bool = False) -> dict[str, float | int]:
    """`acc`, `acc_norm` and `n` over `items`, split across ranks during training. Every rank scores the
    same number of items, repeating its last one with weight 0 where the split is uneven: sharded models need
    every rank in every forward."""
    per_rank = math.ceil(len(items) / world_size)
    mine = items[rank::world_size]
    padded = mine + [items[-1]] * (per_rank - len(mine))
    choices = predictions(model, padded, batch_size=batch_size, autocast=autocast, progress=progress)
    device = next(model.parameters()).device
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for item, choice in zip(mine, choices, strict=False):
        counts += torch.tensor([choice[0] == item.label, choice[1] == item.label], dtype=torch.float64,
                               device=device)
    counts = all_reduce(counts)
    return {"acc": counts[0].item() / len(items), "acc_norm": counts[1].item() / len(items), "n": len(items)}


class PeriodicHellaSwag:
    """HellaSwag during training (`train.hellaswag_interval` > 0): scored with the validation loss every that
    many steps and at the end, written to metrics.jsonl as `hellaswag_acc` and `hellaswag_acc_norm`."""

    def __init__(self, interval: int, data: str | None, limit: int | None, tokenizer: Tokenizer) -> None:
        self.interval = interval
        self.items = encode_items(read_items(data, limit), tokenizer)

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.interval == 0 or step == max_steps

    def __call__(self, model: GPT, runtime: Any,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
        result = evaluate_hellaswag(model, self.items, rank=runtime.rank, world_size=runtime.world_size,
                                    all_reduce=runtime.all_reduce, autocast=autocast)
        return {"hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]}
