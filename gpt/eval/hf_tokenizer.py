"""Hugging Face tokenizer files for this project's tokenizers, built offline from what the project has.

`gpt2`: GPT-2's BPE is fully described by tiktoken's r50k ranks. A token's rank is also the rank of the
merge that creates it, and its two halves are what byte-pair encoding of the token's bytes yields when only
merges of lower rank are allowed; so the merges list is recovered by running that encoding once per token.
Tokens are written in GPT-2's byte-to-character alphabet, and text is split with tiktoken's own pattern, so
the ids match tiktoken's `encode_ordinary`. `<|endoftext|>` is the special token (BOS, EOS, UNK), as in
OpenAI's release: unlike `encode_ordinary`, Hugging Face reads that literal text as the EOT id.

`byte`: one token per UTF-8 byte, id = byte value (a byte-level BPE with no merges). No special token is
registered: the EOT id is 0, the NUL byte, which the project's tokenizer removes from text but this one would
encode as id 0; `config.json` names it as `eos_token_id`.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import UserError
from data.tokenizers import Tokenizer

EOT_TEXT = "<|endoftext|>"


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the others
    take the characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return alphabet


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges, in order, that produce the multi-byte tokens of `ranks`."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            candidates = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(candidates)
            if best >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _gpt2_backend(tokenizer: Tokenizer):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    encoding = tokenizer._encoding
    ranks = encoding._mergeable_ranks
    alphabet = byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in merges_from_ranks(ranks)]
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(encoding._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_backend():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in byte_alphabet().items()}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def save_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int) -> None:
    """Write the files `AutoTokenizer.from_pretrained(folder)` reads for the project tokenizer."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer.name == "gpt2":
        if len(tokenizer._encoding._mergeable_ranks) != tokenizer.eot_id:
            raise UserError("the gpt2 tokenizer's EOT token is not right after its BPE tokens, so its files "
                            "cannot be written in GPT-2's layout")
        backend = _gpt2_backend(tokenizer)
        special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
        backend.add_special_tokens([EOT_TEXT])
    elif tokenizer.name == "byte":
        backend, special = _byte_backend(), {}
    else:
        raise UserError(f"tokenizer {tokenizer.name!r} cannot be exported to Hugging Face: only gpt2 and "
                        "byte can")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length, **special)
    wrapped.save_pretrained(folder)
