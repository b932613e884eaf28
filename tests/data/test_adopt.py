"""Adopting nanoGPT-made token files: counted by an independent scan, accepted by the loader."""

import numpy as np
import pytest

from common.errors import UserError
from data.adopt import adopt
from data.loader import TokenData


def nanogpt_files(folder, documents):
    """Write train/val the way nanoGPT does: each document's ids then EOT (50256), raw uint16."""
    folder.mkdir()
    for name, docs in documents.items():
        ids = [t for doc in docs for t in [*doc, 50256]]
        np.array(ids, dtype=np.uint16).tofile(folder / f"{name}.bin")


def config(folder):
    return {"name": "openwebtext", "source": "hub", "hf_path": "Skylion007/openwebtext",
            "hf_revision": "refs/convert/parquet", "hf_split": "train", "text_field": "text",
            "tokenizer": "gpt2", "val_fraction": 0.0005, "split_seed": 2357, "dir": str(folder)}


def test_adopted_folder_is_accepted_with_exact_counts(tmp_path):
    folder = tmp_path / "owt"
    nanogpt_files(folder, {"train": [[1, 2, 3], [4, 5], [6]], "val": [[7, 8]]})
    adopt(config(folder))
    data = TokenData(folder, tokenizer="gpt2")
    expected = {"train": {"tokens": 9, "documents": 3}, "val": {"tokens": 3, "documents": 1}}
    assert data.meta["splits"] == expected
    assert list(data.split("train")) == [1, 2, 3, 50256, 4, 5, 50256, 6, 50256]


def test_truncated_file_is_refused(tmp_path):
    folder = tmp_path / "owt"
    nanogpt_files(folder, {"train": [[1, 2, 3]], "val": [[7, 8]]})
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(5)
    with pytest.raises(UserError, match="odd number of bytes"):
        adopt(config(folder))
    assert not (folder / "meta.json").exists()
