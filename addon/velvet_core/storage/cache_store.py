"""The response cache's entries in the database: added by the writer after a miss, counted at each hit, read
by the proxy's look-up thread (:mod:`velvet_core.cache.lookup`) and by ``velvet cache stats | clear``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from peewee import Database

from velvet_core.storage import models
from velvet_core.storage.bulk import insert_rows
from velvet_core.storage.ops import CacheHit, CacheStore
from velvet_core.storage.sql import adapt, has_column, rows, to_dt, ts


def _db() -> Database:
    db = models.db.obj
    assert db is not None, "the cache's operations run inside models.use()"
    return db


def add_entries(ops: list[CacheStore]) -> None:
    """Each entry, unless its key already holds ``bucket`` live entries (two proxies, or two misses in flight,
    may both have asked the API: the bucket stays as large as asked) or its flow already has one (a replay).
    One read for the group's keys and one ``executemany``: the writer stores an entry for every miss."""
    db = _db()
    if not ops:
        return
    keys = sorted({op.row["key"] for op in ops})
    oldest = min(op.row["created_at"] for op in ops)
    held: dict[str, list[tuple[str, Any]]] = {}
    for part in range(0, len(keys), 500):
        chunk = keys[part:part + 500]
        for r in rows(db, f"SELECT key, flow_id, expires_at FROM cache_entries WHERE key IN "
                          f"({', '.join('?' for _ in chunk)}) AND expires_at > ?", (*chunk, ts(db, oldest))):
            held.setdefault(r["key"], []).append((r["flow_id"], to_dt(r["expires_at"])))
    new: list[dict[str, Any]] = []
    for op in ops:
        r = op.row
        mine = held.setdefault(r["key"], [])
        live = [f for f, exp in mine if exp is None or exp > r["created_at"]]
        if len(live) >= op.bucket or r["flow_id"] in live:
            continue
        mine.append((r["flow_id"], r["expires_at"]))
        new.append(r)
    insert_rows(models.CacheEntry, new)


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


def has_cache(db: Database) -> bool:
    """Whether the database has the cache's tables (a read-only command may open one not yet migrated)."""
    return has_column(db, "calls", "cache_hit")


def hit_totals(db: Database, since: datetime | None) -> tuple[int, float]:
    """Calls the cache answered since ``since`` (all, with None) and the USD they saved (the partial index
    ``calls_cache_hit`` reads only those)."""
    if not has_cache(db):
        return 0, 0.0
    where, params = ("AND started_at >= ?", (ts(db, since),)) if since else ("", ())
    r = rows(db, f"SELECT COUNT(*) AS n, SUM(saved_usd) AS saved FROM calls WHERE cache_hit {where}", params)[0]
    return int(r["n"] or 0), round(float(r["saved"] or 0.0), 10)


def stats(db: Database, now: datetime) -> dict[str, Any]:
    """What the cache holds (entries, live ones, bytes, hits counted on them) and, per model, the calls, hits,
    hit rate and USD saved of the logged calls (of the models the cache holds or answered)."""
    if not has_cache(db):
        return {"entries": 0, "live_entries": 0, "size_bytes": 0, "hits": 0, "saved_usd": 0.0, "by_model": []}
    e = rows(db, "SELECT COUNT(*) AS n, SUM(CASE WHEN expires_at > ? THEN 1 ELSE 0 END) AS live, "
                 "SUM(size) AS size FROM cache_entries", (ts(db, now),))[0]
    per: dict[str, dict[str, Any]] = {}
    for r in rows(db, "SELECT model, COUNT(*) AS entries FROM cache_entries GROUP BY model"):
        per[r["model"] or ""] = {"entries": int(r["entries"]), "calls": 0, "hits": 0, "saved_usd": 0.0}
    for r in rows(db, "SELECT COALESCE(model, model_requested) AS model, COUNT(*) AS hits, "
                      "SUM(saved_usd) AS saved FROM calls WHERE cache_hit "
                      "GROUP BY COALESCE(model, model_requested)"):
        g = per.setdefault(r["model"] or "", {"entries": 0, "calls": 0, "hits": 0, "saved_usd": 0.0})
        g["hits"], g["saved_usd"] = int(r["hits"]), round(float(r["saved"] or 0.0), 10)
    if per:
        names = sorted(per)
        marks = ", ".join("?" for _ in names)
        for r in rows(db, "SELECT COALESCE(model, model_requested) AS model, COUNT(*) AS n FROM calls "
                          f"WHERE COALESCE(model, model_requested) IN ({marks}) AND method = 'POST' "
                          "GROUP BY COALESCE(model, model_requested)", names):
            per[r["model"] or ""]["calls"] = int(r["n"])
    by_model = [{"model": m, **g, "hit_rate": round(g["hits"] / g["calls"], 4) if g["calls"] else 0.0}
                for m, g in sorted(per.items(), key=lambda x: (-x[1]["saved_usd"], x[0]))]
    hits, saved = hit_totals(db, None)
    return {"entries": int(e["n"] or 0), "live_entries": int(e["live"] or 0), "size_bytes": int(e["size"] or 0),
            "hits": hits, "saved_usd": saved, "by_model": by_model}


def drop_expired(db: Database, before: datetime, chunk: int = 1000, stop: Any = None) -> int:
    """Remove the entries expired by ``before`` (no look-up reads them again), ``chunk`` per transaction, until
    none is left or ``stop`` (an Event) is set; how many went. Without it the table kept a copy of every answer
    the cache ever stored, for as long as the proxy ran."""
    if not has_cache(db):
        return 0
    sql = adapt(db, "DELETE FROM cache_entries WHERE id IN "
                    "(SELECT id FROM cache_entries WHERE expires_at <= ? LIMIT ?)")
    total = 0
    while True:
        with db.atomic():
            n = int(db.execute_sql(sql, (ts(db, before), chunk)).rowcount)
        total += n
        if n < chunk or (stop is not None and stop.is_set()):
            return total


def clear(db: Database, older_than: datetime | None, model: str | None, key: str | None) -> int:
    """Remove the entries matching every filter given (all without one); how many went."""
    where, params = [], []
    if older_than is not None:
        where.append("created_at < ?")
        params.append(ts(db, older_than))
    if model is not None:
        where.append("model = ?")
        params.append(model)
    if key is not None:
        where.append("key_fingerprint = ?")
        params.append(key)
    sql = "DELETE FROM cache_entries" + (" WHERE " + " AND ".join(where) if where else "")
    with db.atomic():
        return int(db.execute_sql(adapt(db, sql), tuple(params)).rowcount)


def hits_by_day(db: Database, since: datetime, until: datetime) -> list[dict[str, Any]]:
    """Calls the cache answered, and the USD they saved, per UTC day of [since, until)."""
    if not has_cache(db):
        return []
    days: dict[str, dict[str, Any]] = {}
    for r in rows(db, "SELECT started_at, saved_usd FROM calls WHERE cache_hit AND started_at >= ? "
                      "AND started_at < ?", (ts(db, since), ts(db, until))):
        started = to_dt(r["started_at"])
        if started is None:
            continue
        d = days.setdefault(started.date().isoformat(), {"hits": 0, "saved_usd": 0.0})
        d["hits"] += 1
        d["saved_usd"] += float(r["saved_usd"] or 0.0)
    return [{"day": k, "hits": v["hits"], "saved_usd": round(v["saved_usd"], 10)} for k, v in sorted(days.items())]
