"""Tokenizers that turn documents into token ids: `gpt2` (GPT-2's BPE) and `byte` (raw UTF-8 bytes).

`gpt2` uses tiktoken's `r50k_base` ranks, identical to its "gpt2" encoding but stored as one file, so a cached
copy in `$TIKTOKEN_CACHE_DIR` works offline. Documents are encoded with `encode_ordinary`: a literal
"<|endoftext|>" inside a document is ordinary text, and only the separator that data preparation appends is
the EOT id. `byte` needs no download and has vocabulary 256; it uses byte 0 (NUL) as EOT, so NUL characters
are removed from documents when encoding, which keeps document boundaries unambiguous.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import tiktoken

from common.errors import UserError


class Tokenizer:
    """What data preparation and sampling need from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """`encode` of each text, in order; `num_threads` is a hint a tokenizer may use."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class GPT2Tokenizer(Tokenizer):
    name = "gpt2"

    def __init__(self) -> None:
        try:
            self._encoding = tiktoken.get_encoding("r50k_base")
        except Exception as err:  # tiktoken fails with network or cache errors of several types
            raise UserError(
                f"cannot load the GPT-2 BPE ranks (tiktoken r50k_base): {err}. Allow internet access once, "
                "or set TIKTOKEN_CACHE_DIR to a folder holding the cached r50k_base.tiktoken"
            ) from err
        self.vocab_size = self._encoding.n_vocab
        self.eot_id = self._encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self._encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(list(ids))


class ByteTokenizer(Tokenizer):
    name = "byte"
    vocab_size = 256
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        # "replace" turns lone surrogates (possible in JSON input) into "?" instead of failing.
        return list(text.replace("\x00", "").encode("utf-8", errors="replace"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


TOKENIZERS: dict[str, type[Tokenizer]] = {"gpt2": GPT2Tokenizer, "byte": ByteTokenizer}


def tokenizer_class(name: str) -> type[Tokenizer]:
    """The tokenizer called `name`, not yet loaded (the trainer asks at start-up, before any data work)."""
    if name not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    """Return the named tokenizer; cached because the GPT-2 ranks take a moment to load."""
    return tokenizer_class(name)()
