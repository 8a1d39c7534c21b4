"""Numbers, money, durations and tables for people (the CLI and flow comments)."""

from __future__ import annotations

import base64
import hashlib
import math
import re
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO


def money(v: float | None) -> str:
    """``$12.34``; small amounts keep two significant digits (``$0.0012``)."""
    if v is None:
        return "-"
    if v == 0:
        return "$0.00"
    if abs(v) >= 1:
        return f"${v:,.2f}"
    return f"${v:.{max(2, 1 - math.floor(math.log10(abs(v))))}f}"


def duration(seconds: float | None) -> str:
    """``3h 12m``, ``2m 5s``, ``45s``, ``0.8s``, ``2d 3h``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = round(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s}s"
    return f"{s}s"


def ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f} ms" if v < 10_000 else duration(v / 1000)


def count(v: int | float | None) -> str:
    return "-" if v is None else f"{v:,}"


def size(n: int | None) -> str:
    """Bytes for people: ``512 B``, ``3.4 MB``, ``12.0 GB`` (powers of 1000)."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def when(iso: str | None) -> str:
    """An ISO timestamp as ``2026-11-24 15:04:05`` (UTC)."""
    return "-" if not iso else iso.replace("T", " ").rstrip("Z")


# Code points a terminal acts on instead of showing: C0, DEL, C1 (ESC starts colour, title and
# clear-screen sequences; 0x9b is a one-byte CSI) and the bidi overrides/isolates that reorder a line
# (Trojan Source). Shown as escapes, so the reader sees that something was there.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_INLINE = str.maketrans({c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS})
_MULTILINE = str.maketrans({c: v for c, v in _INLINE.items() if c not in (0x0A, 0x09)})


def printable(value: Any, multiline: bool = False) -> str:
    """``value`` as text safe for a terminal: control and bidi characters become visible escapes
    (``\\x1b``, ``\\u202e``); with ``multiline``, newlines and tabs are kept (CRLF as a newline).
    Every value from traffic the CLI prints goes through here (``--json`` output does not: JSON escapes)."""
    text = "" if value is None else str(value)
    if multiline:
        return text.replace("\r\n", "\n").translate(_MULTILINE)
    return text.translate(_INLINE)


_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.S)
IMAGE_MIN = 256  # characters: shorter base64 is shown as it is


def without_images(value: Any, key: str = "") -> Any:
    """A parsed request or answer with each base64 image (``b64_json``, an image generation call's ``result``,
    a ``data:…;base64,`` URL) replaced by its size and the start of its SHA-256: a page of text, not megabytes."""
    if isinstance(value, dict):
        out = {k: without_images(v, k) for k, v in value.items()}
        if value.get("type") == "image_generation_call" and isinstance(value.get("result"), str):
            out["result"] = _image_note(value["result"], "image")
        return out
    if isinstance(value, list):
        return [without_images(v, key) for v in value]
    if isinstance(value, str) and len(value) >= IMAGE_MIN:
        if m := _DATA_URL.fullmatch(value):
            return _image_note(m[2], m[1])
        if key == "b64_json" and _BASE64.fullmatch(value):
            return _image_note(value, "image")
    return value


def _image_note(b64: str, kind: str) -> str:
    try:
        data = base64.b64decode(b64, validate=False)
    except ValueError:  # (binascii.Error) not base64 after all: its length only
        return f"<{kind}: {len(b64):,} characters, not base64>"
    return f"<{kind}: {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}>"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = (),
          out: TextIO | None = None, whole: Sequence[int] = ()) -> None:
    """Print an aligned table; ``right`` are the indexes of right-aligned (numeric) columns.

    On a terminal narrower than the table, the widest text columns are narrowed to fit (their longer cells end in
    "…"), none under its heading or :data:`CUT_FLOOR` characters; numbers (``right``) and ``whole`` columns (ids
    to copy) are never cut. Written elsewhere (a pipe, a file), every value is whole."""
    out = out or sys.stdout
    cells = [[printable(h) for h in headers]] + [[printable(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if limit := terminal_columns(out):
        cuttable = [i for i in range(len(widths)) if i not in right and i not in whole]
        floors = [min(w, max(len(h), CUT_FLOOR)) for w, h in zip(widths, cells[0], strict=True)]
        if (cut := fit(widths, cuttable, floors, limit)) != widths:
            mark = _ellipsis(out)
            widths = cut
            cells = [[v if len(v) <= w else v[:w - len(mark)] + mark for v, w in zip(r, widths, strict=True)]
                     for r in cells]
    for n, r in enumerate(cells):
        line = "  ".join(v.rjust(w) if i in right else v.ljust(w)
                         for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        out.write(line.rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


CUT_FLOOR = 10  # characters a narrowed column keeps at least (more when its heading is longer)


def fit(widths: Sequence[int], cuttable: Sequence[int], floors: Sequence[int], limit: int) -> list[int]:
    """Column widths whose lines (two spaces between columns) fit in ``limit`` characters, the widest of the
    ``cuttable`` columns narrowed first, none under its floor: as near as the floors allow, and the widths as
    they are when they fit."""
    w = list(widths)
    over = sum(w) + 2 * (len(w) - 1) - limit
    while over > 0:
        left = [i for i in cuttable if w[i] > floors[i]]
        if not left:
            break
        i = max(left, key=w.__getitem__)
        second = max((w[j] for j in left if j != i), default=0)  # (narrowed to it at once, then in turn)
        step = max(1, min(over, w[i] - max(floors[i], second)))
        w[i] -= step
        over -= step
    return w


def terminal_columns(out: TextIO) -> int:
    """The width of the terminal ``out`` writes to (:func:`shutil.get_terminal_size`: ``COLUMNS`` first); 0 when
    ``out`` is not a terminal."""
    try:
        return shutil.get_terminal_size().columns if out.isatty() else 0
    except (AttributeError, ValueError):
        return 0


def _ellipsis(out: TextIO) -> str:
    try:
        "…".encode(getattr(out, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return "~"
    return "…"


def pairs(items: Sequence[tuple[str, Any]], out: TextIO | None = None) -> None:
    """Print ``label  value`` lines with the labels aligned."""
    out = out or sys.stdout
    width = max((len(k) for k, _ in items), default=0)
    for k, v in items:
        out.write(f"{printable(k).ljust(width)}  {'-' if v is None or v == '' else printable(v)}\n")


class Progress:
    """A one-line progress bar on a terminal's stderr (nothing when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.done = 0
        self._last = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            frac = self.done / self.total if self.total else 1.0
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {self.done:,}/{self.total:,}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
