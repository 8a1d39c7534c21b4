"""The SQL helpers every reader shares: placeholders, rows, timestamps, JSON values, and whether a table or column
exists; one definition each.

velvet's queries are written once for both backends, with ``?`` placeholders; stored timestamps are naive UTC
(``timestamp`` on PostgreSQL, peewee's text on SQLite); JSON columns hold text (or ``jsonb``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import orjson
from peewee import Database, PostgresqlDatabase

from velvet_core import clock


def is_pg(db: Database) -> bool:
    return isinstance(db, PostgresqlDatabase)


def adapt(db: Database, sql: str) -> str:
    """Our queries use ``?`` placeholders; psycopg wants ``%s``."""
    return sql.replace("?", "%s") if is_pg(db) else sql


# The relation named by the parameter in the current schema (NULL if there is none, or no current schema).
_PG_RELATION = "to_regclass(quote_ident(current_schema()) || '.' || quote_ident(%s))"


def has_table(db: Database, name: str) -> bool:
    """Whether the queries reach a table (or view) ``name``: a read-only command may open a database that an
    older velvet made and no proxy has migrated yet.

    One catalog look-up, about 0.3 ms on PostgreSQL: peewee's ``table_exists`` lists every table of the schema
    first, and its ``get_columns`` reads ``information_schema``, 4-9 ms a call there. On PostgreSQL it looks in the
    current schema, as peewee's did: where the migrations create the tables (a table of that name in a schema
    further down the ``search_path`` is not velvet's). Any text is a name there, never SQL."""
    if is_pg(db):
        return bool(db.execute_sql(f"SELECT {_PG_RELATION} IS NOT NULL", (name,)).fetchone()[0])
    found = db.execute_sql("SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?", (name,))
    return found.fetchone() is not None


def has_column(db: Database, table: str, column: str) -> bool:
    """Whether ``table`` has ``column`` (see :func:`has_table`); false if there is no such table."""
    if is_pg(db):
        sql = (f"SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = {_PG_RELATION} "
               "AND attname = %s AND attnum > 0 AND NOT attisdropped")
        return db.execute_sql(sql, (table, column)).fetchone() is not None
    # (the pragma's statement: its table-valued function, pragma_table_info(?), asks the read-only
    # connection's authorizer to update sqlite_master)
    quoted = '"' + table.replace('"', '""') + '"'
    return any(r[1] == column for r in db.execute_sql(f"PRAGMA table_info({quoted})").fetchall())


def rows(db: Database, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Every row of a query as a dict keyed by column name."""
    cur = db.execute_sql(adapt(db, sql), tuple(params))
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def stream_rows(db: Database, sql: str, params: Sequence[Any] = (), size: int = 1000) -> Iterator[dict[str, Any]]:
    """Rows one at a time in constant memory (a server-side cursor on PostgreSQL)."""
    if is_pg(db):
        conn = db.connection()
        with conn.transaction(), conn.cursor(name="velvet_export") as cur:
            cur.execute(adapt(db, sql), tuple(params))
            cols: list[str] | None = None
            while batch := cur.fetchmany(size):  # iterating the cursor fetched a dozen rows per round trip
                cols = cols or [d[0] for d in cur.description]
                for r in batch:
                    yield dict(zip(cols, r, strict=True))
        return
    cur = db.execute_sql(sql, tuple(params))
    cols = [d[0] for d in cur.description]
    while batch := cur.fetchmany(size):
        for r in batch:
            yield dict(zip(cols, r, strict=True))


def ts(db: Database, dt: datetime) -> Any:
    """A timestamp as a query parameter comparable with the stored values.

    On SQLite a datetime is stored as ``dt.isoformat(" ")`` (sqlite3's adapter: microseconds only when not
    zero), and compared as text: the parameter must be written the same way, or a row stored at a whole second
    sorts before a bound written with ``.000000`` (and one written to the second misses the fraction).
    """
    dt = clock.naive_utc(dt)
    return dt if is_pg(db) else dt.isoformat(" ")


def to_dt(v: Any) -> datetime | None:
    """A stored timestamp (datetime on PostgreSQL, text on SQLite, ``…Z`` in a status file) as naive UTC."""
    return clock.parse(v)


def iso(v: Any) -> str | None:
    """A stored timestamp as ISO 8601 UTC to the second (``2026-11-24T15:00:00Z``)."""
    return clock.iso_z(v)


def to_int(v: Any) -> int | None:
    """An integer column's value (``None``, and anything not a number, as ``None``)."""
    try:
        return None if v is None or isinstance(v, bool) else int(v)
    except (TypeError, ValueError):
        return None


def json_value(v: Any) -> Any:
    """A stored JSON value parsed. Text that is not JSON comes back as it is (never lost from a view);
    a value already parsed (``jsonb`` from a connection that parses them) is returned unchanged."""
    if v is None or not isinstance(v, str | bytes | memoryview):
        return v
    try:
        return orjson.loads(bytes(v) if isinstance(v, memoryview) else v)
    except orjson.JSONDecodeError:
        return bytes(v).decode("utf-8", "replace") if isinstance(v, bytes | memoryview) else v


def json_field(db: Database, column: str) -> str:
    """SQL reading one top-level key (the next ``?`` parameter, see :func:`json_key`) of a JSON column."""
    return f"({column}::jsonb ->> ?)" if is_pg(db) else f"json_extract({column}, ?)"


def json_key(db: Database, key: str) -> str:
    """The parameter for :func:`json_field`: the key itself on PostgreSQL, a JSON path on SQLite."""
    return key if is_pg(db) else '$."' + key.replace('"', '\\"') + '"'


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..100) of unsorted ``values`` (SQLite has no percentile aggregate)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def set_meta(db: Database, key: str, value: str) -> None:
    """Set ``velvet_meta``'s ``key`` (an eval's mark, the refresh's state)."""
    db.execute_sql(adapt(db, 'INSERT INTO velvet_meta ("key", "value") VALUES (?, ?) '
                             'ON CONFLICT ("key") DO UPDATE SET "value" = excluded."value"'), (key, value))
