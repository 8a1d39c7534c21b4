"""Bodies and lines that are not valid UTF-8: parsed and kept with the bad bytes replaced, and said so.

A body or batch line with a few bad bytes is still the answer a user wants to see (and a line still has
its ``custom_id``): dropping it loses more than replacing the bytes with U+FFFD.
"""

from __future__ import annotations

from typing import Any

import orjson

_REPLACEMENT = "\N{REPLACEMENT CHARACTER}".encode()


def replaced(data: bytes) -> tuple[str, int]:
    """``data`` as text, each invalid UTF-8 sequence replaced by U+FFFD, and how many were replaced."""
    text = data.decode("utf-8", "replace")
    return text, text.count("\N{REPLACEMENT CHARACTER}") - data.count(_REPLACEMENT)


def replaced_note(bad: int) -> str:
    """The ``problem`` wording for ``bad`` replaced sequences."""
    return f"not UTF-8 ({bad} invalid byte sequence{'s' if bad != 1 else ''} replaced by U+FFFD)"


def loads_replaced(data: bytes) -> tuple[Any, str, int]:
    """For ``data`` that orjson refused: (its JSON value once bad bytes are replaced, else None; its text;
    how many sequences were replaced, 0 when it was valid UTF-8 and the JSON itself is bad)."""
    text, bad = replaced(data)
    if not bad:
        return None, text, 0
    try:
        return orjson.loads(text), text, bad
    except orjson.JSONDecodeError:
        return None, text, bad
