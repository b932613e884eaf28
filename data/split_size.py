"""Whether a prepared validation split is large enough for its loss to mean something.

The split is by whole documents (`ceil(val_fraction × documents)` of them), so a corpus of a few dozen files
with the default `val_fraction` holds out one file, and a small corpus a few thousand tokens: the validation
loss then measures one text, or mostly noise. Preparation and training warn, naming the `data.val_fraction`
that would fix it; they do not refuse, since a small experiment may want exactly that split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MIN_VAL_TOKENS = 10_000       # fewer, and the validation loss is mostly sampling noise
MIN_VAL_DOCUMENTS = 5         # asked of corpora that have MANY_DOCUMENTS or more
MANY_DOCUMENTS = 20           # enough documents to hold out several without starving the training split
MAX_VAL_FRACTION = 0.5


def validation_warning(meta: Mapping[str, Any]) -> str | None:
    """A one-line warning with the fix when the validation split of `meta` (a prepared folder's meta.json)
    is a single document out of many or under MIN_VAL_TOKENS tokens; None when it is large enough."""
    val, train = meta["splits"]["val"], meta["splits"]["train"]
    documents = val["documents"] + train["documents"]
    few_tokens = val["tokens"] < MIN_VAL_TOKENS
    one_of_many = val["documents"] == 1 and documents >= MANY_DOCUMENTS
    if not (few_tokens or one_of_many):
        return None
    what = (f"the validation split is {val['documents']:,} of {documents:,} documents, {val['tokens']:,} "
            f"tokens (data.val_fraction={meta['val_fraction']:g})")
    tokens_per_document = (val["tokens"] + train["tokens"]) / documents
    wanted = max(MIN_VAL_DOCUMENTS if documents >= MANY_DOCUMENTS else 1,
                 math.ceil(MIN_VAL_TOKENS / tokens_per_document))
    fraction = _round_up(wanted / documents)
    if fraction > MAX_VAL_FRACTION:
        return (f"{what}: its loss is mostly noise, and the corpus ({documents:,} documents) is too small to "
                f"hold out {MIN_VAL_TOKENS:,} tokens; add text for a meaningful validation loss")
    return (f"{what}: its loss measures {'one text' if val['documents'] == 1 else 'little text'}; for at "
            f"least {wanted} documents and ≈{MIN_VAL_TOKENS:,} tokens, prepare again with "
            f"data.val_fraction={fraction:g} into a new data.dir")


def _round_up(x: float) -> float:
    """x rounded up to two significant digits (0.0833 → 0.084), so the suggestion still holds enough."""
    digits = 1 - math.floor(math.log10(x))
    return math.ceil(x * 10**digits) / 10**digits
