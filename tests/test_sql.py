"""storage/sql.py: the one set of SQL helpers, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
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
