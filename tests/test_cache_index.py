"""storage/cache_index.py: the cache index followed by the writer process and read by the proxy's event loop
through a pipe (no thread of the proxy takes the GIL from the loop for it), on both backends; the pipe's frames as
bad input."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Callable

import pytest
from support.helpers import chat
from support.rig import wait_for
from test_cache_lookup import add, key
from velvet_core.cache.lookup import Found, Lookup
from velvet_core.storage import cache_index as index
from velvet_core.storage import models
from velvet_core.storage.database import open_db


async def until(check: Callable[[], bool], what: str, timeout: float = 45) -> None:
    """Let the loop run (it reads the pipe) until ``check()`` holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_the_writer_process_follows_the_index_and_the_loop_reads_it(db_url, tmp_path):
    """With a writer process, the proxy's look-up starts no thread: the child reads the live keys and sends them
    through a pipe the event loop reads. New entries are followed; a child started again (the first was killed)
    brings a new pipe and a reload, which keeps only what is live."""
    from velvet_core.writer.child import ChildWriter

    db = open_db(db_url)
    add(db, 0, 20)
    w = ChildWriter(db_url, spool_dir=tmp_path / "spool", flush_timeout=30)
    w.start()
    look = Lookup(db_url, follow=False)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        w.index(functools.partial(look.feed, loop=loop))
        assert look._index is None and not any(t.name == "velvet-cache-index" for t in threading.enumerate())
        await until(look.loaded.is_set, "the first load")
        assert all(look.known(key(i)) for i in range(20)) and not look.known(key(999))
        add(db, 100, 3)
        await until(lambda: all(look.known(key(i)) for i in range(100, 103)), "the new keys")
        assert w.proc is not None
        w.proc.kill()  # a new child: a new pipe, and a reload from the database
        w.proc.wait()
        await until(lambda: look._feed is None, "the old pipe's end")  # (read to its end, closed)
        with models.use(db):
            db.execute_sql(f"DELETE FROM cache_entries WHERE key = {db.param}", (key(5),))  # (cache clear)
        look.loaded.clear()
        w.start()
        await until(look.loaded.is_set, "the reload")
        assert not look.known(key(5)) and look.known(key(4)) and look.known(key(101))
        w.submit(chat(1))  # (the writer still writes)

    try:
        asyncio.run(scenario())
    finally:
        look.close()
        assert w.stop(60)
        db.close()


def test_a_second_look_up_gets_a_pipe_of_its_own(sqlite_url, tmp_path):
    """The cache turned off and on again (a look-up closed, another made, one writer process): the new look-up
    gets a new pipe and a whole load, never the rest of the old pipe (cut mid-frame) nor its number."""
    from velvet_core.writer.child import ChildWriter

    db = open_db(sqlite_url)
    add(db, 0, 3000)  # (a load of 105,000 bytes: more than one read of the pipe)
    w = ChildWriter(sqlite_url, spool_dir=tmp_path / "spool", flush_timeout=30)
    w.start()
    first, second = Lookup(sqlite_url, follow=False), Lookup(sqlite_url, follow=False)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        w.index(functools.partial(first.feed, loop=loop))
        await until(lambda: first.loaded.is_set() or (first._feed is not None and first._feed[2].buf),
                    "some of the first load")
        first.close()  # (mid-load, most often: the pipe closed with bytes in it)
        add(db, 5000, 1)
        w.index(functools.partial(second.feed, loop=loop))
        await until(second.loaded.is_set, "the second look-up's load")
        await until(lambda: second.known(key(5000)), "the new key")
        assert all(second.known(key(i)) for i in range(3000)) and not second.known(key(3000))

    try:
        asyncio.run(scenario())
    finally:
        second.close()
        assert w.stop(60)
        db.close()


def test_frames_cut_anywhere_come_back_whole():
    updates = [(index.ADD, "a" * 16 + "2030-01-01 00:00:00"), (index.RELOAD, ""),
               (index.CHUNK, ("b" * 16 + "2030-01-01 00:00:01") * 3), (index.DONE, "")]
    data = b"".join(index.frame(k, items) for k, items in updates)
    for size in (1, 2, 5, 7, 64, len(data)):
        frames, got = index.Frames(), []
        for i in range(0, len(data), size):
            got += frames.feed(data[i:i + size])
        assert got == updates and not frames.buf


def test_an_update_keeps_each_keys_newest_expiry():
    """A key held twice in one update, or already in the index, keeps its newest expiry whatever the order."""
    def item(k: str, when: str) -> str:
        return k * 16 + f"2030-01-01 00:00:{when}"

    keys = {"a" * 16: "2030-01-01 00:00:05"}
    index.take(keys, item("b", "01") + item("c", "02"))  # (new keys only)
    assert keys == {"a" * 16: "2030-01-01 00:00:05", "b" * 16: "2030-01-01 00:00:01",
                    "c" * 16: "2030-01-01 00:00:02"}
    index.take(keys, item("a", "03") + item("d", "09") + item("d", "04") + item("b", "07"))
    assert keys == {"a" * 16: "2030-01-01 00:00:05", "b" * 16: "2030-01-01 00:00:07",
                    "c" * 16: "2030-01-01 00:00:02", "d" * 16: "2030-01-01 00:00:09"}
    index.take(keys, "")
    assert len(keys) == 4


@pytest.mark.parametrize("junk", [
    b"A\xff\xff\xff\xff",  # a length past any frame's
    b"A\x00\x00\x00\x23" + "é".encode() * 17 + b"!",  # not ASCII: replaced, never raised
    b"Z\x00\x00\x00\x00",  # an unknown kind: ignored
    b"A\x00\x00\x00\x05short",  # items shorter than an entry: a key never asked for
])
def test_a_damaged_pipe_never_breaks_the_loop(sqlite_url, junk):
    """Bad bytes from the pipe: the look-up ignores what it cannot use, or stops reading it and lets the database
    decide every look-up (known() says "maybe"); the loop goes on."""
    look = Lookup(sqlite_url, follow=False)
    read, write = os.pipe()

    async def scenario() -> None:
        look.feed(read, asyncio.get_running_loop())
        load = index.frame(index.CHUNK, key(1)[:16] + "2999-01-01 00:00:00")
        os.write(write, index.frame(index.RELOAD, "") + load + index.frame(index.DONE, "") + junk)
        await asyncio.sleep(0.2)

    try:
        asyncio.run(scenario())
        if junk.startswith(b"A\xff"):
            assert look._feed is None and not look.loaded.is_set() and look.known(key(2))
        else:
            assert look.known(key(1)) and not look.known(key(2))
    finally:
        look.close()
        os.close(write)


def test_where_pipes_cannot_be_handed_over_the_look_up_follows_the_index_itself(sqlite_url, tmp_path, monkeypatch):
    """(Windows: no pass_fds, no send_fds.) The writer process starts without a control socket, and the proxy's
    look-up reads the index in a thread of its own, as with a writer thread."""
    from mitmproxy.test import taddons
    from velvet_core.addon import Velvet
    from velvet_core.writer.child import ChildWriter

    monkeypatch.setattr(ChildWriter, "can_index", False)
    w = ChildWriter(sqlite_url, spool_dir=tmp_path / "spool", flush_timeout=30)
    w.start()
    handed: list[int] = []
    w.index(handed.append)
    v = Velvet()
    try:
        assert not handed and w._control is None
        with taddons.context(v) as tctx:
            tctx.configure(v, velvet_db=sqlite_url, velvet_spool_dir=str(tmp_path / "spool2"))
            v.writer, v.notes.loop = w, asyncio.new_event_loop()
            look = v._make_lookup()
            assert look._index is not None and look._index.is_alive()
            assert look.loaded.wait(30)
            look.close()
            v.writer = None
            v.notes.loop.close()
    finally:
        assert w.stop(60)


def test_a_postgresql_restart_does_not_end_the_cache(own_pg_url):
    """Every connection of the cache's look-up and of its index is cut, as a server restart or a failover cuts
    them: the look-up answers from a new connection at once, and the index follows new entries again. Before,
    both kept their dead connections: every look-up a miss and no new key followed, until the proxy restarted."""
    from support.pg import cut_connections

    url = own_pg_url
    db = open_db(url)
    try:
        add(db, 0, 3)
        look = Lookup(url)  # (the index followed in a thread of its own, as with a writer thread)
        try:
            assert look.loaded.wait(10)
            assert look.fetch_now("chat.completions", Found(key(0)), 1).content is not None
            for _ in range(2):  # (twice: a connection made after the first cut is cut as well)
                assert cut_connections(db) >= 2  # the look-up's and the index's
                hit = look.fetch_now("chat.completions", Found(key(1)), 1)
                assert hit.content is not None, "the look-up kept its dead connection"
                n = len(look.keys)
                add(db, 100 + n, 1)
                wait_for(lambda n=n: look.known(key(100 + n)), what="a key added after the cut", timeout=15)
        finally:
            look.close()
    finally:
        db.close()


def test_while_the_database_fails_a_look_up_is_a_miss_at_once(tmp_path, monkeypatch):
    """A look-up whose database does not answer is a miss; after a second failure in a row, look-ups do not ask
    it again for a few seconds (a client never waits on an outage), then one does."""
    from velvet_core.cache import lookup as lookup_mod

    look = Lookup(f"sqlite:///{tmp_path / 'not-a-dir' / 'x' / 'v.db'}", follow=False)
    (tmp_path / "not-a-dir").write_text("a file where the database's folder should be")
    try:
        asked = []
        real = look._entries
        monkeypatch.setattr(look, "_entries", lambda *a: (asked.append(1), real(*a))[1])
        assert look.fetch_now("chat.completions", Found(key(0)), 1).content is None and asked == [1]
        assert look.failing  # (one failure: the next look-up asks again, it may have been a passing error)
        assert look.fetch_now("chat.completions", Found(key(0)), 1).content is None and asked == [1, 1]
        assert look.fetch_now("chat.completions", Found(key(0)), 1).content is None and asked == [1, 1]
        look._retry_at = time.monotonic() - lookup_mod.RETRY  # (as RETRY seconds later)
        assert look.fetch_now("chat.completions", Found(key(0)), 1).content is None and asked == [1, 1, 1]
    finally:
        look.close()
