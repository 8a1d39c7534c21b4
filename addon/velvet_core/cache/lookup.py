"""The proxy's cache look-up: an in-memory index of the live keys, and the database read off the event loop.

Most requests a cache sees are misses. The proxy keeps the keys of the live entries in memory (a 64-bit prefix
of each and when it expires), loaded and followed by a thread of its own (new entries every 0.25 s, everything
again every 10 minutes, which drops the expired ones), so a miss is decided on the event loop from the key
alone: no thread, no database. A key the index holds is read from the database in a small thread pool (the hook
is a coroutine mitmproxy awaits: the loop serves other flows meanwhile). The key of a body over 64 KiB is
computed in the pool too. peewee and the driver are imported in those threads, at the first look-up.

Entries are written by the writer (a miss's answer, once it is logged), so proxies sharing a PostgreSQL database
share them, and a restart keeps them; an entry becomes visible to a proxy's index within a quarter of a second
after it is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from velvet_core import clock
from velvet_core.cache.key import NotCacheable, is_stream, request_key, wants_usage
from velvet_core.cache.replay import STREAMABLE, as_stream
from velvet_core.redact import redact

log = logging.getLogger("velvet")

BIG_BODY = 64 * 1024  # bodies over this are parsed and hashed in the pool, not on the event loop
POLL = 0.25  # seconds between two reads of the new entries
FULL = 600.0  # seconds between two reloads of every live key (drops the expired ones, finds any committed late)
RELOAD_CHUNK = 5000  # keys read per step of a reload, the GIL given back between two


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
    def __init__(self, url: str, workers: int = 2) -> None:
        self.url = url
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="velvet-cache")
        self._db: Any = None
        self._open = threading.Lock()
        self.keys: dict[str, str] = {}  # key's first 16 hex digits -> when its newest entry expires (UTC text)
        self.loaded = threading.Event()
        self._last_id = 0
        self._stop = threading.Event()
        self.turns: dict[str, int] = {}  # key -> answers served (the bucket's turn), bounded
        self.bad: set[int] = set()  # corrupt entries already logged
        self.failing = False
        self._index = threading.Thread(target=self._follow, name="velvet-cache-index", daemon=True)
        self._index.start()

    # -- the key, on the event loop (or in the pool for a big body) ------------------------------------------

    @staticmethod
    def key_for(kind: str, body: bytes, scope: str, method: str, host: str, path: str, seed: str) -> Found:
        """The request's key (``key`` None and ``why`` for a request the cache leaves alone)."""
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            return Found(None, why="the body is not JSON")
        try:
            key = request_key(kind, req, scope=scope, method=method, host=host, path=path, seed=seed)
        except NotCacheable as e:
            return Found(None, why=str(e))
        stream = is_stream(req)
        if stream and kind not in STREAMABLE:
            return Found(None, why=f"a {kind} stream is not rebuilt from the cache")
        return Found(key, stream=stream, usage=stream and wants_usage(req))

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
        try:
            entries = self._entries(key, bucket)
        except Exception as e:  # the database down or not yet migrated: a miss, logged once per outage
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

    def _database(self) -> Any:
        with self._open:
            if self._db is None:
                from velvet_core.storage.database import open_db

                self._db = open_db(self.url)
            return self._db

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

    # -- the index, in its thread ------------------------------------------------------------------------------

    def _follow(self) -> None:
        """This thread shares the interpreter (and, under load, the core) with mitmproxy's event loop: each poll
        reads only the new entries (an entry committed out of id order by another writer waits for the next
        reload: a miss meanwhile) as one row, the newest id and every entry's :data:`ITEM` joined, which this
        thread cuts apart: with every call a miss, each adds an entry to read, and a row per entry (the expiry
        computed as epoch seconds, the prefix made an integer) cost 1.7 us of this thread per entry, the joined
        text 0.9 (SQLite, in-process). The reload of every live key reads them in chunks, the GIL given back
        between two: 1.3-1.8 s of this thread for a million entries (a 1 ms sleep on the main thread meanwhile
        waited at most 28 ms); every 30 s, as it first was, that was some 4 % of a core, every :data:`FULL`
        seconds 0.3 %. A key cleared meanwhile costs one read in the pool, which then drops it
        (:meth:`fetch_now`); an expired one is no longer known (:meth:`known`)."""
        full_at = 0.0
        while not self._stop.is_set():
            try:
                db = self._database()
                now = time.time()
                if now - full_at >= FULL:
                    self._reload(db)
                    full_at = now
                else:
                    last, items = db.execute_sql(*_new_entries(db, self._last_id)).fetchone()
                    if last is not None:
                        _take(self.keys, items)
                        self._last_id = max(self._last_id, int(last))
                self.failing = False
                self.loaded.set()
            except Exception as e:
                self._failed(e)
            self._stop.wait(POLL)

    def _reload(self, db: Any) -> None:
        """Every live key again, :data:`RELOAD_CHUNK` at a time."""
        keys: dict[str, str] = {}
        last = 0
        now = clock.now()
        while not self._stop.is_set():
            newest, items = db.execute_sql(*_new_entries(db, last, now, RELOAD_CHUNK)).fetchone()
            if newest is None:
                break
            _take(keys, items)
            last = int(newest)
            if len(items) < RELOAD_CHUNK * ITEM:
                break
            time.sleep(0.002)  # (the event loop takes the GIL between two chunks)
        else:
            return
        self.keys = keys  # (what was committed meanwhile has a higher id: the next poll reads it)
        self._last_id = max(last, self._last_id)

    def close(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()


# An entry in the index's reads: the key's first 16 characters, then its expiry to the second ('YYYY-MM-DD
# HH:MM:SS', UTC), both padded to their width (a foreign row's short key never shifts the ones after it).
ITEM = 16 + 19


def _new_entries(db: Any, after: int, live_at: datetime | None = None,
                 limit: int | None = None) -> tuple[str, tuple[Any, ...]]:
    """The query of the entries after id ``after`` (live at ``live_at``, at most ``limit``, if given), as one row:
    the newest id (None: no entry) and every entry's :data:`ITEM`."""
    from velvet_core.storage.sql import adapt, is_pg, ts

    if is_pg(db):
        item = "rpad(substr(key, 1, 16), 16) || rpad(to_char(expires_at, 'YYYY-MM-DD HH24:MI:SS'), 19)"
        joined = "string_agg(k, '' ORDER BY id)"
    else:
        item = "printf('%-16.16s%-19.19s', key, expires_at)"
        joined = "group_concat(k, '')"  # (in any order: the newest expiry of a key wins)
    where, params = "id > ?", [after]
    if live_at is not None:
        where, params = "expires_at > ? AND id > ?", [ts(db, live_at), after]
    sql = (f"SELECT max(id), {joined} FROM (SELECT id, {item} AS k FROM cache_entries WHERE {where} ORDER BY id"
           f"{f' LIMIT {int(limit)}' if limit else ''}) AS n")
    return adapt(db, sql), tuple(params)


def _take(keys: dict[str, str], items: str) -> None:
    """Add the entries of a read to the index (a key's newest expiry wins)."""
    for i in range(0, len(items), ITEM):
        k, expires = items[i:i + 16], items[i + 16:i + ITEM]
        if keys.get(k, "") < expires:
            keys[k] = expires
