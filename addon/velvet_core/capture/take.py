"""Take a :class:`~velvet_core.storage.snapshot.CallSnapshot` of a flow, on mitmproxy's event loop: the request's
half at ``requestheaders`` (:func:`begin`), the rest when it ends (:func:`finish`), streamed bodies as they pass
(:class:`StreamRecorder`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from velvet_core.capture.usage import UsageStripper
from velvet_core.parsing.classify import Route
from velvet_core.parsing.extract import SECRET_HEADERS, TAG_PREFIX, key_fingerprint
from velvet_core.secret_names import PLAIN, redact_path, secret_header
from velvet_core.storage.snapshot import CallSnapshot

if TYPE_CHECKING:  # the writer thread reads snapshots without importing mitmproxy
    from mitmproxy import http

log = logging.getLogger("velvet")

META_KEY = "velvet"


_TAG = TAG_PREFIX.encode()
_SECRET = frozenset(h.encode() for h in SECRET_HEADERS)
CACHE_PREFIX = "velvet-cache"
_CACHE = CACHE_PREFIX.encode()
# velvet-cache (on, off, refresh), velvet-cache-ttl, velvet-cache-seed: what the snapshot keeps of each
_CACHE_HEADERS = {"velvet-cache": "header", "velvet-cache-ttl": "ttl", "velvet-cache-seed": "seed"}


def pop_cache_headers(headers: http.Headers) -> dict[str, str]:
    """Remove the ``velvet-cache*`` headers (they never go upstream) and return the cache's requests:
    ``header`` (on, off, refresh; lower case), ``ttl``, ``seed``."""
    out: dict[str, str] = {}
    for name in list(headers.keys()):
        low = name.lower()
        if low.startswith(CACHE_PREFIX):
            if field := _CACHE_HEADERS.get(low):
                value = ", ".join(headers.get_all(name)).strip()
                out[field] = value.lower() if field == "header" else value
            del headers[name]
    return out


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
    """Start a snapshot at ``requestheaders``: tags removed, the key (header or query) reduced to a fingerprint.

    One pass over the raw header fields (this runs on the event loop for every call): secrets go aside for
    the fingerprint only, tag headers are taken out of the request (rare: then :func:`pop_tags`); the others
    are kept as they are, and decoded by :func:`settle` on the writer's side.
    """
    req = flow.request
    keep: list[tuple[bytes, bytes]] = []
    secret: dict[str, str] | None = None
    tagged = cached = False
    for f in req.headers.fields:
        name = f[0].lower()
        if name in PLAIN:
            keep.append(f)
        elif name in _SECRET or secret_header(name):
            secret = secret or {}
            key, value = name.decode(), f[1].decode("utf-8", "surrogateescape")
            secret[key] = f"{secret[key]}, {value}" if key in secret else value
        elif name.startswith(_TAG):
            tagged = True
        elif name.startswith(_CACHE):
            cached = True
        else:
            keep.append(f)
    # a key in the query (?api-key=, ?key=) is taken out here, before the journal: no later stage holds it
    path, query_key = redact_path(req.path)
    if query_key is not None and not secret:
        secret = {"api-key": query_key}
    # (the fields in their order, the later ones set after: matching 15 keywords took 0.85 us of this call's 1.74)
    snap = CallSnapshot(flow.id, req.method, requested_host, path, route,
                        key_fingerprint(secret) if secret else None, pop_tags(req.headers) if tagged else {},
                        {}, None, None, req.timestamp_start)
    snap.request_fields, snap.scheme, snap.port = keep, req.scheme, req.port
    if cached:
        snap.cache = pop_cache_headers(req.headers)
    return snap


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
        fields = resp.headers.fields  # (an immutable tuple: mitmproxy replaces it on a change)
        for k, _ in fields:
            if k not in PLAIN and secret_header(k):  # (set-cookie, a gateway's token: never journaled)
                fields = tuple(f for f in fields if not secret_header(f[0]))
                break
        snap.response_fields = fields
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
