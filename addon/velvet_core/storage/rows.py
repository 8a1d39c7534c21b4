"""Fast inserts of many rows: one prepared statement and ``executemany``."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from peewee import BigIntegerField, CharField, FloatField, IntegerField, SqliteDatabase, TextField

from velvet_core.storage import models
from velvet_core.storage.values import clean_rows

CHUNK = 500


@functools.cache
def indexed(model: type[models.Base]) -> frozenset[str]:
    """The text columns of ``model`` in an index (their values must fit an index entry)."""
    names = {f.name for f in model._meta.sorted_fields if f.index or f.unique or f.primary_key}
    for columns, _ in model._meta.indexes:
        names.update(columns)
    return frozenset(n for n in names if isinstance(model._meta.fields.get(n), CharField | TextField))


def chunks(rows: list[Any], n: int = CHUNK) -> Iterable[list[Any]]:
    for i in range(0, len(rows), n):
        yield rows[i:i + n]


_AS_IS = frozenset({CharField, TextField, IntegerField, BigIntegerField, FloatField})


@functools.cache
def _insert_sql(model: type[models.Base], sqlite: bool, param: str) -> tuple[str, tuple[Any, ...]]:
    fields = tuple(f for f in model._meta.sorted_fields if not isinstance(f, models.AutoField))
    names = ", ".join(f'"{f.column_name}"' for f in fields)
    # ON CONFLICT DO NOTHING skips rows already there (replays); SQLite's INSERT OR IGNORE would also
    # silently skip a row that breaks NOT NULL, which must fail instead (and be isolated by the writer)
    sql = (f"INSERT INTO \"{model._meta.table_name}\" ({names}) "
           f"VALUES ({', '.join([param] * len(fields))}) ON CONFLICT DO NOTHING")
    return sql, fields


def insert_rows(model: type[models.Base], rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts by field name; missing fields get their defaults), ignoring conflicts.

    One prepared statement and ``executemany``: peewee's query builder spent about three quarters
    of the ingest time rendering 500-row INSERTs.
    """
    if not rows:
        return
    clean_rows(rows, bounded=indexed(model))
    db = models.db.obj  # the real database behind the per-thread proxy
    assert db is not None, "insert_rows outside models.use()"
    sql, fields = _insert_sql(model, isinstance(db, SqliteDatabase), db.param)
    # our rows hold str/int/float/None already: only the other fields (booleans, timestamps, JSON) convert
    convert = [(f.name, f.default() if callable(f.default) else f.default,
                None if type(f) in _AS_IS else f.db_value) for f in fields]
    values = [tuple(r.get(name, default) if conv is None else conv(r.get(name, default))
                    for name, default, conv in convert) for r in rows]
    cursor = db.cursor()
    for part in chunks(values, 1000):
        cursor.executemany(sql, part)
