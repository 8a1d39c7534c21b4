"""PostgreSQL: ``calls``, ``batch_requests`` and ``batch_results`` partitioned by time (``velvet_pg_partitions``).

A new database gets it from the start; ``velvet migrate --partition PERIOD`` converts an existing one (the proxies
stopped: the rows are copied into the partitioned tables, ids and the id sequences kept). Each table then has a
partition per period (``calls_p20261201``, ``batch_requests_p20261201`` …) and a default one that catches a row no
period holds yet (it stays empty: :func:`ensure` creates the current and the next periods at every start and every
hour, and moves what the default holds into a period's partition when it creates it).

``calls`` is partitioned by ``started_at``: its primary key is ``(id, started_at)`` and its unique key
``(flow_id, started_at)``, so a flow written twice (a journal replayed) is still written once. The batch tables are
partitioned by ``file_at``, when the line's file was first seen (the same for every line of a file, see
``storage/batch_store.add_lines``): their unique keys become ``(file_id, line_no, file_at)``, which a line stored
again still meets. ``batch_results.request_row_id`` is then a plain column (PostgreSQL cannot point a foreign key
at a partitioned table's ``id`` alone).

Retention drops the partitions wholly older than its cutoff instead of deleting their rows: every ``calls``
partition before it (:func:`drop_before`), and a batch table's partition only when every line in it belongs to a
batch retention takes whole, or to no batch (:func:`drop_lines_before`); what is left goes row by row.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from peewee import Database, PostgresqlDatabase

from velvet_core.storage import views

log = logging.getLogger("velvet")
PERIODS = ("month", "week", "day")
ENV = "VELVET_PG_PARTITIONS"  # what the proxy's option gives its writer and background processes
AHEAD = 3  # periods created ahead of the current one
# the partitioned tables and their partition keys; converted in this order (batch_results before the table its
# foreign key points at)
KEYS = {"calls": "started_at", "batch_results": "file_at", "batch_requests": "file_at"}
LINES = ("batch_results", "batch_requests")
ENDED = "COALESCE(completed_at, failed_at, expired_at, cancelled_at)"


def requested() -> str | None:
    """The period a new database is partitioned by (the proxy's option, through the environment)."""
    v = os.environ.get(ENV, "").strip().lower()
    return v if v in PERIODS else None


def period_of(db: Database) -> str | None:
    """The period ``calls`` is partitioned by, or None (not partitioned, or not PostgreSQL)."""
    if not isinstance(db, PostgresqlDatabase):
        return None
    got = db.execute_sql("SELECT value FROM velvet_meta WHERE key = 'calls_partitions'").fetchone()
    return got[0] if got else None


def start_of(at: datetime, period: str) -> datetime:
    day = at.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    if period == "month":
        return day.replace(day=1)
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day


def next_start(at: datetime, period: str) -> datetime:
    if period == "month":
        return (at.replace(day=28) + timedelta(days=4)).replace(day=1)
    return at + timedelta(days=7 if period == "week" else 1)


def partitioned(db: Database) -> list[str]:
    """The tables of :data:`KEYS` that are partitioned (PostgreSQL), in :data:`KEYS` order."""
    if not isinstance(db, PostgresqlDatabase):
        return []
    got = {r[0] for r in db.execute_sql(
        "SELECT c.relname FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
        "WHERE c.relnamespace = current_schema()::regnamespace").fetchall()}
    return [t for t in KEYS if t in got]


def periods(db: Database, table: str = "calls") -> dict[str, tuple[datetime, datetime]]:
    """``table``'s period partitions: name -> [from, to)."""
    out = {}
    for name, bound in db.execute_sql(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON "
            "c.oid = i.inhrelid WHERE i.inhparent = %s::regclass", (table,)).fetchall():
        m = re.search(r"FROM \('([^']+)'\) TO \('([^']+)'\)", bound or "")
        if m:
            out[name] = (datetime.fromisoformat(m[1]), datetime.fromisoformat(m[2]))
    return out


def ensure(db: Database, now: datetime, period: str | None = None, since: datetime | None = None) -> list[str]:
    """The partitions of the current period and the next ones (from ``since``'s period, if given), made where
    missing in every partitioned table; rows a default partition holds for a new period are moved into it first.
    Returns the names made."""
    period = period or period_of(db)
    if period is None:
        return []
    made = []
    end = start_of(now, period)
    for _ in range(AHEAD + 1):
        end = next_start(end, period)
    for table in partitioned(db):
        have = {lo for lo, _ in periods(db, table).values()}
        lo = start_of(min(since or now, now), period)
        while lo < end:
            hi = next_start(lo, period)
            if lo not in have:
                made.append(_add(db, table, lo, hi))
            lo = hi
    return made


def _add(db: Database, table: str, lo: datetime, hi: datetime) -> str:
    name, key = f"{table}_p{lo:%Y%m%d}", KEYS[table]
    with db.atomic():
        db.execute_sql(f'LOCK TABLE "{table}" IN SHARE ROW EXCLUSIVE MODE')  # (writers wait; readers go on)
        db.execute_sql(f'CREATE TABLE "{name}" (LIKE "{table}" INCLUDING DEFAULTS)')
        moved = db.execute_sql(f'WITH m AS (DELETE FROM "{table}_default" WHERE {key} >= %s AND {key} < %s '
                               f'RETURNING *) INSERT INTO "{name}" SELECT * FROM m', (lo, hi)).rowcount
        db.execute_sql(f"ALTER TABLE \"{table}\" ATTACH PARTITION \"{name}\" FOR VALUES FROM ('{lo.isoformat()}') "
                       f"TO ('{hi.isoformat()}')")
    if moved:
        log.info("velvet: partition %s made, %d rows moved into it from %s_default", name, moved, table)
    return name


Timer = Callable[[Callable[[], Any]], Any]  # runs a transaction, timing it (retention's longest transaction)


def _run(step: Callable[[], Any]) -> Any:
    """A :data:`Timer` that only runs the step."""
    return step()


def _drop(db: Database, table: str, name: str, sizes: str = "", timed: Timer = _run) -> tuple[int, int]:
    """Detach and drop one partition; returns its rows and the bytes of ``sizes`` (an SQL sum), counted first,
    outside the transaction (which then holds the parent's lock for the detach and drop alone)."""
    n, size = db.execute_sql(f'SELECT count(*), {sizes or "0"} FROM "{name}"').fetchone()

    def detach() -> None:
        with db.atomic():
            db.execute_sql(f'ALTER TABLE "{table}" DETACH PARTITION "{name}"')
            db.execute_sql(f'DROP TABLE "{name}"')
    timed(detach)
    return int(n), int(size or 0)


def drop_before(db: Database, cutoff: datetime, timed: Timer = _run) -> tuple[int, int]:
    """Drop the ``calls`` partitions wholly before ``cutoff`` (retention's rows); returns (partitions, rows)."""
    if "calls" not in partitioned(db):
        return 0, 0
    dropped = rows = 0
    for name, (_lo, hi) in sorted(periods(db).items(), key=lambda x: x[1][0]):
        if hi <= cutoff:
            rows += _drop(db, "calls", name, timed=timed)[0]
            dropped += 1
    return dropped, rows


def drop_lines_before(db: Database, cutoff: datetime, timed: Timer = _run) -> tuple[int, int, int]:
    """Drop the batch tables' partitions wholly before ``cutoff`` whose every line retention takes: lines of
    batches that ended before the cutoff (whose other lines retention then deletes row by row, so each batch
    goes whole), and lines of no batch whose file is older than the cutoff and no later batch takes. A
    partition holding one line of a batch retention keeps stays. Returns the partitions, lines and bytes of
    bodies dropped."""
    dropped = rows = size = 0
    kept = f"SELECT id FROM batches WHERE {ENDED} IS NULL OR {ENDED} >= %(cutoff)s"
    young = " UNION ALL ".join(
        [f"SELECT {c} FROM batches WHERE {c} IS NOT NULL AND ({ENDED} IS NULL OR {ENDED} >= %(cutoff)s)"
         for c in ("input_file_id", "output_file_id", "error_file_id")]
        + ["SELECT id FROM files WHERE first_seen_at >= %(cutoff)s"])
    for table in partitioned(db):
        if table not in LINES:
            continue
        for name, (_lo, hi) in sorted(periods(db, table).items(), key=lambda x: x[1][0]):
            if hi > cutoff:
                continue
            blocked = db.execute_sql(
                f'SELECT EXISTS (SELECT 1 FROM "{name}" WHERE batch_id IN ({kept})) OR EXISTS (SELECT 1 FROM '
                f'"{name}" WHERE batch_id IS NULL AND file_id IN ({young}))', {"cutoff": cutoff}).fetchone()[0]
            if blocked:
                continue
            n, b = _drop(db, table, name, "COALESCE(sum(octet_length(body::text)), 0)", timed)
            rows, size, dropped = rows + n, size + b, dropped + 1
    return dropped, rows, size


def _unique_with(definition: str, key: str) -> str:
    """A unique index's definition with the partition key added to its columns (PostgreSQL requires it)."""
    return re.sub(r"\(([^()]*)\)\s*$", lambda m: f"({m[1]}, {key})", definition)


def partition(db: Database, period: str, now: datetime) -> dict[str, Any]:
    """Partition by ``period`` the tables of :data:`KEYS` not partitioned yet (a new database, or ``velvet
    migrate --partition``): their rows copied, ids and sequences kept, every index made again on the partitioned
    table (unique ones with the partition key). One transaction."""
    if not isinstance(db, PostgresqlDatabase):
        raise ValueError("partitions are a PostgreSQL feature (this database is SQLite)")
    if period not in PERIODS:
        raise ValueError(f"--partition takes {', '.join(PERIODS)}, got {period!r}")
    have, done = period_of(db), partitioned(db)
    if have is not None and have != period:
        raise ValueError(f"calls is already partitioned by {have}")
    todo = [t for t in KEYS if t not in done]
    if not todo:
        raise ValueError(f"calls is already partitioned by {have}")
    counts: dict[str, int] = {}
    with db.atomic():
        # the views (batch_lines, batch_summary …) read the tables by name: made again on the new tables. The old
        # tables are dropped without CASCADE: a view of another schema that reads them stops the conversion
        kept = views.saved(db)
        views.drop(db, kept)
        for table in todo:
            counts[table] = _convert(db, table, period, now)
        views.remake(db, kept)
        if have is None:
            db.execute_sql("INSERT INTO velvet_meta (key, value) VALUES ('calls_partitions', %s)", (period,))
    made = ensure(db, now, period)
    return {"period": period, "tables": todo, "calls": counts.get("calls", 0),
            "lines": counts.get("batch_requests", 0) + counts.get("batch_results", 0),
            "moved": sum(counts.values()), "partitions": sum(len(periods(db, t)) for t in KEYS),
            "made_ahead": len(made)}


def _convert(db: Database, table: str, period: str, now: datetime) -> int:
    key = KEYS[table]
    old = f"{table}_unpartitioned"
    db.execute_sql(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
    indexes = [(n, d) for n, d in db.execute_sql(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s AND schemaname = current_schema()",
        (table,)).fetchall()]
    if table in LINES:  # lines stored before the partition key existed: their file's time (one per file)
        _fill_file_at(db, table, now)
    span = db.execute_sql(f'SELECT min({key}), max({key}) FROM "{table}"').fetchone()
    db.execute_sql(f'ALTER TABLE "{table}" RENAME TO "{old}"')
    for name, _ in indexes:
        db.execute_sql(f'ALTER INDEX "{name}" RENAME TO "{name}_unpartitioned"')
    db.execute_sql(f'CREATE TABLE "{table}" (LIKE "{old}" INCLUDING DEFAULTS) PARTITION BY RANGE ({key})')
    db.execute_sql(f'ALTER SEQUENCE "{table}_id_seq" OWNED BY "{table}".id')
    db.execute_sql(f'ALTER TABLE "{table}" ADD PRIMARY KEY (id, {key})')
    for name, definition in indexes:
        if name.endswith("_pkey"):
            continue
        db.execute_sql(_unique_with(definition, key) if "UNIQUE" in definition else definition)
    db.execute_sql(f'CREATE TABLE "{table}_default" PARTITION OF "{table}" DEFAULT')
    lo = start_of(span[0], period) if span[0] is not None else start_of(now, period)
    last = max(span[1] or now, now)
    while lo <= last:
        hi = next_start(lo, period)
        db.execute_sql(f"CREATE TABLE \"{table}_p{lo:%Y%m%d}\" PARTITION OF \"{table}\" FOR VALUES FROM "
                       f"('{lo.isoformat()}') TO ('{hi.isoformat()}')")
        lo = hi
    moved = db.execute_sql(f'INSERT INTO "{table}" SELECT * FROM "{old}"').rowcount
    db.execute_sql(f'DROP TABLE "{old}"')
    return int(moved)


def _fill_file_at(db: Database, table: str, now: datetime) -> None:
    """Give the lines without ``file_at`` their file's first sight, else their batch's creation, else ``now``:
    one value for all the lines of a file, as new lines get (``storage/batch_store.add_lines``)."""
    db.execute_sql(
        f'UPDATE "{table}" t SET file_at = COALESCE((SELECT f.first_seen_at FROM files f WHERE f.id = t.file_id), '
        f'(SELECT b.created_at FROM batches b WHERE b.id = t.batch_id), %s) WHERE t.file_at IS NULL', (now,))
