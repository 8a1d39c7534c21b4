"""The response cache's index: the live entries' keys, read from the database and handed to the proxy's look-up.

The proxy decides a miss on its event loop from an in-memory index of the live keys (:mod:`cache.lookup`).
Something must read the new entries into it, every :data:`POLL` seconds, and every key again every :data:`FULL`
seconds (which drops the expired and the cleared). A thread of the proxy did, and cost it a point of throughput
even with nothing to read: every poll took the GIL from the event loop several times (the driver gives it back
around each statement), 0.3-0.5 ms of CPU per poll under load against 3 us in a quiet process (the bench's
rig, the hook returning at once: 0.959 and 0.956 against 0.967 and 0.968 without the thread). With a writer
process, :class:`Follower` runs there instead, on another core, and sends what it reads through a pipe the
event loop reads (:meth:`Lookup.feed <velvet_core.cache.lookup.Lookup.feed>`): no thread in the proxy, no
database module either. Each look-up gets a pipe of its own, handed to the writer process over a socket pair
(:meth:`ChildWriter.index <velvet_core.writer.child.ChildWriter.index>`), and a whole load first. With a writer
thread (one core, mitmweb) the follower runs in a thread of the proxy, as before.

What it hands over are *updates* ``(kind, items)``: ``ADD`` (new entries), ``RELOAD`` (a reload begins),
``CHUNK`` (some of its keys) and ``DONE`` (the reload replaces the index; the index is loaded). ``items`` is
text: each entry's :data:`ITEM`, joined. Through the pipe an update is a frame: its kind (one byte), the
length of ``items`` (4 bytes, big-endian), and ``items`` in ASCII.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from velvet_core import clock
from velvet_core.redact import redact

log = logging.getLogger("velvet")

POLL = 0.25  # seconds between two reads of the new entries
RETRY = 2.0  # seconds between two tries while the database fails
FULL = 600.0  # seconds between two reloads of every live key (drops the expired ones, finds any committed late)
RELOAD_CHUNK = 5000  # keys read per step of a reload
POLL_LIMIT = 50_000  # new keys read per poll at most (1.75 MB; the next poll reads the rest)
ADD, RELOAD, CHUNK, DONE = b"A", b"R", b"C", b"D"
# An entry in the index's reads: the key's first 16 characters, then its expiry to the second ('YYYY-MM-DD
# HH:MM:SS', UTC), both padded to their width (a foreign row's short key never shifts the ones after it).
ITEM = 16 + 19
MAX_FRAME = 1 << 24  # a frame's items at most (a reload chunk is RELOAD_CHUNK * ITEM = 175,000 bytes)

Emit = Callable[[bytes, str], None]


def new_entries(db: Any, after: int, live_at: datetime | None = None,
                limit: int | None = None) -> tuple[str, tuple[Any, ...]]:
    """The query of the entries after id ``after`` (live at ``live_at``, at most ``limit``, if given), as one row:
    the newest id (None: no entry) and every entry's :data:`ITEM`, joined (a row per entry, its expiry as epoch
    seconds, cost 1.7 us per entry to read in Python; this 1.2)."""
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


def take(keys: dict[str, str], items: str) -> None:
    """Add the entries of ``items`` to ``keys`` (a key's newest expiry wins)."""
    for i in range(0, len(items), ITEM):
        k, expires = items[i:i + 16], items[i + 16:i + ITEM]
        if keys.get(k, "") < expires:
            keys[k] = expires


class Follower:
    """Reads the live keys of ``url``'s cache entries and emits them as updates until ``stop`` is set."""

    def __init__(self, url: str, stop: threading.Event, also: threading.Event | None = None) -> None:
        self.url, self.stop, self.also = url, stop, also
        self._db: Any = None
        self._last_id = 0
        self.failing = False

    def stopped(self) -> bool:
        return self.stop.is_set() or (self.also is not None and self.also.is_set())

    def into_pipe(self, fd: int) -> None:
        """:meth:`run`, each update written to the pipe ``fd`` (closed at the end)."""
        try:
            self.run(to_pipe(fd))
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def run(self, emit: Emit) -> None:
        full_at = 0.0
        while not self.stopped():
            try:
                if self._db is None:
                    from velvet_core.storage.database import open_db

                    self._db = open_db(self.url)
                now = time.time()
                if now - full_at >= FULL:
                    self._reload(emit)
                    full_at = now
                else:
                    last, items = self._db.execute_sql(
                        *new_entries(self._db, self._last_id, limit=POLL_LIMIT)).fetchone()
                    if last is not None:
                        emit(ADD, items)
                        self._last_id = max(self._last_id, int(last))
                self.failing = False
            except BrokenPipeError:
                break  # (the proxy is gone)
            except Exception as e:
                if not self.failing:
                    self.failing = True
                    log.warning("velvet: the cache index could not read the database (retrying): %s",
                                redact(str(e).splitlines()[0] if str(e) else type(e).__name__))
                self.close()  # (a server restarted: its connection is dead for good; the next look opens one)
            self.stop.wait(RETRY if self.failing else POLL)
        self.close()

    def _reload(self, emit: Emit) -> None:
        """Every live key again, :data:`RELOAD_CHUNK` at a time (what is committed meanwhile has a higher id: the
        next poll reads it)."""
        last, now = 0, clock.now()
        emit(RELOAD, "")
        while not self.stopped():
            newest, items = self._db.execute_sql(*new_entries(self._db, last, now, RELOAD_CHUNK)).fetchone()
            if newest is None:
                break
            emit(CHUNK, items)
            last = int(newest)
            if len(items) < RELOAD_CHUNK * ITEM:
                break
            time.sleep(0.002)  # (in the proxy's thread: the event loop takes the GIL between two chunks)
        else:
            return
        emit(DONE, "")
        self._last_id = max(last, self._last_id)

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None


def frame(kind: bytes, items: str) -> bytes:
    data = items.encode("ascii", "replace")
    return kind + len(data).to_bytes(4, "big") + data


def to_pipe(fd: int) -> Emit:
    """An emitter writing each update to the pipe ``fd`` (blocking: the proxy reads it when its loop is free)."""
    def emit(kind: bytes, items: str) -> None:
        data = frame(kind, items)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return emit


class Frames:
    """Cuts a pipe's bytes back into updates (the proxy's side)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, str]]:
        self.buf += data
        out = []
        while len(self.buf) >= 5:
            n = int.from_bytes(self.buf[1:5], "big")
            if n > MAX_FRAME:
                raise ValueError(f"a cache index frame of {n} bytes")
            if len(self.buf) < 5 + n:
                break
            out.append((bytes(self.buf[:1]), self.buf[5:5 + n].decode("ascii", "replace")))
            del self.buf[:5 + n]
        return out
