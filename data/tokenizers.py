"""Tokenizers that turn documents into token ids: `gpt2` (GPT-2's BPE), `byte` (raw UTF-8 bytes), and any
Hugging Face tokenizer through the `tokenizers` library.

`gpt2` uses tiktoken's `r50k_base` ranks, identical to its "gpt2" encoding but stored as one file, so a cached
copy in `$TIKTOKEN_CACHE_DIR` works offline. Documents are encoded as ordinary text: a literal
"<|endoftext|>" inside a document is text, and only the separator that data preparation appends is the EOT
id. `byte` needs no download and has vocabulary 256; it uses byte 0 (NUL) as EOT, so NUL characters are
removed from documents when encoding, which keeps document boundaries unambiguous.

A Hugging Face tokenizer is named by its hub repository (`EleutherAI/gpt-neox-20b`, optionally
`owner/name@revision`), a local folder holding `tokenizer.json`, or a `tokenizer.json` path. Its special
tokens are encoded as text too (`encode_special_tokens`), no special tokens are added (no BOS), and its EOT
is the `eos_token` of a `tokenizer_config.json` beside `tokenizer.json`, else the first of `EOT_NAMES` in its
vocabulary. Its identity is the SHA-256 of those files (`files_sha256`), which preparation records, so data
made by another version of a tokenizer with the same name is told apart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tiktoken

from common.errors import UserError

BUILT_IN = ("gpt2", "byte")
EOT_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")  # tried in order without a config
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")  # owner/name[@revision]
CHOICES = ("gpt2, byte, a Hugging Face tokenizer (owner/name[@revision]), a folder holding tokenizer.json, "
           "or a tokenizer.json path")


class Tokenizer:
    """What data preparation, evaluation and sampling need from a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int
    files_sha256: str | None = None  # the identity of a tokenizer loaded from files; None for built-in ones

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """`encode` of each text, in order; `num_threads` is a hint a tokenizer may use."""
        return [self.encode(text) for text in texts]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text as an integer array (what token files are written from). Called from several
        threads at once by data preparation; tokenizers whose encoder releases the GIL run in parallel."""
        return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_batch(texts)]

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

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_ordinary releases the GIL and repairs lone surrogates itself. Not encode_to_numpy: it goes
        # through the special-token path, and a fresh process preparing 5,000 small files end to end ran
        # ~20% slower with it (scripts/bench_prepare.py --corpus txt: 0.76 against 0.87 of raw tiktoken).
        return [np.asarray(self._encoding.encode_ordinary(text), dtype=np.uint32) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(list(ids))


class ByteTokenizer(Tokenizer):
    name = "byte"
    vocab_size = 256
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return list(self._bytes(text))

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(self._bytes(text), dtype=np.uint8) for text in texts]

    @staticmethod
    def _bytes(text: str) -> bytes:
        # "replace" turns lone surrogates (possible in JSON input) into "?" instead of failing.
        return text.replace("\x00", "").encode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer, from the hub or from local files (see the module docstring)."""

    def __init__(self, name: str) -> None:
        from tokenizers import Tokenizer as Backend

        self.name = name
        self.files = files = tokenizer_files(name)  # what an export copies
        try:
            self._backend = Backend.from_file(str(files["tokenizer.json"]))
        except Exception as err:  # the library raises a generic Exception for a malformed file
            raise UserError(f"{files['tokenizer.json']} is not a tokenizers tokenizer.json ({err}); "
                            f"set data.tokenizer to {CHOICES}") from None
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text
        vocab = self._backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eot_id = _eot_id(name, vocab, files.get("tokenizer_config.json"))
        self.files_sha256 = hashlib.sha256(
            "".join(f"{n}\t{_sha256(p)}\n" for n, p in sorted(files.items())).encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the offsets; both release the GIL
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)


def tokenizer_files(name: str) -> dict[str, Path]:
    """`tokenizer.json` and, when there is one, `tokenizer_config.json` of the Hugging Face tokenizer `name`:
    local files, or the hub repository's (downloaded once into the Hugging Face cache)."""
    path = Path(name).expanduser()
    if path.exists():
        folder, main = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
        if not main.is_file():
            raise UserError(f"{path} holds no tokenizer.json; set data.tokenizer to {CHOICES}")
        config = folder / "tokenizer_config.json"
        return {"tokenizer.json": main, **({"tokenizer_config.json": config} if config.is_file() else {})}
    if not HUB_NAME.fullmatch(name):
        raise UserError(f"unknown tokenizer {name!r} (no such file, nor a hub name); choose {CHOICES}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = name.partition("@")
    try:
        files = {"tokenizer.json": Path(hf_hub_download(repo, "tokenizer.json", revision=revision or None))}
        try:
            files["tokenizer_config.json"] = Path(
                hf_hub_download(repo, "tokenizer_config.json", revision=revision or None))
        except EntryNotFoundError:
            pass
    except Exception as err:  # network, offline mode, unknown or gated repository: all fixable by the user
        raise UserError(
            f"cannot load the tokenizer {name!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the name, the internet connection and "
            f"HF_HUB_OFFLINE, or set data.tokenizer to {CHOICES}") from None
    return files


def _eot_id(name: str, vocab: dict[str, int], config: Path | None) -> int:
    eos = None
    if config is not None:
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (OSError, ValueError) as err:
            raise UserError(f"{config} is not valid JSON ({err}); fix or delete it") from None
        eos = eos.get("content") if isinstance(eos, dict) else eos
    for token in ([eos] if eos else EOT_NAMES):
        if token in vocab:
            return vocab[token]
    where = f"its eos_token {eos!r}" if eos else f"none of {', '.join(EOT_NAMES)}"
    raise UserError(f"tokenizer {name!r} has no end-of-text token ({where} is in its vocabulary); data "
                    "preparation separates documents with it: add one to the tokenizer")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_class(name: str) -> type[Tokenizer]:
    """The class of the tokenizer called `name`, not yet loaded (checked at start-up, before any data work:
    a built-in name, an existing local path, or a hub name)."""
    if name == "gpt2":
        return GPT2Tokenizer
    if name == "byte":
        return ByteTokenizer
    if Path(name).expanduser().exists() or HUB_NAME.fullmatch(name):
        return HFTokenizer
    raise UserError(f"unknown tokenizer {name!r}; choose {CHOICES}")


@functools.cache
def get_tokenizer(name: str) -> Tokenizer:
    """Return the named tokenizer; cached because loading one takes a moment (or a download)."""
    kind = tokenizer_class(name)
    return kind(name) if kind is HFTokenizer else kind()
