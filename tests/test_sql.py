"""storage/sql.py: the one set of SQL helpers, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from support.pg import fresh_pg_url
from velvet_core.clock import parse_since
from velvet_core.storage.database import open_db
from velvet_core.storage.sql import adapt, json_value, rows, to_int, ts


@pytest.mark.parametrize("micro", [0, 500_000])
def test_a_bound_matches_a_row_stored_at_it_exactly(db_url, micro):
    """A row stored at the bound is in ``>= bound`` and not in ``< bound``, with or without a fraction of a
    second (SQLite compares text: the bound must be written as the row is)."""
    db = open_db(db_url)
    at = datetime(2026, 11, 24, 15, 0, 0, micro)
    db.execute_sql("CREATE TABLE probe (at TIMESTAMP)")  # (a datetime goes in as velvet's writes send it)
    db.execute_sql(adapt(db, "INSERT INTO probe (at) VALUES (?)"), (at,))
    n = "SELECT count(*) AS n FROM probe WHERE at {} ?"
    assert rows(db, n.format(">="), (ts(db, at),))[0]["n"] == 1
    assert rows(db, n.format("<"), (ts(db, at),))[0]["n"] == 0
    assert rows(db, n.format(">="), (ts(db, at + timedelta(microseconds=1)),))[0]["n"] == 0
    # an aware bound is the same instant in UTC
    aware = at.replace(tzinfo=UTC).astimezone(datetime.now().astimezone().tzinfo)
    assert rows(db, n.format(">="), (ts(db, aware),))[0]["n"] == 1
    db.close()


def test_json_values_never_lose_what_is_stored():
    assert json_value('{"a": 1}') == {"a": 1}
    assert json_value(b'[1]') == [1]
    assert json_value(memoryview(b'"text"')) == "text"
    assert json_value("not json {") == "not json {"
    assert json_value(b"\xffnot json") == "\ufffdnot json"
    assert json_value({"already": "parsed"}) == {"already": "parsed"}
    assert json_value(None) is None


def test_ints_and_since():
    assert [to_int(v) for v in (None, True, "3", 4.0, "x")] == [None, None, 3, 4, None]
    now = datetime(2026, 11, 24, 15, 0)
    assert parse_since("2h", now) == datetime(2026, 11, 24, 13, 0)
    with pytest.raises(ValueError, match=r"use e\.g\."):
        parse_since("soon", now)


def test_has_table_and_has_column_agree_with_the_catalog(db_url):
    """The cheap look-ups the read-only commands use agree with peewee's introspection for every table and
    column of the schema, see views, and find nothing that is not there (a dropped column, a hostile name)."""
    from velvet_core.storage.database import open_readonly
    from velvet_core.storage.sql import has_column, has_table, is_pg

    db = open_db(db_url)
    db.execute_sql("CREATE TABLE probe (a INTEGER, b INTEGER)")
    if is_pg(db):  # (SQLite's DROP COLUMN needs 3.35: PostgreSQL keeps a dropped column in its catalog)
        db.execute_sql("ALTER TABLE probe DROP COLUMN b")
    tables = db.get_tables()
    columns = {t: [c.name for c in db.get_columns(t)] for t in tables}
    db.close()
    ro = open_readonly(db_url)
    try:
        assert {"batches", "calls", "velvet_meta", "probe"} <= set(tables)
        for t in tables:
            assert has_table(ro, t), t
            for c in columns[t]:
                assert has_column(ro, t, c), (t, c)
        assert has_table(ro, "batch_summary")  # a view
        assert has_column(ro, "calls", "cache_hit") and has_column(ro, "batches", "pruned")
        assert not has_table(ro, "nope") and not has_column(ro, "calls", "nope")
        assert not has_column(ro, "nope", "a")
        assert has_column(ro, "probe", "a") and has_column(ro, "probe", "b") is (not is_pg(ro))
        for hostile in ("calls; DROP TABLE calls", "x') OR 1=1 --", "calls\x01"):
            assert not has_table(ro, hostile) and not has_column(ro, hostile, "model")
            assert not has_column(ro, "calls", hostile)
        assert has_table(ro, "calls")
    finally:
        ro.close()


def test_has_table_looks_where_the_migrations_create_tables():
    """PostgreSQL: a table in a schema further down the search_path is not velvet's (the migrations create theirs
    in the current schema, and a read-only command must not take another's for them)."""
    from velvet_core.storage.database import open_readonly
    from velvet_core.storage.sql import has_column, has_table, is_pg

    db_url = fresh_pg_url()
    db = open_db(db_url)
    assert is_pg(db)
    mine = rows(db, "SELECT current_schema() AS s")[0]["s"]
    other = f"{mine}_other"
    db.execute_sql(f"CREATE SCHEMA {other}")
    db.execute_sql(f"CREATE TABLE {other}.elsewhere (a INTEGER)")
    db.close()
    ro = open_readonly(db_url)
    try:
        ro.execute_sql(f"SET search_path = {mine}, {other}")
        assert rows(ro, "SELECT count(*) AS n FROM elsewhere")[0]["n"] == 0  # (the queries would reach it)
        assert not has_table(ro, "elsewhere") and not has_column(ro, "elsewhere", "a")
        assert has_table(ro, "calls") and has_column(ro, "calls", "model")
        ro.execute_sql(f"SET search_path = {other}, {mine}")
        assert has_table(ro, "elsewhere") and not has_table(ro, "calls")
        ro.execute_sql("SET search_path = no_such_schema")
        assert not has_table(ro, "calls") and not has_column(ro, "calls", "model")
    finally:
        ro.close()
        db = open_db(db_url)
        db.execute_sql(f"DROP SCHEMA {other} CASCADE")
        db.close()


def test_a_read_only_connection_is_read_only_whatever_the_url_says(db_url):
    """open_readonly's session is read-only even where the URL's options ask otherwise (PostgreSQL)."""
    import peewee
    from velvet_core.storage.database import open_readonly
    from velvet_core.storage.sql import is_pg

    open_db(db_url).close()
    if db_url.startswith("postgresql"):  # (added to the URL's one ``options``: a second would replace the first)
        assert "options=" in db_url
        db_url = db_url.replace("options=", "options=" + quote("-c default_transaction_read_only=off "), 1)
    ro = open_readonly(db_url)
    try:
        if is_pg(ro):
            assert rows(ro, "SHOW default_transaction_read_only")[0]["default_transaction_read_only"] == "on"
        with pytest.raises(peewee.DatabaseError, match=r"read-only|readonly|not authorized"):
            ro.execute_sql("INSERT INTO velvet_meta (key, value) VALUES ('x', 'y')")
    finally:
        ro.close()
