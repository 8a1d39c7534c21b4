"""The snapshot: a finished flow as plain data, the one type between the hooks, the writer and processing.

Taken on mitmproxy's event loop (:mod:`velvet_core.capture.take`), journaled, and turned into operations on the
writer's side. It holds references to bytes already in memory (no copies, no parsing): the cheap part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velvet_core.parsing.classify import Route


@dataclass(slots=True)
class TapInfo:
    """How a body streamed through velvet's tap went (see :mod:`velvet_core.capture.tap`)."""

    path: Path | None  # the spill file, removed once parsed
    bytes: int = 0
    finished: bool = False
    broken: str | None = None


Fields = tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]]


@dataclass(slots=True)
class CallSnapshot:
    flow_id: str
    method: str
    host: str
    path: str
    route: Route
    key_fingerprint: str | None
    tags: dict[str, str]
    request_headers: dict[str, str]
    request_body: bytes | None
    request_encoding: str | None
    started_at: float
    request_end_at: float | None = None
    status_code: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    response_body: bytes | None = None
    response_encoding: str | None = None
    first_byte_at: float | None = None
    ended_at: float | None = None
    stream_chunks: list[tuple[float, bytes]] | None = None
    stream_finished: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    request_tap: TapInfo | None = None
    response_tap: TapInfo | None = None
    client_body: bytes | None = None  # the body as the client sent it, when velvet changed it upstream
    # the header fields as mitmproxy holds them (bytes, secrets and tags taken out), taken on the event loop and
    # decoded into the dicts above by :func:`settle`, on the writer's side
    request_fields: Fields | None = None
    response_fields: Fields | None = None
    scheme: str = "https"  # as the request went upstream (a local server may be plain http on any port)
    port: int | None = None
    # the response cache's part: {"key", "ttl", "bucket", "scope"} for a miss whose answer is to be stored,
    # {"hit": entry id, "flow_id", "cost_usd", "input_tokens", "output_tokens", "model"} for a hit
    cache: dict[str, Any] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # a plain tuple of the fields: a fraction of the dataclass default's time (journaled for every flow)
        return _rebuild, (tuple([getattr(self, name) for name in _FIELDS]),)


_FIELDS = tuple(CallSnapshot.__dataclass_fields__)


def _rebuild(values: tuple[Any, ...]) -> CallSnapshot:
    return CallSnapshot(*values)


RECORD = 5  # the journal's frame: a tuple of plain values, this number first (4: without the cache's part, 3: also
# without scheme and port, 2: also without the raw header fields)


def to_record(s: CallSnapshot) -> tuple[Any, ...]:
    """The snapshot as plain values (the journal's frame, pickled on the event loop for every flow).

    Pickling a tuple of builtins takes a third of the time of pickling the dataclass: no class is looked up by
    name, and reading it back imports nothing. The order is :data:`_FIELDS`'s (tested).
    """
    r = s.route
    return (RECORD, s.flow_id, s.method, s.host, s.path, (r.kind, r.action, r.path, r.object_id, r.deployment),
            s.key_fingerprint, s.tags, s.request_headers, s.request_body, s.request_encoding, s.started_at,
            s.request_end_at, s.status_code, s.response_headers, s.response_body, s.response_encoding,
            s.first_byte_at, s.ended_at, s.stream_chunks, s.stream_finished, s.error, s.notes,
            _tap(s.request_tap), _tap(s.response_tap), s.client_body, s.request_fields, s.response_fields,
            s.scheme, s.port, s.cache)


def from_record(rec: Any) -> CallSnapshot | None:
    """A journal frame back as a snapshot (the oldest frames hold the dataclass itself, RECORD 2 frames lack
    the raw header fields); None for anything else."""
    if isinstance(rec, CallSnapshot):
        return rec
    if isinstance(rec, tuple) and len(rec) == len(_FIELDS) - 4 and rec[0] == 2:
        rec = (3, *rec[1:], None, None)  # (written before the raw header fields)
    if isinstance(rec, tuple) and len(rec) == len(_FIELDS) - 2 and rec[0] == 3:
        rec = (4, *rec[1:], "https", None)  # (written before scheme and port: https, as velvet assumed)
    if isinstance(rec, tuple) and len(rec) == len(_FIELDS) and rec[0] == 4:
        rec = (RECORD, *rec[1:], None)  # (written before the cache)
    if not (isinstance(rec, tuple) and len(rec) == len(_FIELDS) + 1 and rec[0] == RECORD):
        return None
    v = list(rec[1:])
    v[_ROUTE] = Route(*v[_ROUTE])
    v[_REQUEST_TAP], v[_RESPONSE_TAP] = _untap(v[_REQUEST_TAP]), _untap(v[_RESPONSE_TAP])
    return CallSnapshot(*v)


_ROUTE, _REQUEST_TAP, _RESPONSE_TAP = (_FIELDS.index(n) for n in ("route", "request_tap", "response_tap"))


def _tap(t: TapInfo | None) -> tuple[str | None, int, bool, str | None] | None:
    return None if t is None else (None if t.path is None else str(t.path), t.bytes, t.finished, t.broken)


def _untap(t: tuple[str | None, int, bool, str | None] | None) -> TapInfo | None:
    return None if t is None else TapInfo(None if t[0] is None else Path(t[0]), t[1], t[2], t[3])


def header_dict(fields: Fields) -> dict[str, str]:
    """Raw header fields (as mitmproxy holds them) as a dict with lower-case names, repeated headers joined by
    ', ' (bytes that are not UTF-8 kept as mitmproxy decodes them: surrogate escapes)."""
    out: dict[str, str] = {}
    for k, v in fields:
        name = k.decode("utf-8", "surrogateescape").lower()
        value = v.decode("utf-8", "surrogateescape")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def settle(s: CallSnapshot) -> CallSnapshot:
    """Decode the raw header fields the hooks took (on the writer's side: the event loop only keeps references)."""
    if s.request_fields is not None:
        s.request_headers, s.request_fields = header_dict(s.request_fields), None
        s.request_encoding = s.request_headers.get("content-encoding")
    if s.response_fields is not None:
        s.response_headers, s.response_fields = header_dict(s.response_fields), None
        s.response_encoding = s.response_headers.get("content-encoding")
    return s


def sidecar(spill: Path) -> Path:
    """The file beside a tap's spill file that describes its flow (for recovery after a crash)."""
    return spill.with_suffix(".json")
