"""Derived data kept beside the rows so that queries stay fast at any size, and its rebuild.

- ``batch_counts``: each batch's logged lines, answered and failed lines, tokens and cost (what
  ``batch_summary`` shows). Lines only become a batch's when :func:`batch_store.link` binds them, so
  the counts are recomputed for a batch in the same transaction, whenever a link changed a row of it:
  whatever the order the lines, answers and batch objects came in, and however often they were replayed.
- ``call_rollups``: live calls summed per hour and per day (UTC), model, endpoint and key, with
  latency and TTFT histograms (percentiles cannot be summed). Updated in the transaction that inserts
  the calls, counting only the rows actually inserted (a replayed or duplicate call is not counted twice).

``velvet rebuild`` (:func:`rebuild`) recomputes both from the rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import orjson
from peewee import Database, IntegrityError, PostgresqlDatabase, SqliteDatabase

from velvet_core import clock
from velvet_core.storage import models
from velvet_core.storage.bulk import COPY_FROM, chunks, insert_rows
from velvet_core.storage.sql import adapt, ts

HOUR, DAY = 1, 24  # call_rollups.hours
SCALE = 50  # histogram bucket = round(SCALE * ln(ms)): buckets 2 % wide, a percentile within 1 %
FLOOR_MS = 0.001

Key = tuple[int, datetime, str, str, str]  # hours, period, model, endpoint, key_fingerprint


def bucket(ms: float) -> str:
    """The histogram bucket of a duration in ms (a string: the JSON object's key)."""
    return str(round(SCALE * math.log(max(ms, FLOOR_MS))))


def bucket_ms(b: str) -> float:
    """The value a bucket stands for (its geometric middle)."""
    return round(math.exp(int(b) / SCALE), 3)


def hist_percentile(hist: dict[str, int], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100) of a histogram, as its bucket's value."""
    n = sum(hist.values())
    if not n:
        return None
    k = max(0, min(n - 1, math.ceil(p / 100 * n) - 1))
    seen = 0
    for b in sorted(hist, key=int):
        seen += hist[b]
        if seen > k:
            return bucket_ms(b)
    return None  # pragma: no cover - unreachable: the counts add up to n


def merge(into: dict[str, int], hist: dict[str, int]) -> None:
    for b, n in hist.items():
        into[b] = into.get(b, 0) + n


class Sums:
    """What one rollup row (or one group of a query) adds up."""

    __slots__ = ("calls", "cost", "errors", "input_tokens", "latency", "output_tokens", "ttft")

    def __init__(self) -> None:
        self.calls = self.errors = self.input_tokens = self.output_tokens = 0
        self.cost = 0.0
        self.latency: dict[str, int] = {}
        self.ttft: dict[str, int] = {}

    def add_call(self, status: int | None, complete: Any, latency: float | None, ttft: float | None,
                 inp: int | None, outp: int | None, cost: float | None) -> None:
        self.calls += 1
        self.errors += status is None or status >= 400 or not complete
        self.input_tokens += inp or 0
        self.output_tokens += outp or 0
        self.cost += cost or 0.0
        if latency is not None:
            b = bucket(latency)
            self.latency[b] = self.latency.get(b, 0) + 1
        if ttft is not None:
            b = bucket(ttft)
            self.ttft[b] = self.ttft.get(b, 0) + 1

    def add(self, other: Sums) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost += other.cost
        merge(self.latency, other.latency)
        merge(self.ttft, other.ttft)


def as_datetime(v: Any) -> datetime:
    """A stored or to-be-stored timestamp (datetime, or text on SQLite) as a naive datetime."""
    return clock.parse(v)  # type: ignore[return-value]


def periods(started: Any) -> tuple[datetime, datetime]:
    """The hour and the day a call started in."""
    hour = as_datetime(started).replace(minute=0, second=0, microsecond=0)
    return hour, hour.replace(hour=0)


# Columns of ``calls`` the rollups read, in this order (see :func:`accumulate`).
CALL_COLUMNS = ("started_at", "model", "model_requested", "endpoint", "key_fingerprint", "status_code", "complete",
                "latency_ms", "ttft_ms", "input_tokens", "output_tokens", "cost_usd")


def accumulate(calls: Iterable[tuple], into: dict[Key, Sums] | None = None) -> dict[Key, Sums]:
    """Rollup sums per (hours, period, model, endpoint, key) of calls given as :data:`CALL_COLUMNS` tuples."""
    acc: dict[Key, Sums] = {} if into is None else into
    for started, model, requested, endpoint, key, status, complete, lat, ttft, inp, outp, cost in calls:
        hour, day = periods(started)
        dims = (model or requested or "", endpoint or "", key or "")
        for k in ((HOUR, hour, *dims), (DAY, day, *dims)):
            s = acc.get(k)
            if s is None:
                s = acc[k] = Sums()
            s.add_call(status, complete, lat, ttft, inp, outp, cost)
    return acc


def _row_tuple(r: dict[str, Any]) -> tuple:
    return (r["started_at"], r.get("model"), r.get("model_requested"), r.get("endpoint"), r.get("key_fingerprint"),
            r.get("status_code"), r.get("complete", True), r.get("latency_ms"), r.get("ttft_ms"),
            r.get("input_tokens"), r.get("output_tokens"), r.get("cost_usd"))




# -- live calls ------------------------------------------------------------------------------------

def add_calls(rows: list[dict[str, Any]]) -> None:
    """Insert ``calls`` rows (a duplicate ``flow_id`` is ignored) and add the new ones to the rollups."""
    db = models.db.obj
    assert db is not None, "add_calls outside models.use()"
    if isinstance(db, PostgresqlDatabase):
        new = _insert_calls_pg(db, rows)
    else:  # the store's SQLite transactions hold the write lock from their start: nobody inserts meanwhile
        known: set[str] = set()
        for part in chunks([r["flow_id"] for r in rows]):
            marks = ", ".join("?" * len(part))
            cur = db.execute_sql(f'SELECT "flow_id" FROM "calls" WHERE "flow_id" IN ({marks})', part)
            known.update(f for (f,) in cur.fetchall())
        new = []
        for r in rows:
            if r["flow_id"] not in known:
                known.add(r["flow_id"])  # the first of two rows with one flow_id is the one inserted
                new.append(r)
        insert_rows(models.Call, new)
    if new:
        add_rollups(db, accumulate(map(_row_tuple, new)))


def _insert_calls_pg(db: Database, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert into PostgreSQL; the rows actually inserted.

    Many rows whose flow ids are not stored yet are copied straight into ``calls`` (no staging table:
    half the server's work); should another writer store one of them meanwhile, the copy fails alone (a
    savepoint) and the rows go in the careful way, which says which were inserted.
    """
    if len(rows) >= COPY_FROM:
        ids = [r["flow_id"] for r in rows]
        known = {f for (f,) in db.execute_sql('SELECT "flow_id" FROM "calls" WHERE "flow_id" = ANY(%s)',
                                              (ids,)).fetchall()}
        if len(set(ids)) == len(ids) and not known:
            try:
                with db.atomic():
                    insert_rows(models.Call, rows, direct=True)
                return rows
            except IntegrityError:
                pass
    inserted = set(insert_rows(models.Call, rows, returning="flow_id") or ())
    new, seen = [], set()
    for r in rows:
        if r["flow_id"] in inserted and r["flow_id"] not in seen:
            seen.add(r["flow_id"])
            new.append(r)
    return new


_KEY_WHERE = '"hours" = ? AND "period" = ? AND "model" = ? AND "endpoint" = ? AND "key_fingerprint" = ?'


def add_rollups(db: Database, acc: dict[Key, Sums]) -> None:
    """Add ``acc`` to the stored rollups (rows made as needed, locked while read and rewritten)."""
    pg = isinstance(db, PostgresqlDatabase)
    keys = sorted(acc)  # one lock order for every writer: no deadlock between proxies sharing a database
    params = [(h, ts(db, p), m, e, k) for h, p, m, e, k in keys]
    cur = db.cursor()
    ignore = "" if pg else " OR IGNORE"
    conflict = " ON CONFLICT DO NOTHING" if pg else ""
    cur.executemany(adapt(db, f'INSERT{ignore} INTO "call_rollups" ("hours", "period", "model", "endpoint", '
                             '"key_fingerprint", "calls", "errors", "input_tokens", "output_tokens", "cost_usd") '
                             f"VALUES (?, ?, ?, ?, ?, 0, 0, 0, 0, 0){conflict}"), params)
    select = adapt(db, f'SELECT "id", "latency_hist", "ttft_hist" FROM "call_rollups" WHERE {_KEY_WHERE}'
                      + (" FOR UPDATE" if pg else ""))
    updates = []
    for key, p in zip(keys, params, strict=True):
        rid, lat, ttft = db.execute_sql(select, p).fetchone()
        s = acc[key]
        updates.append((s.calls, s.errors, s.input_tokens, s.output_tokens, s.cost,
                        _merged(lat, s.latency), _merged(ttft, s.ttft), rid))
    cur.executemany(adapt(db, 'UPDATE "call_rollups" SET "calls" = "calls" + ?, "errors" = "errors" + ?, '
                             '"input_tokens" = "input_tokens" + ?, "output_tokens" = "output_tokens" + ?, '
                             '"cost_usd" = "cost_usd" + ?, "latency_hist" = ?, "ttft_hist" = ? WHERE "id" = ?'),
                    updates)


def _merged(stored: str | None, add: dict[str, int]) -> str | None:
    if not add:
        return stored
    hist = orjson.loads(stored) if stored else {}
    merge(hist, add)
    return orjson.dumps(hist).decode()


def load_hist(text: str | None) -> dict[str, int]:
    return orjson.loads(text) if text else {}


# -- batches ---------------------------------------------------------------------------------------

_COUNTS = """INSERT INTO "batch_counts" ("batch_id", "lines", "answered", "failed", "results", "input_tokens",
  "output_tokens", "cost_usd")
SELECT ?, (SELECT count(*) FROM "batch_requests" WHERE "batch_id" = ?),
  coalesce(sum(CASE WHEN "request_row_id" IS NOT NULL AND NOT "failed" THEN 1 ELSE 0 END), 0),
  coalesce(sum(CASE WHEN "request_row_id" IS NOT NULL AND "failed" THEN 1 ELSE 0 END), 0),
  count(*), sum("input_tokens"), sum("output_tokens"), sum("cost_usd")
FROM "batch_results" WHERE "batch_id" = ?
ON CONFLICT ("batch_id") DO UPDATE SET "lines" = excluded."lines", "answered" = excluded."answered",
  "failed" = excluded."failed", "results" = excluded."results", "input_tokens" = excluded."input_tokens",
  "output_tokens" = excluded."output_tokens", "cost_usd" = excluded."cost_usd\""""


def recount_batch(batch_id: str) -> None:
    """Recompute one batch's counters from its lines (after a link bound or matched some)."""
    db = models.db.obj
    assert db is not None, "recount_batch outside models.use()"
    db.execute_sql(adapt(db, _COUNTS), (batch_id, batch_id, batch_id))


_ALL_COUNTS = """INSERT INTO "batch_counts" ("batch_id", "lines", "answered", "failed", "results", "input_tokens",
  "output_tokens", "cost_usd")
SELECT b."id", coalesce(r.n, 0), coalesce(x.answered, 0), coalesce(x.failed, 0), coalesce(x.n, 0), x.inp, x.outp,
  x.cost
FROM "batches" b
LEFT JOIN (SELECT "batch_id", count(*) AS n FROM "batch_requests" WHERE "batch_id" IS NOT NULL
           GROUP BY "batch_id") r ON r."batch_id" = b."id"
LEFT JOIN (SELECT "batch_id", count(*) AS n,
             sum(CASE WHEN "request_row_id" IS NOT NULL AND NOT "failed" THEN 1 ELSE 0 END) AS answered,
             sum(CASE WHEN "request_row_id" IS NOT NULL AND "failed" THEN 1 ELSE 0 END) AS failed,
             sum("input_tokens") AS inp, sum("output_tokens") AS outp, sum("cost_usd") AS cost
           FROM "batch_results" WHERE "batch_id" IS NOT NULL GROUP BY "batch_id") x ON x."batch_id" = b."id"
WHERE b."pruned" IS NULL OR b."pruned" <> 'rows'"""
PRUNED_BEFORE = "calls_pruned_before"  # velvet_meta: calls started before this were removed (velvet prune)


# -- rebuild ---------------------------------------------------------------------------------------

def rebuild(db: Database, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Recompute ``batch_counts`` and ``call_rollups`` from the rows, in one transaction.

    ``progress(n)`` is called as calls are read. Writers wait meanwhile (on PostgreSQL the two tables
    are locked; on SQLite the transaction holds the write lock), so nothing is counted twice or missed.
    """
    t0 = time.perf_counter()
    pg = isinstance(db, PostgresqlDatabase)
    lock = {"lock_type": "IMMEDIATE"} if isinstance(db, SqliteDatabase) else {}
    with db.atomic(**lock):
        if pg:
            db.execute_sql('LOCK TABLE "batch_counts", "call_rollups" IN EXCLUSIVE MODE')
        # a batch whose lines were pruned keeps its counters: its rows cannot give them again
        db.execute_sql('DELETE FROM "batch_counts" WHERE "batch_id" NOT IN (SELECT "id" FROM "batches" '
                       "WHERE \"pruned\" = 'rows')")
        db.execute_sql(_ALL_COUNTS)
        batches = db.execute_sql('SELECT count(*) FROM "batch_counts"').fetchone()[0]
        # periods whose calls were pruned (whole or in part) keep their rollups; the later ones are recomputed
        hour, day = _kept_until(db)
        db.execute_sql(adapt(db, 'DELETE FROM "call_rollups" WHERE ("hours" = 1 AND "period" >= ?) OR '
                                 '("hours" = 24 AND "period" >= ?)'), (ts(db, hour), ts(db, day)))
        acc: dict[Key, Sums] = {}
        calls = 0
        sql = adapt(db, f'SELECT {", ".join(f'"{c}"' for c in CALL_COLUMNS)} FROM "calls" WHERE "started_at" >= ?')
        if pg:
            cur = db.connection().cursor(name="velvet_rebuild")
            cur.itersize = 5000
            cur.execute(sql, (hour,))
        else:
            cur = db.execute_sql(sql, (ts(db, hour),))
        while rows := cur.fetchmany(5000):
            accumulate(rows, acc)
            calls += len(rows)
            if progress:
                progress(len(rows))
        cur.close()
        insert_sums(db, {k: s for k, s in acc.items() if k[0] == HOUR or k[1] >= day})
    return {"batches": int(batches), "calls": calls, "rollup_rows": len(acc),
            "seconds": round(time.perf_counter() - t0, 3)}


def _kept_until(db: Database) -> tuple[datetime, datetime]:
    """The first whole hour and day after the calls pruned (``velvet_meta``'s ``calls_pruned_before``)."""
    found = db.execute_sql(adapt(db, 'SELECT "value" FROM "velvet_meta" WHERE "key" = ?'), (PRUNED_BEFORE,))
    row = found.fetchone()
    if row is None:
        return datetime.min, datetime.min
    cut = as_datetime(row[0])
    hour = cut.replace(minute=0, second=0, microsecond=0)
    hour += timedelta(hours=1) if hour < cut else timedelta()
    day = hour.replace(hour=0)
    day += timedelta(days=1) if day < hour else timedelta()
    return hour, day


def insert_sums(db: Database, acc: dict[Key, Sums]) -> None:
    """Insert new rollup rows (none of these keys may be stored yet)."""
    values = [(h, ts(db, p), m, e, k, s.calls, s.errors, s.input_tokens, s.output_tokens, s.cost,
               orjson.dumps(s.latency).decode() if s.latency else None,
               orjson.dumps(s.ttft).decode() if s.ttft else None)
              for (h, p, m, e, k), s in sorted(acc.items())]
    cur = db.cursor()
    for part in chunks(values, 1000):
        cur.executemany(adapt(db, 'INSERT INTO "call_rollups" ("hours", "period", "model", "endpoint", '
                                 '"key_fingerprint", "calls", "errors", "input_tokens", "output_tokens", '
                                 '"cost_usd", "latency_hist", "ttft_hist") '
                                 f'VALUES ({", ".join("?" * 12)})'),
                        part)
