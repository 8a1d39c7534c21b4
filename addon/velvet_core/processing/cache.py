"""The response cache's part of processing: a hit's row (``cache_hit``, the original's tokens, ``cost_usd`` 0,
``saved_usd`` the original's cost) and a miss's entry (stored only for an answer 200 and whole)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from velvet_core.parsing.extract import utc
from velvet_core.processing.calls import Body
from velvet_core.storage.ops import CacheHit, CacheStore, Op
from velvet_core.storage.snapshot import CallSnapshot


def mark_hit(s: CallSnapshot, row: dict[str, Any]) -> Iterator[Op]:
    """A call the proxy answered from an entry: its row says so; the entry's hits are counted."""
    c = s.cache or {}
    if "hit" not in c:
        return
    row["cache_hit"] = True
    row["saved_usd"] = c.get("cost_usd")
    row["cost_usd"] = 0.0
    row["usage_estimated"] = False
    inp, out = c.get("input_tokens"), c.get("output_tokens")
    row["input_tokens"], row["output_tokens"] = inp, out
    row["total_tokens"] = (inp or 0) + (out or 0) if inp is not None or out is not None else None
    row["model"] = row.get("model") or c.get("model")
    started = utc(s.started_at)
    if started is not None:
        yield CacheHit(int(c["hit"]), started)


def entry(s: CallSnapshot, row: dict[str, Any], resp: Body | None, body_limit: int) -> Iterator[Op]:
    """A miss whose answer is to be stored: an entry, if the answer is 200, whole, JSON and within the limit.

    Whole is the call row's ``complete`` (:func:`~velvet_core.processing.calls.parse_call` decides it): a flow
    that ended in a connection error is not, except a stream whose end event had come, which a client may hang up
    right after."""
    c = s.cache or {}
    if "key" not in c or "hit" in c or s.status_code != 200 or not row.get("complete", True) \
            or row.get("error_type"):
        return
    if s.stream_chunks is not None:  # the stream reassembled: served as JSON, or streamed again
        text, ctype, stream = row.get("response_body"), "application/json", True
    elif resp is not None and resp.is_json and resp.data is not None:
        try:
            text = resp.data.decode("utf-8")
        except UnicodeDecodeError:
            return
        ctype, stream = s.response_headers.get("content-type", "application/json"), False
    else:
        return
    if not text or len(text) > body_limit:
        return
    created = utc(s.ended_at or s.started_at)
    if created is None:
        return
    yield CacheStore({
        "key": c["key"], "flow_id": s.flow_id, "created_at": created,
        "expires_at": created + timedelta(seconds=float(c["ttl"])), "hits": 0, "endpoint": s.route.kind,
        "model": row.get("model") or row.get("model_requested"), "key_fingerprint": s.key_fingerprint,
        "content_type": ctype, "body": text, "size": len(text.encode()), "stream": stream,
        "input_tokens": row.get("input_tokens"), "output_tokens": row.get("output_tokens"),
        "cost_usd": row.get("cost_usd")}, int(c.get("bucket", 1)))
