"""The proxy's cache look-up: an in-memory index of the live keys, and the database read off the event loop.

Most requests a cache sees are misses. The proxy keeps the keys of the live entries in memory (a 64-bit prefix
of each and when it expires), loaded and followed by :mod:`storage.cache_index` (new entries every 0.25 s,
everything again every 10 minutes, which drops the expired ones) in the writer process, through a pipe the event
loop reads, or in a thread of the proxy when the writer is a thread; so a miss is decided on the event loop from
the key alone: no thread, no database. A key the index holds is read from the database in a small thread pool
(the hook is a coroutine mitmproxy awaits: the loop serves other flows meanwhile). The key of a body over 64 KiB
is computed in the pool too. peewee and the driver are imported in those threads, at the first look-up.

Entries are written by the writer (a miss's answer, once it is logged), so proxies sharing a PostgreSQL database
share them, and a restart keeps them; an entry becomes visible to a proxy's index within a quarter of a second
after it is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from velvet_core import clock
from velvet_core.cache.key import NotCacheable, key_of, wants_usage
from velvet_core.cache.replay import STREAMABLE, as_stream
from velvet_core.redact import redact
from velvet_core.storage import cache_index as index

log = logging.getLogger("velvet")

BIG_BODY = 64 * 1024  # bodies over this are parsed and hashed in the pool, not on the event loop
RETRY = 5.0  # seconds of misses without asking the database once it failed twice (no client waits on an outage)
CONNECT_TIMEOUT = 3  # seconds a look-up waits for a PostgreSQL server to answer a new connection
FEED_READ = 1 << 16  # bytes of the index's pipe read per callback on the event loop (some 1,800 keys, 0.5 ms)


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
    stream: bool = False
    usage: bool = False


def _epoch(v: Any) -> float:
    dt = v if isinstance(v, datetime) else clock.parse(v)
    return dt.replace(tzinfo=UTC).timestamp() if dt else 0.0


class Lookup:
    """The look-up; ``follow``: read the index in a thread of its own (else :meth:`feed` gives it a pipe)."""

    def __init__(self, url: str, workers: int = 2, follow: bool = True) -> None:
        self.url = url
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="velvet-cache")
        self._db: Any = None
        self._open = threading.Lock()
        self.keys: dict[str, str] = {}  # key's first 16 hex digits -> when its newest entry expires (UTC text)
        self._next: dict[str, str] | None = None  # a reload's keys, until it is done
        self.loaded = threading.Event()
        self._stop = threading.Event()
        self._feed: tuple[Any, int, index.Frames] | None = None  # (loop, fd, frames) of the writer process's pipe
        self.turns: dict[str, int] = {}  # key -> answers served (the bucket's turn), bounded
        self.bad: set[int] = set()  # corrupt entries already logged
        self.failing = False
        self._retry_at = 0.0  # (monotonic) until then, a look-up is a miss without a read: the database failed
        self._index: threading.Thread | None = None
        if follow:
            self._index = threading.Thread(target=index.Follower(url, self._stop).run, args=(self.apply,),
                                           name="velvet-cache-index", daemon=True)
            self._index.start()

    # -- the key, on the event loop (or in the pool for a big body) ------------------------------------------

    @staticmethod
    def key_for(kind: str, body: bytes, scope: str, method: str, host: str, path: str, seed: str) -> Found:
        """The key of a request of a cacheable kind, POSTed (``key`` None and ``why`` for a request the cache
        leaves alone)."""
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            return Found(None, why="the body is not JSON")
        if type(req) is not dict:
            return Found(None, why="the body is not a JSON object")
        try:
            key = key_of(kind, req, scope, method, host, path, seed)
        except NotCacheable as e:
            return Found(None, why=str(e))
        if req.get("stream") is True:
            if kind not in STREAMABLE:
                return Found(None, why=f"a {kind} stream is not rebuilt from the cache")
            return Found(key, stream=True, usage=wants_usage(req))
        return Found(key)

    async def key_off_loop(self, kind: str, body: bytes, scope: str, method: str, host: str, path: str,
                           seed: str) -> Found:
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, self.key_for, kind, body, scope, method, host, path, seed)

    def known(self, key: str) -> bool:
        """Whether the index holds a live entry of ``key`` (if not, the request is a miss: no database read); until
        the index is loaded, every key may be (the database says). Expiry is to the second, rounded up: an entry
        in its last second costs a read that finds it gone."""
        if not self.loaded.is_set():
            return True
        expires = self.keys.get(key[:16])
        return expires is not None and expires >= time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())

    # -- the hit, in the pool ----------------------------------------------------------------------------------

    async def fetch(self, kind: str, asked: Found, bucket: int) -> Found:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.fetch_now, kind, asked, bucket)

    def fetch_now(self, kind: str, asked: Found, bucket: int) -> Found:
        key = asked.key
        assert key is not None
        if time.monotonic() < self._retry_at:
            return Found(key)
        try:
            entries = self._read(key, bucket)
        except Exception as e:  # the database down or not yet migrated: a miss, logged once per outage
            if self.failing:  # (twice in a row: an outage, not a passing error)
                self._retry_at = time.monotonic() + RETRY
            self._failed(e)
            return Found(key)
        self.failing = False
        if not entries:  # (cleared, pruned or expired since the index read it: no read for it again)
            self.keys.pop(key[:16], None)
            return Found(key)
        if len(entries) < bucket:
            return Found(key)  # the bucket still fills
        turn = self.turns.get(key, 0)
        if len(self.turns) > 100_000:
            self.turns.clear()
        self.turns[key] = turn + 1
        for entry in entries[turn % len(entries):] + entries[:turn % len(entries)]:
            hit = self._serve(entry, kind, asked.stream, asked.usage)
            if hit is not None:
                return hit
        return Found(key)

    def _read(self, key: str, bucket: int) -> list[dict[str, Any]]:
        """The live entries of ``key``; a connection that fails is dropped, and one that had worked before is
        tried again at once with a new one (a server restarted meanwhile: its connections are dead for good)."""
        for last in (self._db is None, True):
            try:
                return self._entries(key, bucket)
            except Exception:
                self._drop_connection()
                if last:
                    raise
        raise AssertionError("unreachable")

    def _database(self) -> Any:
        with self._open:
            if self._db is None:
                from velvet_core.storage.database import open_db
                from velvet_core.storage.urls import with_connect_timeout

                self._db = open_db(with_connect_timeout(self.url, CONNECT_TIMEOUT))
            return self._db

    def _drop_connection(self) -> None:
        with self._open:
            db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):
                db.close()

    def _failed(self, e: Exception) -> None:
        if not self.failing:
            self.failing = True
            log.warning("velvet: cache look-up failed (answering from the API): %s",
                        redact(str(e).splitlines()[0] if str(e) else type(e).__name__))

    def _entries(self, key: str, bucket: int) -> list[dict[str, Any]]:
        from velvet_core.storage.cache_store import live_entries

        return live_entries(self._database(), key, clock.now(), bucket)

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
            age = max(0, int(time.time() - _epoch(e["created_at"])))
        except Exception as exc:
            if e.get("id") not in self.bad:
                self.bad.add(int(e.get("id") or 0))
                log.warning("velvet: cache entry %s is corrupt (%s): answered from the API instead", e.get("id"),
                            type(exc).__name__)
            return None
        return Found(None, content, ctype, age, {
            "hit": e["id"], "flow_id": e["flow_id"], "cost_usd": e["cost_usd"],
            "input_tokens": e["input_tokens"], "output_tokens": e["output_tokens"], "model": e["model"]})

    # -- the index's updates (storage/cache_index.py), from its thread or on the event loop --------------

    def apply(self, kind: bytes, items: str) -> None:
        if kind == index.ADD:
            index.take(self.keys, items)
        elif kind == index.RELOAD:
            self._next = {}
        elif kind == index.CHUNK and self._next is not None:
            index.take(self._next, items)
        elif kind == index.DONE and self._next is not None:
            self.keys, self._next = self._next, None
            self.loaded.set()

    def feed(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        """Read the index's updates from the pipe ``fd`` (the writer process's :class:`index.Follower`) on
        ``loop``, a frame at a time as they come; a new pipe (a writer process started again) replaces the old,
        and brings a reload."""
        self._unfeed()
        os.set_blocking(fd, False)
        self._feed = (loop, fd, index.Frames())
        loop.add_reader(fd, self._read_feed)

    def _read_feed(self) -> None:
        assert self._feed is not None
        _, fd, frames = self._feed
        try:
            data = os.read(fd, FEED_READ)
            if not data:  # (the writer process has stopped)
                self._unfeed()
                return
            for kind, items in frames.feed(data):
                self.apply(kind, items)
        except BlockingIOError:
            pass
        except Exception as e:  # a damaged pipe: no longer followed, every key may be (the database says)
            log.warning("velvet: the cache index's pipe failed (%s): each look-up reads the database", e)
            self._unfeed()
            self.loaded.clear()

    def _unfeed(self) -> None:
        if self._feed is not None:
            loop, fd, _ = self._feed
            self._feed = None
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self._stop.set()
        self._unfeed()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._drop_connection()

