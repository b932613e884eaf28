"""The text of a sampled continuation while its tokens arrive: what may be shown so far, and whether it has
ended, at the end-of-text token or at a stop string.

Shown text never changes afterwards: a token that ends inside a multi-byte character (byte-level tokenizers,
and BPE tokens that split a character) is held back until the character is complete, and so is an ending
that could be the start of a stop string. The stop string itself is not part of the text, nor is the
end-of-text token. The sampling command streams with it; the lm-evaluation-harness model stops with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from data.tokenizers import Tokenizer

REPLACEMENT = "\N{REPLACEMENT CHARACTER}"  # what decoding makes of an incomplete UTF-8 sequence


class Continuation:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), stop_at_eot: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stop_at_eot = stop_at_eot
        self.ids: list[int] = []
        self.text = ""  # the final text once `done`; until then, everything decoded so far
        self.shown = 0  # characters of `text` handed out by `add` and `finish`
        self.done = False

    def add(self, token: int) -> str:
        """Take the next token; returns the text that became final with it (often empty)."""
        if self.done:
            return ""
        if self.stop_at_eot and token == self.tokenizer.eot_id:
            self.done = True
            return self._rest()
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cut = min((self.text.find(s) for s in self.stop if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.done = self.text[:cut], True
            return self._rest()
        safe = self.text.rstrip(REPLACEMENT)
        held = max((k for s in self.stop for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
        return self._upto(len(safe) - held)  # an ending that may grow into a stop string waits

    def finish(self) -> str:
        """The rest of the text once no more tokens come (the held-back part)."""
        self.done = True
        return self._rest()

    def _rest(self) -> str:
        return self._upto(len(self.text))

    def _upto(self, end: int) -> str:
        if end <= self.shown:
            return ""
        new, self.shown = self.text[self.shown : end], end
        return new
