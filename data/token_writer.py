"""Tokenise batches of documents on worker threads and append them, in order, to a token file.

The reader (the caller's iterator of document batches) runs in the calling thread while up to
`AHEAD_PER_THREAD` chunks per thread are being encoded, so reading files, encoding and writing overlap.
Each chunk holds about `CHUNK_CHARS` of text (a longer document alone) and becomes one array of ids with the
EOT id after every document, in the file's dtype: tokenizers that release the GIL (tiktoken, Hugging Face
`tokenizers`) encode on all threads at once, and no Python int is made per token. The file is written under a
`.tmp` name with ordinary writes (a full disk is an error, not the SIGBUS of a memmap), fsynced and renamed
only when complete.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from common.errors import UserError
from common.files import commit_file
from data import allocate
from data.tokenizers import Tokenizer

CHUNK_CHARS = 1 << 18  # text per encoding task: small enough to spread over threads, large enough to amortise
AHEAD_PER_THREAD = 4  # chunks in flight per thread: keeps threads busy while the reader is slow


class Encoded:
    """Consecutive documents' ids, each followed by the EOT id; `ends[i]` is where document i's EOT ends."""

    def __init__(self, tokens: np.ndarray, ends: np.ndarray) -> None:
        self.tokens, self.ends = tokens, ends

    def head(self, documents: int) -> Encoded:
        return Encoded(self.tokens[: self.ends[documents - 1]] if documents else self.tokens[:0],
                       self.ends[:documents])

    def tail(self, documents: int) -> Encoded:
        start = self.ends[documents - 1] if documents else 0
        return Encoded(self.tokens[start:], self.ends[documents:] - start)

    def documents_to_reach(self, tokens: int) -> int:
        """How many leading documents it takes to hold `tokens` tokens (all of them if fewer)."""
        return min(int(np.searchsorted(self.ends, tokens)) + 1, len(self.ends)) if tokens > 0 else 0


def encode(batches: Iterable[list[str]], tokenizer: Tokenizer, threads: int, dtype: np.dtype
           ) -> Iterator[Encoded]:
    """The batches' documents, encoded in order on `threads` threads (see the module docstring)."""
    pending: collections.deque[Future[Encoded]] = collections.deque()
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="tokenise")
    try:
        for texts in batches:
            for chunk in _chunks(texts):
                pending.append(pool.submit(_encode_chunk, tokenizer, chunk, dtype))
                while len(pending) > AHEAD_PER_THREAD * max(1, threads):
                    yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early (a token budget reached): drop the work in flight
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks(texts: list[str]) -> Iterator[list[str]]:
    start = 0
    while start < len(texts):
        end, size = start + 1, len(texts[start])
        while end < len(texts) and size + len(texts[end]) <= CHUNK_CHARS:
            size += len(texts[end])
            end += 1
        yield texts[start:end]
        start = end


def _encode_chunk(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> Encoded:
    arrays = tokenizer.encode_arrays(texts)
    ends = np.cumsum([len(a) + 1 for a in arrays], dtype=np.int64)
    tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    start = 0
    for array, end in zip(arrays, ends, strict=True):
        tokens[start : end - 1] = array
        tokens[end - 1] = tokenizer.eot_id
        start = end
    return Encoded(tokens, ends)


class SplitFile:
    """One split's token file being written: `add` encoded documents, then `commit` (or `discard`)."""

    def __init__(self, path: Path, quiet: bool) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.tokens = self.documents = 0
        # Regular writes report a full disk as an error, so the size need not be known first: the headroom is
        # checked up front, and a disk that fills up later is a UserError.
        allocate.reserve(self.tmp, 0)
        self._file: BinaryIO = open(self.tmp, "wb")  # closed by commit or discard
        self._bar = tqdm(unit="tok", unit_scale=True, desc=f"writing {path.name}", disable=quiet)

    def add(self, encoded: Encoded) -> None:
        try:
            self._file.write(memoryview(encoded.tokens))
        except OSError as e:
            raise UserError(f"cannot write {self.tmp} ({e.strerror}); free space or set data.dir to a larger "
                            "disk") from None
        self.tokens += len(encoded.tokens)
        self.documents += len(encoded.ends)
        self._bar.update(len(encoded.tokens))

    def commit(self) -> dict[str, int]:
        self._close()
        commit_file(self.tmp, self.path)
        return {"tokens": self.tokens, "documents": self.documents}

    def discard(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        self._bar.close()
        try:
            self._file.close()
        except OSError as e:  # the last buffered write failed
            raise UserError(f"cannot write {self.tmp} ({e.strerror}); free space or set data.dir to a larger "
                            "disk") from None
