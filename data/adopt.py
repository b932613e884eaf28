"""Adopt token files made by nanoGPT (`data/openwebtext/prepare.py`): write the `meta.json` they lack.

nanoGPT's OpenWebText files are this project's format already (uint16, EOT after each document, the same
`train_test_split(test_size=0.0005, seed=2357)`), so re-tokenising 9B tokens would waste hours. This scans
each split once in chunks (EOT count = documents, every id < vocab, last token EOT), then stamps `meta.json`
with the settings of the named data config, so the trainer accepts the folder as that dataset:

    python -m data.adopt data=openwebtext data.dir=/path/to/nanoGPT/data/openwebtext
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from common.errors import UserError
from common.files import write_atomic
from data import blocks
from data.prepare import DTYPES, _fingerprint, _settings
from data.tokenizers import get_tokenizer

log = logging.getLogger("data.adopt")
CHUNK_TOKENS = 1 << 26
DTYPE = DTYPES["uint16"]  # nanoGPT's files


def count_split(path: Path, vocab_size: int, eot_id: int) -> dict[str, int]:
    """Token and document counts of one nanoGPT .bin file, refusing files that are not in the format."""
    if not path.is_file():
        raise UserError(f"{path} does not exist: adopt needs both train.bin and val.bin")
    if path.stat().st_size % DTYPE.itemsize:
        raise UserError(f"{path} has an odd number of bytes: not a uint16 token file (truncated?)")
    tokens = np.memmap(path, dtype=DTYPE, mode="r")
    if len(tokens) == 0 or tokens[-1] != eot_id:
        raise UserError(f"{path} does not end with the EOT token {eot_id}: truncated or another format")
    documents = 0
    for start in range(0, len(tokens), CHUNK_TOKENS):
        chunk = np.asarray(tokens[start : start + CHUNK_TOKENS])
        if int(chunk.max()) >= vocab_size:
            raise UserError(f"{path} holds token id {int(chunk.max())} >= vocab size {vocab_size}: "
                            "wrong tokenizer")
        documents += int(np.count_nonzero(chunk == eot_id))
    return {"tokens": len(tokens), "documents": documents}


def adopt(data_cfg: Mapping[str, Any]) -> Path:
    out = Path(data_cfg["dir"])
    if (out / "meta.json").exists():
        raise UserError(f"{out} already has a meta.json: nothing to adopt")
    tokenizer = get_tokenizer(data_cfg["tokenizer"])
    settings = _settings(data_cfg)
    splits = {name: count_split(out / f"{name}.bin", tokenizer.vocab_size, tokenizer.eot_id)
              for name in ("train", "val")}
    meta = {**settings, "fingerprint": _fingerprint(settings), "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id, "dtype": "uint16", "splits": splits, "adopted": True,
            "blocks": blocks.record(out, list(splits))}
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    log.info("adopted %s: %s", out, splits)
    return out


@hydra.main(version_base="1.3", config_path="pkg://configs", config_name="prepare")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        adopt(cfg.data)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
