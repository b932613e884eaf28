"""Hugging Face tokenizer files for this project's tokenizers, built offline from what the project has.

`gpt2`: GPT-2's BPE is fully described by tiktoken's r50k ranks. A token's rank is also the rank of the
merge that creates it, and its two halves are what byte-pair encoding of the token's bytes yields when only
merges of lower rank are allowed; so the merges list is recovered by running that encoding once per token.
Tokens are written in GPT-2's byte-to-character alphabet, and text is split with tiktoken's own pattern, so
the ids match tiktoken's `encode_ordinary`. `<|endoftext|>` is the special token (BOS, EOS, UNK), as in
OpenAI's release: unlike `encode_ordinary`, Hugging Face reads that literal text as the EOT id.

`byte`: one token per UTF-8 byte, id = byte value (a byte-level BPE with no merges), except id 0: the
project's EOT, the NUL byte, which the project's tokenizer removes from text. Here id 0 is the special token
`<|endoftext|>` (BOS, EOS, UNK, as for `gpt2`), so NUL in text is dropped exactly as the project drops it.

The files are written by hand rather than by the installed `transformers`' `save_pretrained`, so that every
supported version (4.40 on) reads them the same way: the tokenizer class is `PreTrainedTokenizerFast`, a name
4.x and 5.x both resolve (5.x's own name for it, `TokenizersBackend`, does not exist in 4.x), and decoding
leaves spaces as they are (`clean_up_tokenization_spaces` defaulted to true before 5.x); tokenizer.json
writes its merges in the one form every `tokenizers` version reads.
"""

from __future__ import annotations

import json
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


def _byte_backend(tokenizer: Tokenizer):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in byte_alphabet().items() if byte != tokenizer.eot_id}
    vocab[EOT_TEXT] = tokenizer.eot_id  # NUL text now has no token: dropped, as the project's tokenizer does
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def save_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json`, which `AutoTokenizer.from_pretrained(folder)`
    reads as the project tokenizer under every supported `transformers`."""
    from tokenizers import AddedToken

    if tokenizer.name == "gpt2":
        if len(tokenizer._encoding._mergeable_ranks) != tokenizer.eot_id:
            raise UserError("the gpt2 tokenizer's EOT token is not right after its BPE tokens, so its files "
                            "cannot be written in GPT-2's layout")
        backend = _gpt2_backend(tokenizer)
    elif tokenizer.name == "byte":
        backend = _byte_backend(tokenizer)
    else:
        raise UserError(f"tokenizer {tokenizer.name!r} cannot be exported to Hugging Face: only gpt2 and "
                        "byte can")
    backend.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    if backend.token_to_id(EOT_TEXT) != tokenizer.eot_id:
        raise UserError(f"the exported {tokenizer.name} tokenizer would give <|endoftext|> another id than "
                        f"{tokenizer.eot_id}")
    spec = json.loads(backend.to_str())
    # tokenizers 0.20 on write each merge as a pair; 0.19 (transformers 4.40's) reads only "left right", which
    # every version reads. No token holds a space: GPT-2's byte alphabet spells the space byte as "Ġ".
    spec["model"]["merges"] = [" ".join(pair) if isinstance(pair, list) else pair
                               for pair in spec["model"]["merges"]]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1) + "\n",
                                           encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
        "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT,
        "clean_up_tokenization_spaces": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(tokenizer.eot_id): {
            "content": EOT_TEXT, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
