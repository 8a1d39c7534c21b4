"""The error policy: which database errors are worth retrying, and smaller forms of an operation.

Transient errors (connection lost, server restarting, lock timeouts) keep the operations and retry.
Anything else is about the data: the writer isolates the operation that fails, writes the others, then
tries the smaller forms below, and puts what still fails in the dead-letter file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import peewee

from velvet_core.redact import redact
from velvet_core.storage.ops import BatchSeen, CallRow, FileSeen, Op, RequestLines, ResultLines, UploadSeen
from velvet_core.storage.values import INDEXED_BYTES


def transient(e: BaseException) -> bool:
    """Errors of the connection or the server, not of the data."""
    return isinstance(e, peewee.OperationalError | peewee.InterfaceError | ConnectionError | TimeoutError)


_EXHAUSTED = ("database or disk is full", "disk i/o error", "no space left", "cannot rollback - no transaction",
              "file too large", "disk quota")


def exhausted(e: BaseException) -> bool:
    """A full disk or a failing one (SQLite's SQLITE_FULL/IOERR, PostgreSQL's class 53): never about the data,
    however often it repeats."""
    for x in (e, e.__cause__, e.__context__):
        if x is not None and (str(getattr(x, "sqlstate", "") or "").startswith("53")
                              or any(s in str(x).lower() for s in _EXHAUSTED)):
            return True
    return False


def describe(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    cause = e.__cause__ or e.__context__  # (SQLite's "disk full" hides behind a failed rollback)
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" (after {type(cause).__name__}: {' '.join(str(cause).split())[:200]})"
    return redact(f"{type(e).__name__}: {text[:400]}")


# bulky or free-form columns dropped first from a row the database refused
_BULKY = {
    CallRow: ("request_body", "response_body", "response_text", "request_headers", "response_headers", "tags",
              "error_message"),
    RequestLines: ("body",),
    ResultLines: ("body", "error_message"),
}
# what is kept at the least: the row's identity and what says it is incomplete
_MINIMAL = {
    CallRow: ("flow_id", "started_at", "ended_at", "method", "host", "endpoint", "action", "status_code",
              "latency_ms", "key_fingerprint", "request_id", "model_requested", "model"),
    RequestLines: ("file_id", "upload_part_id", "part_line_no", "line_no", "batch_id"),
    ResultLines: ("file_id", "line_no", "batch_id", "failed", "seen_at"),
}


def _problem(row: dict[str, Any], note: str) -> str:
    return f"{row['problem']}; {note}" if row.get("problem") else note


def reductions(op: Op, error: BaseException) -> Iterator[Op]:
    """Ever smaller forms of ``op`` (one row), each saying in ``problem`` what was left out."""
    why = f"velvet could not store this row as it was ({describe(error)})"
    if isinstance(op, CallRow | RequestLines | ResultLines):
        row = op.row if isinstance(op, CallRow) else op.rows[0]
        bulky = _BULKY[type(op)]
        dropped = [k for k in bulky if row.get(k) is not None]
        if dropped:
            smaller = {k: v for k, v in row.items() if k not in bulky}
            smaller["problem"] = _problem(row, f"{why}; left out: {', '.join(dropped)}")
            yield CallRow(smaller) if isinstance(op, CallRow) else type(op)([smaller])
        least = {k: _short(row.get(k)) for k in _MINIMAL[type(op)] if k in row}
        if isinstance(op, CallRow):
            least["path"] = _short(row.get("path")) or "?"
        least["problem"] = f"{why}; only its identity was kept"
        yield CallRow(least) if isinstance(op, CallRow) else type(op)([least])
    elif isinstance(op, FileSeen | UploadSeen):
        keep = ("id", "updated_at", "first_seen_at", "purpose", "status")
        yield type(op)({k: _short(op.row[k]) for k in keep if k in op.row})
    elif isinstance(op, BatchSeen):
        yield BatchSeen({"id": _short(op.row["id"]), "status": _short(op.row.get("status")) or "unknown"},
                        op.observed_at, op.source)


def _short(v: Any) -> Any:
    """A value cut to what any column (indexed ones included) takes."""
    if isinstance(v, str):
        v = v.replace("\x00", "\ufffd").encode("utf-8", "backslashreplace")[:INDEXED_BYTES]
        return v.decode("utf-8", "ignore")
    return v
