"""Tokenizers: GPT-2 ids must equal tiktoken's published ones; both tokenizers must round-trip any text."""

import pytest
import tiktoken

from common.errors import UserError
from data.tokenizers import get_tokenizer

TEXTS = [
    "hello world",
    "Grüße, 東京! naïve café — ☃\n\ttabs and  spaces",
    "emoji 🤖🎭 and <|endoftext|> as text",
    "",
]


def test_gpt2_encodes_hello_world_as_published():
    """Otherwise the ranks are not GPT-2's and pretrained weights or nanoGPT files would not match."""
    assert get_tokenizer("gpt2").encode("hello world") == [31373, 995]


def test_gpt2_matches_tiktoken_and_treats_special_text_as_text():
    """Otherwise documents tokenise differently from nanoGPT, or a literal <|endoftext|> in a document
    would become a document separator."""
    reference = tiktoken.get_encoding("r50k_base")
    tokenizer = get_tokenizer("gpt2")
    for text in TEXTS:
        assert tokenizer.encode(text) == reference.encode_ordinary(text)
    assert 50256 not in tokenizer.encode("<|endoftext|>")
    assert tokenizer.encode_batch(TEXTS) == [reference.encode_ordinary(t) for t in TEXTS]


def test_gpt2_arrays_equal_the_lists_even_with_lone_surrogates():
    """Otherwise the token files (written from encode_arrays) differ from nanoGPT's encode_ordinary, or a
    lone surrogate (possible in JSON input) fails a whole preparation. The reference repairs it by hand."""
    reference = tiktoken.get_encoding("r50k_base")
    texts = [*TEXTS, "broken \ud800 pair", "<|endoftext|> in text"]
    arrays = get_tokenizer("gpt2").encode_arrays(texts)
    for text, array in zip(texts, arrays, strict=True):
        repaired = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        assert array.dtype.kind == "u" and array.tolist() == reference.encode_ordinary(repaired)


@pytest.mark.parametrize("name", ["gpt2", "byte"])
def test_round_trip(name):
    """Otherwise text would be lost or altered between a document and its tokens."""
    tokenizer = get_tokenizer(name)
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_byte_tokens_are_utf8_bytes_and_nul_is_dropped():
    """Otherwise the byte tokenizer is not plain UTF-8, or a NUL in a document would pose as the EOT."""
    tokenizer = get_tokenizer("byte")
    assert tokenizer.encode("é!") == list("é!".encode())
    assert tokenizer.encode("a\x00b") == [ord("a"), ord("b")]


@pytest.mark.parametrize(("name", "vocab_size", "eot_id"), [("gpt2", 50257, 50256), ("byte", 256, 0)])
def test_vocab_size_and_eot(name, vocab_size, eot_id):
    """Otherwise model embeddings and document separators would disagree with the token files."""
    tokenizer = get_tokenizer(name)
    assert (tokenizer.name, tokenizer.vocab_size, tokenizer.eot_id) == (name, vocab_size, eot_id)


def test_unknown_name_lists_the_valid_ones():
    """Otherwise a typo in data.tokenizer would give a KeyError instead of telling the user what exists."""
    with pytest.raises(UserError, match="gpt2, byte"):
        get_tokenizer("gpt3")
