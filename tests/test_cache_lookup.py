"""The proxy's cache index (``cache/lookup.py``) on both backends: a reload of every live key in chunks (the GIL
given back between two), new entries followed, an expired key unknown, a cleared key dropped after one read."""

from __future__ import annotations

import hashlib
import time
from datetime import timedelta

from support.helpers import q
from support.rig import wait_for
from velvet_core import clock
from velvet_core.cache.lookup import Found, Lookup
from velvet_core.storage import cache_index as index_mod
from velvet_core.storage import models
from velvet_core.storage.database import open_db
from velvet_core.storage.ops import CacheStore
from velvet_core.storage.store import Store


def key(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def add(db, first: int, n: int, ttl: float = 3600.0) -> None:
    now = clock.now()
    Store(db).apply([CacheStore({"key": key(i), "flow_id": f"f-{i}", "created_at": now,
                                 "expires_at": now + timedelta(seconds=ttl), "hits": 0,
                                 "endpoint": "chat.completions", "content_type": "application/json",
                                 "body": '{"id": "x", "choices": []}', "size": 26, "stream": False}, 1)
                     for i in range(first, first + n)])


def test_the_index_reloads_in_chunks_follows_new_keys_and_forgets_what_is_gone(db_url, monkeypatch):
    monkeypatch.setattr(index_mod, "RELOAD_CHUNK", 7)  # (a reload of 50 keys in 8 chunks)
    monkeypatch.setattr(index_mod, "POLL", 0.05)
    monkeypatch.setattr(index_mod, "POLL_LIMIT", 2)  # (3 new keys: read in two polls)
    db = open_db(db_url)
    try:
        add(db, 0, 50)
        add(db, 50, 1, ttl=1)  # expires in a second
        look = Lookup(db_url)
        try:
            assert look.loaded.wait(10)
            assert all(look.known(key(i)) for i in range(51))
            add(db, 100, 3)  # written after the reload: followed
            wait_for(lambda: all(look.known(key(i)) for i in range(100, 103)), what="the new keys")
            assert not look.known(key(999))
            time.sleep(2.05)  # (the index keeps expiry to the second, rounded up)
            assert not look.known(key(50))  # expired: a miss without a read
            got = look.fetch_now("chat.completions", Found(key(3)), 1)
            assert got.content == b'{"id": "x", "choices": []}'
            with models.use(db):
                db.execute_sql(f"DELETE FROM cache_entries WHERE key = {db.param}", (key(4),))  # (cache clear)
            assert look.known(key(4))  # the index still holds it: one read says it is gone ...
            assert look.fetch_now("chat.completions", Found(key(4)), 1).content is None
            assert not look.known(key(4))  # ... and it is dropped, read no more
            # the next reload keeps only what is live (the deleted and the expired gone)
            monkeypatch.setattr(index_mod, "FULL", 0.0)
            wait_for(lambda: len(look.keys) == 52, what="the reload")
        finally:
            look.close()
    finally:
        db.close()
    assert q(db_url, "SELECT count(*) AS n FROM cache_entries")[0]["n"] == 53


def test_the_writer_removes_the_expired_entries(db_url, tmp_path, caplog):
    """Once an hour (and once the database first answers) the writer removes the entries expired for an hour, a
    thousand per transaction: before, the table kept a copy of every answer the cache ever stored (the default
    retention keeps everything). Live entries stay, and look-ups keep finding them."""
    import logging

    from support.helpers import calls, chat
    from velvet_core.cost.prices import Pricer
    from velvet_core.processing.processor import Processor
    from velvet_core.writer.writer import Writer

    db = open_db(db_url)
    try:
        add(db, 0, 2500, ttl=-3700)  # expired over an hour ago
        add(db, 5000, 2)
        add(db, 5002, 1, ttl=-60)  # expired a minute ago: stays until the next round
        caplog.set_level(logging.INFO, logger="velvet")
        w = Writer(db_url, Processor(Pricer()).operations, spool_dir=tmp_path / "spool")
        w.start()
        try:
            w.submit(chat(1))
            wait_for(lambda: "flow-1" in calls(db_url), what="the flow")
            wait_for(lambda: "2500 expired cache entries removed" in caplog.text, what="the upkeep")
        finally:
            assert w.stop(60)
        assert [r["key"] for r in q(db_url, "SELECT key FROM cache_entries ORDER BY id")] == \
            [key(i) for i in range(5000, 5003)]
        look = Lookup(db_url, follow=False)
        try:
            assert [e["flow_id"] for e in look._entries(key(5000), 1)] == ["f-5000"]
        finally:
            look.close()
    finally:
        db.close()
