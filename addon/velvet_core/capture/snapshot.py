"""Plain-data snapshots of flows, taken on mitmproxy's event loop and handed to the writer thread.

A snapshot holds references to bytes already in memory (no copies, no parsing): the cheap part.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from velvet_core.capture.usage import UsageStripper
from velvet_core.parsing.classify import Route
from velvet_core.parsing.extract import SECRET_HEADERS, TAG_PREFIX, key_fingerprint

if TYPE_CHECKING:  # the writer thread reads snapshots without importing mitmproxy
    from mitmproxy import http

log = logging.getLogger("velvet")

META_KEY = "velvet"


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

    def __reduce__(self) -> tuple[Any, ...]:
        # a plain tuple of the fields: a fraction of the dataclass default's time (journaled for every flow)
        return _rebuild, (tuple([getattr(self, name) for name in _FIELDS]),)


_FIELDS = tuple(CallSnapshot.__dataclass_fields__)


def _rebuild(values: tuple[Any, ...]) -> CallSnapshot:
    return CallSnapshot(*values)


RECORD = 4  # the journal's frame: a tuple of plain values, this number first (3: without scheme and port, 2: also
# without the raw header fields)


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
            s.scheme, s.port)


def from_record(rec: Any) -> CallSnapshot | None:
    """A journal frame back as a snapshot (the oldest frames hold the dataclass itself, RECORD 2 frames lack
    the raw header fields); None for anything else."""
    if isinstance(rec, CallSnapshot):
        return rec
    if isinstance(rec, tuple) and len(rec) == len(_FIELDS) - 3 and rec[0] == 2:
        rec = (3, *rec[1:], None, None)  # (written before the raw header fields)
    if isinstance(rec, tuple) and len(rec) == len(_FIELDS) - 1 and rec[0] == 3:
        rec = (RECORD, *rec[1:], "https", None)  # (written before scheme and port: https, as velvet assumed)
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


_TAG = TAG_PREFIX.encode()
_SECRET = frozenset(h.encode() for h in SECRET_HEADERS)


def pop_tags(headers: http.Headers) -> dict[str, str]:
    """Remove ``velvet-metadata-<key>`` headers (so they never go upstream) and return them."""
    if not any(k[:len(_TAG)].lower() == _TAG for k, _ in headers.fields):
        return {}
    tags: dict[str, str] = {}
    for name in list(headers.keys()):
        if name.lower().startswith(TAG_PREFIX):
            tags[name[len(TAG_PREFIX):].lower()] = ", ".join(headers.get_all(name))
            del headers[name]
    return tags


def begin(flow: http.HTTPFlow, route: Route, requested_host: str) -> CallSnapshot:
    """Start a snapshot at ``requestheaders``: tags removed, the key reduced to a fingerprint.

    One pass over the raw header fields (this runs on the event loop for every call): secrets go aside for
    the fingerprint only, tag headers are taken out of the request (rare: then :func:`pop_tags`); the others
    are kept as they are, and decoded by :func:`settle` on the writer's side.
    """
    req = flow.request
    keep: list[tuple[bytes, bytes]] = []
    secret: dict[str, str] | None = None
    tagged = False
    for f in req.headers.fields:
        name = f[0].lower()
        if name in _SECRET:
            secret = secret or {}
            key, value = name.decode(), f[1].decode("utf-8", "surrogateescape")
            secret[key] = f"{secret[key]}, {value}" if key in secret else value
        elif name.startswith(_TAG):
            tagged = True
        else:
            keep.append(f)
    return CallSnapshot(
        flow_id=flow.id, method=req.method, host=requested_host, path=req.path, route=route,
        key_fingerprint=key_fingerprint(secret) if secret else None, tags=pop_tags(req.headers) if tagged else {},
        request_headers={}, request_body=None, request_encoding=None, started_at=req.timestamp_start,
        request_fields=keep, scheme=req.scheme, port=req.port,
    )


def finish(snap: CallSnapshot, flow: http.HTTPFlow) -> CallSnapshot:
    """Fill in the request body, the response and the error at ``response``/``error`` (references only: the
    header fields are decoded by :func:`settle`)."""
    req = flow.request
    snap.request_body = req.raw_content if snap.client_body is None else snap.client_body
    if snap.request_fields is None:  # (a snapshot made otherwise than by begin())
        snap.request_encoding = snap.request_headers.get("content-encoding")
    snap.request_end_at = req.timestamp_end
    if req.raw_content is None and req.stream and snap.request_tap is None:
        snap.notes.append("request body was streamed, not captured")
    resp = flow.response
    if resp is not None:
        snap.status_code = resp.status_code
        snap.response_fields = resp.headers.fields  # (an immutable tuple: mitmproxy replaces it on a change)
        snap.first_byte_at = resp.timestamp_start
        snap.ended_at = resp.timestamp_end
        if snap.stream_chunks is None:
            snap.response_body = resp.raw_content
            if resp.raw_content is None and resp.stream and snap.response_tap is None:
                snap.notes.append("response body was streamed, not captured")
    if flow.error is not None:
        snap.error = flow.error.msg
        snap.ended_at = snap.ended_at or flow.error.timestamp
    return snap


class StreamRecorder:
    """``flow.response.stream`` callable: passes each chunk on and remembers it with its arrival time.

    The chunks are recorded as they came from upstream (the answer, the usage and the time to first token
    are rebuilt from them); with a ``strip`` filter (``velvet_stream_usage=inject``) the client gets them
    without the usage velvet asked for.
    """

    __slots__ = ("chunks", "clock", "finished", "strip")

    def __init__(self, clock: Any, strip: UsageStripper | None = None) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.finished = False
        self.clock = clock
        self.strip = strip

    def __call__(self, data: bytes) -> bytes | list[bytes]:
        if data:
            self.chunks.append((self.clock(), data))
        else:
            self.finished = True
        if self.strip is not None:
            try:
                return self.strip.feed(data)
            except Exception:  # never break the stream: from here on it goes to the client as it comes
                log.exception("velvet: could not filter a stream; passing it on unfiltered")
                held, self.strip = self.strip.buf, None
                return [held + data] if held or data else []
        return data
