"""The proxy's cache look-up, off mitmproxy's event loop.

The hook awaits :meth:`Lookup.find` (an ``async`` request hook: the flow waits, the loop serves the others); the
key is computed and the database read in a small thread pool with its own connections (peewee and the driver are
imported there, at the first look-up). A hit comes back as the bytes to send: the stored answer, or a stream
rebuilt from it. Entries are written by the writer (a miss's answer, once it is logged), so proxies sharing a
PostgreSQL database share them, and a restart keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from velvet_core import clock
from velvet_core.cache.key import NotCacheable, is_stream, request_key, wants_usage
from velvet_core.cache.replay import STREAMABLE, as_stream
from velvet_core.redact import redact

log = logging.getLogger("velvet")


@dataclass(slots=True)
class Found:
    """A look-up's result: a hit has ``content``; a miss's ``key`` is where its answer goes (None: not
    cacheable, ``why`` says why)."""

    key: str | None
    content: bytes | None = None
    content_type: str = ""
    age: int = 0
    info: dict[str, Any] | None = None  # a hit: what the snapshot carries to the writer (storage/snapshot.py)
    why: str = ""


def Miss(key: str | None, why: str = "") -> Found:
    return Found(key, why=why)


class Lookup:
    def __init__(self, url: str, workers: int = 2) -> None:
        self.url = url
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="velvet-cache")
        self._db: Any = None
        self._open = threading.Lock()
        self.turns: dict[str, int] = {}  # key -> answers served (the bucket's turn), bounded
        self.bad: set[int] = set()  # corrupt entries already logged
        self.failing = False

    async def find(self, kind: str, body: bytes, *, scope: str, method: str, host: str, path: str, seed: str,
                   bucket: int, refresh: bool) -> Found:
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self.find_now, kind, body, scope, method, host, path, seed, bucket, refresh)

    def find_now(self, kind: str, body: bytes, scope: str, method: str, host: str, path: str, seed: str,
                 bucket: int, refresh: bool) -> Found:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            return Miss(None, "the body is not JSON")
        try:
            key = request_key(kind, req, scope=scope, method=method, host=host, path=path, seed=seed)
        except NotCacheable as e:
            return Miss(None, str(e))
        stream = is_stream(req)
        if stream and kind not in STREAMABLE:
            return Miss(None, f"a {kind} stream is not rebuilt from the cache")
        if refresh:
            return Miss(key)
        try:
            entries = self._entries(key, bucket)
        except Exception as e:  # the database down or not yet migrated: a miss, logged once per outage
            if not self.failing:
                self.failing = True
                log.warning("velvet: cache look-up failed (answering from the API): %s",
                            redact(str(e).splitlines()[0] if str(e) else type(e).__name__))
            return Miss(key)
        self.failing = False
        if len(entries) < bucket:
            return Miss(key)  # the bucket still fills
        turn = self.turns.get(key, 0)
        if len(self.turns) > 100_000:
            self.turns.clear()
        self.turns[key] = turn + 1
        for entry in entries[turn % len(entries):] + entries[:turn % len(entries)]:
            hit = self._serve(entry, kind, stream, wants_usage(req))
            if hit is not None:
                return hit
        return Miss(key)

    def _entries(self, key: str, bucket: int) -> list[dict[str, Any]]:
        with self._open:
            if self._db is None:
                from velvet_core.storage.database import open_db

                self._db = open_db(self.url)
        from velvet_core.storage.cache_store import live_entries

        return live_entries(self._db, key, clock.now(), bucket)

    def _serve(self, e: dict[str, Any], kind: str, stream: bool, usage: bool) -> Found | None:
        """The answer of entry ``e``; None (and one log line per entry) when it is corrupt."""
        try:
            text = e["body"]
            raw = text.encode() if isinstance(text, str) else bytes(text)
            answer = orjson.loads(raw)
            if not isinstance(answer, dict) or e["endpoint"] != kind:
                raise ValueError("not an answer of this endpoint")
            if stream:
                content, ctype = as_stream(kind, answer, usage), "text/event-stream; charset=utf-8"
            elif e["stream"]:
                content, ctype = orjson.dumps(answer), "application/json"
            else:
                content, ctype = raw, str(e["content_type"] or "application/json")
            created = e["created_at"]
            created = created if isinstance(created, datetime) else clock.parse(created)
            age = max(0, int((clock.now() - created).total_seconds())) if created else 0
        except Exception as exc:
            if e.get("id") not in self.bad:
                self.bad.add(int(e.get("id") or 0))
                log.warning("velvet: cache entry %s is corrupt (%s): answered from the API instead", e.get("id"),
                            type(exc).__name__)
            return None
        return Found(None, content, ctype, age, {
            "hit": e["id"], "flow_id": e["flow_id"], "cost_usd": e["cost_usd"],
            "input_tokens": e["input_tokens"], "output_tokens": e["output_tokens"], "model": e["model"]})

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
