"""Values both databases accept: what a client or the API sent must never stop a write.

PostgreSQL refuses NUL characters in text, neither backend can encode a lone surrogate, and integer
columns hold 64 bits. :func:`clean_rows` fixes such values in place before they are written and says
what it changed, so the row keeps a ``problem`` naming it. The check is a few type tests per value: the
common case (ASCII text, small integers) costs almost nothing.
"""

from __future__ import annotations

from typing import Any

INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
INDEXED_BYTES = 800  # PostgreSQL's btree entries hold 2,704 bytes: a four-column index of such values still fits


def clean_text(s: str) -> tuple[str, str | None]:
    """``s`` made storable, and what was wrong with it (None when nothing was)."""
    if s.isascii():
        if "\x00" not in s:
            return s, None
        return s.replace("\x00", "\ufffd"), "NUL characters replaced"
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
        what = "lone surrogates escaped"
        if "\x00" in s:
            s, what = s.replace("\x00", "\ufffd"), what + ", NUL characters replaced"
        return s, what
    if "\x00" in s:
        return s.replace("\x00", "\ufffd"), "NUL characters replaced"
    return s, None


def clean_row(row: dict[str, Any], bounded: frozenset[str] = frozenset()) -> list[str]:
    """Make every value of ``row`` storable, in place; the notes say what changed (empty: nothing).

    ``bounded``: indexed columns, whose values are cut to :data:`INDEXED_BYTES` (an index entry is limited).
    """
    notes: list[str] = []
    for key, v in row.items():
        t = type(v)
        if t is str:
            if not (v.isascii() and "\x00" not in v):
                fixed, what = clean_text(v)
                if what:
                    row[key] = v = fixed
                    notes.append(f"{key}: {what}")
            if len(v) > INDEXED_BYTES // 4 and key in bounded and len(raw := v.encode()) > INDEXED_BYTES:
                row[key] = raw[:INDEXED_BYTES].decode("utf-8", "ignore")
                notes.append(f"{key}: cut from {len(raw):,} to {INDEXED_BYTES} bytes (an indexed column)")
        elif t is int and not INT_MIN <= v <= INT_MAX:
            row[key] = None
            notes.append(f"{key}: {v.bit_length()}-bit integer out of range, dropped")
    return notes


def clean_rows(rows: list[dict[str, Any]], problem: str | None = "problem",
               bounded: frozenset[str] = frozenset()) -> None:
    """:func:`clean_row` for each row; notes are appended to the row's ``problem`` column if it has one."""
    for row in rows:
        if (notes := clean_row(row, bounded)) and problem:
            note = "velvet made values storable: " + ", ".join(notes)
            row[problem] = f"{row[problem]}; {note}" if row.get(problem) else note
