"""``--json`` output, the same for every command: indented JSON, timestamps as ISO 8601 UTC."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any, TextIO

import orjson


def default(v: Any) -> Any:
    """What orjson cannot write by itself: datetimes (UTC, to the second), bytes (as text), the rest as text."""
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(v, bytes | memoryview):
        return bytes(v).decode("utf-8", "replace")
    return str(v)


def dump(value: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(orjson.dumps(value, default=default, option=orjson.OPT_INDENT_2).decode() + "\n")


def pretty(value: Any) -> str:
    """JSON pretty-printed; text as it is."""
    if isinstance(value, dict | list):
        return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    return "-" if value is None else str(value)
