"""Streamed continuations (gpt/eval/continuation.py): the pieces handed out add up to the final text, never
show half a character or the start of a stop string that then completes, and end at the end-of-text token
or before the first stop string."""

from __future__ import annotations

from data.tokenizers import get_tokenizer
from gpt.eval.continuation import REPLACEMENT, Continuation

TEXT = "Ω naïve 日本語 🤖 end.\n\nNext paragraph: ZZ stop here"


def stream(tokenizer, ids, stop=(), stop_at_eot=True) -> tuple[list[str], Continuation]:
    continuation = Continuation(tokenizer, stop, stop_at_eot)
    pieces = [continuation.add(token) for token in ids]
    pieces.append(continuation.finish())
    return pieces, continuation


def test_pieces_add_up_and_never_split_a_character():
    """Wrong if a piece shows a replacement character for a multi-byte character still arriving byte by byte,
    or the pieces do not add up to the decoded text."""
    for name in ("byte", "gpt2"):
        tokenizer = get_tokenizer(name)
        pieces, continuation = stream(tokenizer, tokenizer.encode(TEXT))
        assert "".join(pieces) == continuation.text == TEXT, name
        assert not any(REPLACEMENT in piece for piece in pieces), name


def test_stop_strings_cut_before_the_first_one():
    """Wrong if the text goes past the earliest stop string, includes it, or shows a prefix of it that later
    turns out to be the stop string."""
    tokenizer = get_tokenizer("byte")
    pieces, continuation = stream(tokenizer, tokenizer.encode(TEXT), stop=["ZZ", "\n\n"])
    assert continuation.text == TEXT[: TEXT.index("\n\n")]
    assert "".join(pieces) == continuation.text and continuation.done
    pieces, continuation = stream(tokenizer, tokenizer.encode(TEXT), stop=["stop here", "ZZ"])
    assert continuation.text == TEXT[: TEXT.index("ZZ")]


def test_a_held_prefix_that_does_not_complete_is_shown():
    """Wrong if text that only looked like the start of a stop string is lost, or shown twice."""
    tokenizer = get_tokenizer("byte")
    ids = tokenizer.encode("a Z b ZY c")
    continuation = Continuation(tokenizer, ["ZZ"])
    pieces = [continuation.add(token) for token in ids]
    assert pieces[ids.index(ord("Z"))] == ""  # "Z" waits: it may be the start of "ZZ"
    assert "".join(pieces) + continuation.finish() == "a Z b ZY c"


def test_end_of_text_ends_unless_ignored():
    """Wrong if the end-of-text token does not end the sample, is decoded into it, or ends it when the user
    asked to sample past it."""
    tokenizer = get_tokenizer("gpt2")
    ids = [*tokenizer.encode("first"), tokenizer.eot_id, *tokenizer.encode(" second")]
    pieces, continuation = stream(tokenizer, ids)
    assert continuation.text == "".join(pieces) == "first" and continuation.done
    pieces, continuation = stream(tokenizer, ids, stop_at_eot=False)
    assert continuation.text == "first<|endoftext|> second"
