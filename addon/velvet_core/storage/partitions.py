"""PostgreSQL: ``calls`` partitioned by time (``velvet_pg_partitions = month | week | day``).

A new database gets it from the start; ``velvet migrate --partition PERIOD`` converts an existing one (the proxies
stopped: the rows are copied into the partitioned table, ids and the id sequence kept). ``calls`` then has a
partition per period (``calls_p20261201`` …) and a default one that catches a row no period holds yet (it stays
empty: :func:`ensure` creates the current and the next periods at every start and every hour, and moves what the
default holds into a period's partition when it creates it). Its primary key is ``(id, started_at)`` and its
unique key ``(flow_id, started_at)``: a flow written twice (a journal replayed) has the same start, so it is still
written once. Retention drops the partitions wholly older than its cutoff (:func:`drop_before`) instead of deleting
their rows, then deletes what is left row by row.

The batch tables stay as they are: a batch's input and result lines arrive hours or days apart and are pruned
together (a batch whole), and their upserts key on ``(file_id, line_no)``, which a time key would have to join.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timedelta
from typing import Any

from peewee import Database, PostgresqlDatabase

log = logging.getLogger("velvet")
PERIODS = ("month", "week", "day")
ENV = "VELVET_PG_PARTITIONS"  # what the proxy's option gives its writer and background processes
AHEAD = 3  # periods created ahead of the current one
_NAME = re.compile(r"^calls_p(\d{8})$")


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


def _partitions(db: Database) -> dict[str, tuple[datetime, datetime]]:
    """calls' period partitions: name -> [from, to)."""
    out = {}
    for name, bound in db.execute_sql(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON "
            "c.oid = i.inhrelid WHERE i.inhparent = 'calls'::regclass").fetchall():
        m = re.search(r"FROM \('([^']+)'\) TO \('([^']+)'\)", bound or "")
        if m:
            out[name] = (datetime.fromisoformat(m[1]), datetime.fromisoformat(m[2]))
    return out


def ensure(db: Database, now: datetime, period: str | None = None) -> list[str]:
    """The partitions of the current period and the next ones, made where missing; rows the default partition
    holds for a new period are moved into it first. Returns the names made."""
    period = period or period_of(db)
    if period is None:
        return []
    have = {lo for lo, _ in _partitions(db).values()}
    made = []
    lo = start_of(now, period)
    for _ in range(AHEAD + 1):
        hi = next_start(lo, period)
        if lo not in have:
            made.append(_add(db, lo, hi))
        lo = hi
    return made


def _add(db: Database, lo: datetime, hi: datetime) -> str:
    name = f"calls_p{lo:%Y%m%d}"
    with db.atomic():
        db.execute_sql("LOCK TABLE calls IN SHARE ROW EXCLUSIVE MODE")  # (writers wait a moment; readers go on)
        db.execute_sql(f'CREATE TABLE "{name}" (LIKE calls INCLUDING DEFAULTS)')
        moved = db.execute_sql(f'WITH m AS (DELETE FROM calls_default WHERE started_at >= %s AND started_at < %s '
                               f'RETURNING *) INSERT INTO "{name}" SELECT * FROM m', (lo, hi)).rowcount
        db.execute_sql(f"ALTER TABLE calls ATTACH PARTITION \"{name}\" FOR VALUES FROM ('{lo.isoformat()}') "
                       f"TO ('{hi.isoformat()}')")
    if moved:
        log.info("velvet: partition %s made, %d calls moved into it from calls_default", name, moved)
    return name


def drop_before(db: Database, cutoff: datetime) -> tuple[int, int]:
    """Drop the partitions wholly before ``cutoff`` (retention's rows); returns (partitions, rows) dropped."""
    if period_of(db) is None:
        return 0, 0
    dropped = rows = 0
    for name, (_lo, hi) in sorted(_partitions(db).items(), key=lambda x: x[1][0]):
        if hi > cutoff:
            continue
        with db.atomic():
            n = db.execute_sql(f'SELECT count(*) FROM "{name}"').fetchone()[0]
            db.execute_sql(f'ALTER TABLE calls DETACH PARTITION "{name}"')
            db.execute_sql(f'DROP TABLE "{name}"')
        dropped += 1
        rows += int(n)
    return dropped, rows


def partition(db: Database, period: str, now: datetime) -> dict[str, Any]:
    """Make ``calls`` partitioned by ``period`` (a new database, or ``velvet migrate --partition``): its rows
    copied, ids and sequence kept, every index made again on the partitioned table. One transaction."""
    if not isinstance(db, PostgresqlDatabase):
        raise ValueError("partitions are a PostgreSQL feature (this database is SQLite)")
    if period not in PERIODS:
        raise ValueError(f"--partition takes {', '.join(PERIODS)}, got {period!r}")
    if (have := period_of(db)) is not None:
        raise ValueError(f"calls is already partitioned by {have}")
    with db.atomic():
        db.execute_sql("LOCK TABLE calls IN ACCESS EXCLUSIVE MODE")
        indexes = [(n, d) for n, d in db.execute_sql(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'calls' AND schemaname = "
            "current_schema()").fetchall()]
        span = db.execute_sql("SELECT min(started_at), max(started_at), count(*) FROM calls").fetchone()
        db.execute_sql("ALTER TABLE calls RENAME TO calls_unpartitioned")
        for name, _ in indexes:
            db.execute_sql(f'ALTER INDEX "{name}" RENAME TO "{name}_unpartitioned"')
        db.execute_sql("CREATE TABLE calls (LIKE calls_unpartitioned INCLUDING DEFAULTS) PARTITION BY RANGE "
                       "(started_at)")
        db.execute_sql("ALTER SEQUENCE calls_id_seq OWNED BY calls.id")
        db.execute_sql("ALTER TABLE calls ADD PRIMARY KEY (id, started_at)")
        for name, definition in indexes:
            if name.endswith("_pkey"):
                continue
            d = definition  # ("ON schema.calls": the name now is the partitioned table's)
            if "UNIQUE" in d and "(flow_id)" in d:  # unique keys hold the partition key
                d = d.replace("(flow_id)", "(flow_id, started_at)")
            db.execute_sql(d)
        db.execute_sql("CREATE TABLE calls_default PARTITION OF calls DEFAULT")
        db.execute_sql("INSERT INTO velvet_meta (key, value) VALUES ('calls_partitions', %s)", (period,))
        first = start_of(span[0], period) if span[0] is not None else start_of(now, period)
        lo = first
        last = max(span[1] or now, now)
        while lo <= last:
            hi = next_start(lo, period)
            db.execute_sql(f"CREATE TABLE \"calls_p{lo:%Y%m%d}\" PARTITION OF calls FOR VALUES FROM "
                           f"('{lo.isoformat()}') TO ('{hi.isoformat()}')")
            lo = hi
        moved = db.execute_sql("INSERT INTO calls SELECT * FROM calls_unpartitioned").rowcount
        db.execute_sql("DROP TABLE calls_unpartitioned")
    made = ensure(db, now, period)
    return {"period": period, "calls": int(span[2]), "moved": int(moved), "partitions": len(_partitions(db)),
            "made_ahead": len(made)}
