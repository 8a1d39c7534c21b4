"""The response cache's entries in the database: added by the writer after a miss, counted at each hit, read
by the proxy's look-up thread (:mod:`velvet_core.cache.lookup`) and by ``velvet cache stats | clear``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from peewee import Database

from velvet_core.storage import models
from velvet_core.storage.ops import CacheHit, CacheStore
from velvet_core.storage.sql import adapt, rows, ts


def _db() -> Database:
    db = models.db.obj
    assert db is not None, "the cache's operations run inside models.use()"
    return db


def add_entries(ops: list[CacheStore]) -> None:
    """Each entry, unless its key already holds ``bucket`` live entries (two proxies, or two misses in flight,
    may both have asked the API: the bucket stays as large as asked) or its flow already has one (a replay)."""
    db = _db()
    for op in ops:
        r = op.row
        live = rows(db, "SELECT COUNT(*) AS n, SUM(CASE WHEN flow_id = ? THEN 1 ELSE 0 END) AS mine "
                        "FROM cache_entries WHERE key = ? AND expires_at > ?",
                    (r["flow_id"], r["key"], ts(db, r["created_at"])))[0]
        if live["n"] >= op.bucket or live["mine"]:
            continue
        cols = list(r)
        db.execute_sql(adapt(db, f"INSERT INTO cache_entries ({', '.join(cols)}) VALUES "
                                 f"({', '.join('?' for _ in cols)})"),
                       tuple(ts(db, v) if isinstance(v, datetime) else v for v in r.values()))


def count_hits(ops: list[CacheHit]) -> None:
    db = _db()
    for op in ops:
        db.execute_sql(adapt(db, "UPDATE cache_entries SET hits = hits + 1, last_hit_at = ? WHERE id = ?"),
                       (ts(db, op.at), op.entry_id))


ENTRY_COLUMNS = ("id, flow_id, created_at, expires_at, hits, endpoint, model, content_type, body, stream, "
                 "input_tokens, output_tokens, cost_usd")


def live_entries(db: Database, key: str, now: datetime, limit: int) -> list[dict[str, Any]]:
    """The oldest ``limit`` live entries of ``key`` (the bucket, in the order they were stored)."""
    return rows(db, f"SELECT {ENTRY_COLUMNS} FROM cache_entries WHERE key = ? AND expires_at > ? "
                    "ORDER BY created_at, id LIMIT ?", (key, ts(db, now), limit))
