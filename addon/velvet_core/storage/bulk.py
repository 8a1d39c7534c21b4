"""Fast inserts of many rows: one prepared statement and ``executemany``; on PostgreSQL, COPY for many."""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple

from peewee import (
    BigIntegerField,
    BooleanField,
    CharField,
    DateTimeField,
    DoubleField,
    FloatField,
    IntegerField,
    SqliteDatabase,
    TextField,
)

from velvet_core.storage import models
from velvet_core.storage.values import clean_rows

CHUNK = 500
COPY_FROM = 50  # PostgreSQL: from this many rows on, COPY through a temporary table (3x faster than executemany)


@functools.cache
def indexed(model: type[models.Base]) -> frozenset[str]:
    """The text columns of ``model`` in an index (their values must fit an index entry)."""
    names = {f.name for f in model._meta.sorted_fields if f.index or f.unique or f.primary_key}
    for index in model._meta.indexes:  # (columns, unique) tuples, or ModelIndex objects (partial indexes)
        names.update(index[0] if isinstance(index, tuple) else
                     (getattr(e, "name", None) for e in getattr(index, "_expressions", ())))
    names.discard(None)
    return frozenset(n for n in names if isinstance(model._meta.fields.get(n), CharField | TextField))


def chunks(rows: list[Any], n: int = CHUNK) -> Iterable[list[Any]]:
    for i in range(0, len(rows), n):
        yield rows[i:i + n]


_AS_IS = frozenset({CharField, TextField, IntegerField, BigIntegerField, FloatField, DoubleField})
_READY: dict[type, type | tuple[type, ...]] = {DateTimeField: datetime, BooleanField: bool}


class _Plan(NamedTuple):
    sql: str
    fields: tuple[Any, ...]
    json: tuple[int, ...]  # the positions of JSON columns
    other: tuple[tuple[int, Any, Any], ...]  # other converted columns: position, db_value, types left as is


@functools.cache
def _plan(model: type[models.Base], param: str) -> _Plan:
    fields = tuple(f for f in model._meta.sorted_fields if not isinstance(f, models.AutoField))
    names = ", ".join(f'"{f.column_name}"' for f in fields)
    # ON CONFLICT DO NOTHING skips rows already there (replays); SQLite's INSERT OR IGNORE would also
    # silently skip a row that breaks NOT NULL, which must fail instead (and be isolated by the writer)
    sql = (f"INSERT INTO \"{model._meta.table_name}\" ({names}) "
           f"VALUES ({', '.join([param] * len(fields))}) ON CONFLICT DO NOTHING")
    json = tuple(i for i, f in enumerate(fields) if isinstance(f, models.JSONField))
    other = tuple((i, f.db_value, _READY.get(type(f), ())) for i, f in enumerate(fields)
                  if type(f) not in _AS_IS and i not in json)
    return _Plan(sql, fields, json, other)


def _values(plan: _Plan, rows: list[dict[str, Any]]) -> list[Any]:
    """Each row's values in field order, ready for the driver (missing fields get their defaults)."""
    defaults = {f.name: f.default() if callable(f.default) else f.default for f in plan.fields}
    pick = operator.itemgetter(*defaults)  # the row's values in field order, picked in C
    values: list[Any] = [pick({**defaults, **r}) for r in rows]
    json, other = plan.json, plan.other
    for n, v in enumerate(values):
        for i in json:  # JSON text, the common case, is kept as it is unless it holds a \u0000 escape
            x = v[i]
            if x is not None and (type(x) is not str or ("\\" in x and "\\u0000" in x)):  # (memchr first)
                break
        else:
            for i, _, ready in other:
                x = v[i]
                if x is not None and not isinstance(x, ready):
                    break
            else:
                continue
        v = list(v)
        for i in json:
            v[i] = models.json_text(v[i])
        for i, conv, ready in other:
            if v[i] is not None and not isinstance(v[i], ready):
                v[i] = conv(v[i])
        values[n] = v
    return values


def insert_rows(model: type[models.Base], rows: list[dict[str, Any]], returning: str | None = None,
                direct: bool = False) -> list[Any] | None:
    """Insert ``rows`` (dicts by field name; missing fields get their defaults), ignoring conflicts.

    One prepared statement and ``executemany``: peewee's query builder spent about three quarters
    of the ingest time rendering 500-row INSERTs. With ``returning`` (a column name; PostgreSQL only),
    the values of that column for the rows actually inserted (not those a conflict skipped).
    ``direct`` (PostgreSQL, many rows): COPY straight into the table, for rows known not to conflict (a
    conflict then raises ``IntegrityError``).
    """
    if not rows:
        return [] if returning else None
    clean_rows(rows, bounded=indexed(model))
    db = models.db.obj  # the real database behind the per-thread proxy
    assert db is not None, "insert_rows outside models.use()"
    plan = _plan(model, db.param)
    sql, fields, values = plan.sql, plan.fields, _values(plan, rows)
    cursor = db.cursor()
    if returning is not None:
        assert not isinstance(db, SqliteDatabase), "RETURNING is only asked of PostgreSQL"
    if not isinstance(db, SqliteDatabase) and len(values) >= COPY_FROM:
        return _copy(cursor, model, fields, values, None if direct else returning, direct)
    if returning is not None:
        out: list[Any] = []
        for part in chunks(values, 1000):
            cursor.executemany(f'{sql} RETURNING "{returning}"', part, returning=True)
            while True:
                out.extend(r[0] for r in cursor.fetchall())
                if not cursor.nextset():
                    break
        return out
    for part in chunks(values, 1000):
        cursor.executemany(sql, part)
    return None


def _copy(cursor: Any, model: type[models.Base], fields: tuple[Any, ...], values: list[tuple[Any, ...]],
          returning: str | None, direct: bool = False) -> list[Any] | None:
    """PostgreSQL: COPY the rows into a temporary table, then move them over, skipping conflicts as INSERT does.

    The temporary table (this session's own, no WAL) is emptied by the statement that moves its rows.
    """
    table = model._meta.table_name
    names = ", ".join(f'"{f.column_name}"' for f in fields)
    if direct:
        with cursor.copy(f'COPY "{table}" ({names}) FROM STDIN') as copy:
            for row in values:
                copy.write_row(row)
        return None
    staging = f'"_velvet_in_{table}"'
    cursor.execute(f'CREATE TEMPORARY TABLE IF NOT EXISTS {staging} AS SELECT {names} FROM "{table}" WITH NO DATA')
    with cursor.copy(f"COPY {staging} ({names}) FROM STDIN") as copy:
        for row in values:
            copy.write_row(row)
    cursor.execute(f'WITH moved AS (DELETE FROM {staging} RETURNING {names}) INSERT INTO "{table}" ({names}) '
                   f'SELECT {names} FROM moved ON CONFLICT DO NOTHING'
                   + (f' RETURNING "{returning}"' if returning else ""))
    return [r[0] for r in cursor.fetchall()] if returning else None
