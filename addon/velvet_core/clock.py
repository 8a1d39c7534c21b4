"""Time, one kind everywhere: naive UTC ``datetime`` (what both databases store), whatever comes in.

Every timestamp velvet reads (a database row, a status file's ``…Z`` text, an API's Unix seconds, an ISO string
with an offset) goes through :func:`parse` or :func:`from_epoch`, and the current time is :func:`now`, so two
of them always compare: a naive and an aware datetime never meet (``velvet status`` crashed on that).
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from typing import Any, overload

FAR = 253402300800  # 10000-01-01 in Unix seconds: no time velvet keeps is later


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(dt: datetime) -> datetime:
    """An aware datetime converted to UTC without its zone; a naive one is taken as UTC already."""
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo is not None else dt


@overload
def from_epoch(t: float) -> datetime: ...
@overload
def from_epoch(t: float | None) -> datetime | None: ...
def from_epoch(t: float | None) -> datetime | None:
    """Unix seconds as naive UTC."""
    return None if t is None else datetime.fromtimestamp(t, UTC).replace(tzinfo=None)


def parse(v: Any) -> datetime | None:
    """A datetime, or ISO 8601 text (``Z`` or an offset allowed; none means UTC), as naive UTC; None for None.
    Raises ValueError on text that is not a time."""
    if v is None:
        return None
    return naive_utc(v if isinstance(v, datetime) else datetime.fromisoformat(str(v).strip()))


def iso_z(v: Any) -> str | None:
    """ISO 8601 UTC to the second, ``2026-11-24T15:00:00Z`` (the ``--json`` form)."""
    dt = parse(v)
    return None if dt is None else dt.strftime("%Y-%m-%dT%H:%M:%SZ")


_REL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, at: datetime | None = None) -> datetime:
    """``2h``, ``30m``, ``7d``, ``1w``, ``today``, ``yesterday`` or an ISO date/time (UTC unless offset)."""
    at = at or now()
    t = text.strip().lower()
    if m := _REL.match(t):
        return at - timedelta(seconds=float(m[1]) * _UNITS[m[2].lower()])
    if t in ("today", "yesterday"):
        day = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return day - timedelta(days=1) if t == "yesterday" else day
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: use e.g. 2h, 7d, today or 2026-11-24T15:00") from None
    return naive_utc(dt)


def since_arg(text: str) -> datetime:
    """:func:`parse_since` as an argparse ``type``."""
    try:
        return parse_since(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
