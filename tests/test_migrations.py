"""Schema migrations on SQLite and PostgreSQL: new databases and ones released velvets made end up alike.

``fixtures/schema_v*.sql`` are the statements velvet executed on an empty database when schema v1
(d638fc0^) and v2 (release 0.1, 5d7747f) were current, frozen.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peewee import Database, SqliteDatabase
from support.pg import fresh_pg_url
from velvet_core.storage import models
from velvet_core.storage.database import SCHEMA_VERSION, connect, migrate, schema_version
from velvet_core.storage.migrations import (
    BASELINE_PG,
    BASELINE_SQLITE,
    BASELINE_VERSION,
    MIGRATIONS,
    VIEWS,
)

FIXTURES = Path(__file__).parent / "fixtures"
REDUNDANT = {"batch_requests_file_id", "batch_requests_upload_part_id", "batch_requests_custom_id",
             "batch_requests_batch_id", "batch_results_file_id", "batch_results_batch_id",
             "batch_results_custom_id"}


def is_sqlite(db: Database) -> bool:
    return isinstance(db, SqliteDatabase)


def run_script(db: Database, sql: str) -> None:
    sql = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    for statement in sql.split(";\n"):
        if statement.strip():
            db.execute_sql(statement)


def load_released(db: Database, version: int) -> None:
    """Make ``db`` what velvet at schema ``version`` made of an empty database."""
    run_script(db, (FIXTURES / f"schema_v{version}.{'sqlite' if is_sqlite(db) else 'pg'}.sql").read_text())


@pytest.fixture
def new_db(db_url: str, tmp_path: Path) -> Iterator[Callable[[], Database]]:
    """Opens empty databases of the ``db_url`` backend, closed after the test."""
    opened: list[Database] = []

    def make() -> Database:
        if not opened:
            url = db_url
        elif db_url.startswith("sqlite"):
            url = f"sqlite:///{tmp_path / f'velvet{len(opened)}.db'}"
        else:
            url = fresh_pg_url()
        db = connect(url)
        db.connect()
        opened.append(db)
        return db

    yield make
    for db in opened:
        db.close()


def schema(db: Database) -> dict[str, Any]:
    """Per table and view: columns (name, type, NOT NULL, default, key), indexes and constraints."""
    out: dict[str, Any] = {}
    if is_sqlite(db):
        names = db.execute_sql("SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view')")
        for name, kind in names.fetchall():
            columns = [tuple(r[1:]) for r in db.execute_sql(f'PRAGMA table_info("{name}")')]
            indexes = sorted((r[1], r[2], tuple(c[2] for c in db.execute_sql(f'PRAGMA index_info("{r[1]}")')))
                             for r in db.execute_sql(f'PRAGMA index_list("{name}")'))
            fks = sorted(tuple(r[2:7]) for r in db.execute_sql(f'PRAGMA foreign_key_list("{name}")'))
            out[name] = {"kind": kind, "columns": columns, "indexes": indexes, "constraints": fks}
        return out
    (ns,) = db.execute_sql("SELECT current_schema()").fetchone()

    def rows(sql: str) -> list[tuple]:
        return [tuple(re.sub(rf"\b{ns}\.", "", v) if isinstance(v, str) else v for v in r)
                for r in db.execute_sql(sql, (ns,)).fetchall()]

    for name, kind in rows("SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = %s"):
        out[name] = {"kind": kind, "columns": [], "indexes": [], "constraints": []}
    for table, *column in rows("SELECT table_name, column_name, data_type, character_maximum_length, is_nullable, "
                               "column_default FROM information_schema.columns WHERE table_schema = %s "
                               "ORDER BY table_name, ordinal_position"):
        out[table]["columns"].append(tuple(column))
    for table, *index in rows("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = %s "
                              "ORDER BY indexname"):
        out[table]["indexes"].append(tuple(index))
    for table, *constraint in rows("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                                   "FROM pg_constraint WHERE connamespace = %s::regnamespace ORDER BY conname"):
        out[table]["constraints"].append(tuple(constraint))
    for view, definition in rows("SELECT viewname, definition FROM pg_views WHERE schemaname = %s"):
        out[view]["definition"] = definition
    return out


def insert_lines(db: Database) -> None:
    """A call and a batch with one request line and its answer, in plain SQL (any schema version)."""
    p = db.param

    def insert(table: str, **values: Any) -> None:
        db.execute_sql(f'INSERT INTO "{table}" ({", ".join(values)}) VALUES ({", ".join([p] * len(values))})',
                       tuple(values.values()))

    insert("calls", flow_id="flow-1", started_at="2026-11-24 10:00:00", method="POST", host="api.openai.com",
           path="/v1/chat/completions", endpoint="chat.completions", action="create", model="gpt-4o-mini",
           stream=False, complete=True, input_tokens=12)
    insert("batches", id="batch_1", status="completed", model="gpt-4o-mini",
           first_seen_at="2026-11-24 10:00:00", last_seen_at="2026-11-24 11:00:00")
    insert("batch_requests", file_id="file-in", line_no=1, custom_id="req-1", model="gpt-4o-mini",
           body='{"messages": []}', batch_id="batch_1")
    (request_row_id,) = db.execute_sql("SELECT id FROM batch_requests WHERE custom_id = 'req-1'").fetchone()
    insert("batch_results", file_id="file-out", line_no=1, batch_id="batch_1", custom_id="req-1",
           request_row_id=request_row_id, status_code=200, model="gpt-4o-mini-2024-07-18",
           body='{"ok": true}', failed=False, cost_usd=0.5, seen_at="2026-11-24 11:00:00")


def test_steps_are_named_and_consecutive():
    versions = [m.version for m in MIGRATIONS]
    assert MIGRATIONS[-1].version == SCHEMA_VERSION
    assert versions == list(range(versions[0], SCHEMA_VERSION + 1))
    assert versions[0] <= BASELINE_VERSION <= SCHEMA_VERSION
    assert len({m.name for m in MIGRATIONS}) == len(MIGRATIONS)


def test_baseline_is_the_released_v2_schema(new_db):
    """The frozen baseline makes exactly the schema velvet 0.1 made."""
    baseline, released = new_db(), new_db()
    run_script(baseline, BASELINE_SQLITE if is_sqlite(baseline) else BASELINE_PG)
    load_released(released, 2)
    assert schema(baseline) == schema(released)


@pytest.mark.parametrize("version", [1, 2])
def test_released_database_is_migrated(new_db, version, caplog):
    """Rows survive, the redundant indexes go, strings become unbounded, views still work."""
    db = new_db()
    load_released(db, version)
    assert schema_version(db) == version
    insert_lines(db)
    caplog.set_level(logging.INFO, logger="velvet_core.storage.migrations")

    assert migrate(db) == schema_version(db) == SCHEMA_VERSION
    for step in MIGRATIONS:
        assert (step.name in caplog.text) == (step.version > version)
    with models.use(db):
        assert models.Call.get(models.Call.flow_id == "flow-1").input_tokens == 12
        assert models.Batch.get_by_id("batch_1").status == "completed"
        result = models.BatchResult.get()
        assert result.request.custom_id == "req-1" and result.body == '{"ok": true}' and not result.failed
    indexes = {i.name for t in ("batch_requests", "batch_results") for i in db.get_indexes(t)}
    assert not indexes & REDUNDANT
    assert {"batch_requests_file_id_line_no", "batch_results_batch_id_custom_id"} <= indexes
    summary = db.execute_sql("SELECT id, lines, answered, failed, cost_usd FROM batch_summary").fetchall()
    assert summary == [("batch_1", 1, 1, 0, 0.5)]
    rollups = db.execute_sql("SELECT hours, calls, input_tokens FROM call_rollups ORDER BY hours").fetchall()
    assert rollups == [(1, 1, 12), (24, 1, 12)]  # the calls already there are counted
    lines = db.execute_sql("SELECT custom_id, model, response_body FROM batch_lines").fetchall()
    assert lines == [("req-1", "gpt-4o-mini-2024-07-18", '{"ok": true}')]
    if not is_sqlite(db):
        bounded = db.execute_sql("SELECT table_name, column_name FROM information_schema.columns "
                                 "WHERE table_schema = current_schema() "
                                 "AND data_type IN ('character varying', 'character')")
        assert bounded.fetchall() == [("velvet_meta", "key")]
    with models.use(db):  # longer than the VARCHAR(255) the released schema had
        models.Call.update(model="m" * 300).execute()
        models.BatchRequest.insert(file_id="file-in", line_no=2, custom_id="c" * 1000).execute()
        assert models.Call.get().model == "m" * 300
        assert models.BatchRequest.get(models.BatchRequest.line_no == 2).custom_id == "c" * 1000


@pytest.mark.parametrize("version", [1, 2])
def test_new_database_matches_an_upgraded_one(new_db, version):
    new, upgraded = new_db(), new_db()
    migrate(new)
    load_released(upgraded, version)
    migrate(upgraded)
    assert schema(new) == schema(upgraded)


def affinity(declared: str) -> str:
    """SQLite's column affinity for a declared type (https://sqlite.org/datatype3.html#affname)."""
    t = declared.upper()
    for needles, name in ((("INT",), "INTEGER"), (("CHAR", "CLOB", "TEXT"), "TEXT"), (("BLOB",), "BLOB"),
                          (("REAL", "FLOA", "DOUB"), "REAL")):
        if any(n in t for n in needles):
            return name
    return "NUMERIC"


def test_models_match_the_migrated_schema(new_db):
    """The models describe the tables the migrations make (on SQLite, VARCHAR and TEXT alike)."""
    migrated, from_models = new_db(), new_db()
    migrate(migrated)
    with models.use(from_models):
        from_models.create_tables(models.MODELS)
    run_script(from_models, VIEWS)
    expected, actual = schema(from_models), schema(migrated)
    if is_sqlite(migrated):
        for table in (*expected.values(), *actual.values()):
            table["columns"] = [(name, affinity(t), *rest) for name, t, *rest in table["columns"]]
    assert actual == expected


def test_migrating_again_changes_nothing(new_db, caplog):
    db = new_db()
    caplog.set_level(logging.INFO, logger="velvet_core.storage.migrations")
    migrate(db)
    # a new database is created, not upgraded: one line (an upgraded one logs each step, above)
    assert [r.getMessage() for r in caplog.records if r.name == "velvet_core.storage.migrations"] == [
        f"velvet: created database schema v{SCHEMA_VERSION}"]
    caplog.clear()
    before = schema(db)
    caplog.set_level(logging.INFO, logger="velvet_core.storage.migrations")
    assert migrate(db) == SCHEMA_VERSION
    assert [r for r in caplog.records if r.name == "velvet_core.storage.migrations"] == []
    assert schema(db) == before


def test_newer_schema_is_refused(new_db):
    db = new_db()
    migrate(db)
    db.execute_sql(f"UPDATE velvet_meta SET value = {db.param} WHERE key = 'schema_version'",
                   (str(SCHEMA_VERSION + 1),))
    with pytest.raises(RuntimeError, match=f"schema v{SCHEMA_VERSION + 1} is newer than this velvet"):
        migrate(db)
    assert schema_version(db) == SCHEMA_VERSION + 1


def test_lines_with_a_problem_are_found_without_reading_the_lines(sqlite_url):
    """Counting a file's bad lines (at each poll of its batch) and listing a batch's read a partial index, not the
    rows, whose ``problem`` sits after the body (SQLite's planner; PostgreSQL keeps big bodies out of line)."""
    from datetime import UTC, datetime

    from velvet_core.storage.batch_store import recount
    from velvet_core.storage.database import open_db

    db = open_db(sqlite_url)
    with models.use(db):
        rows = [{"file_id": "f", "line_no": n, "custom_id": f"c{n}", "body": "{}",
                 "problem": "bad" if n % 7 == 0 else None} for n in range(1, 101)]
        models.BatchRequest.insert_many(rows).execute()
        now = datetime.now(UTC).replace(tzinfo=None)
        models.File.insert(id="f", role="input", first_seen_at=now, updated_at=now).execute()
        recount("f")
        assert models.File.get_by_id("f").bad_lines == 14
    queries = ("SELECT count(*) FROM batch_requests WHERE file_id = ? AND problem IS NOT NULL",
               "SELECT problem, custom_id, line_no FROM batch_requests WHERE batch_id = ? AND problem IS NOT NULL "
               "ORDER BY line_no")
    plans = [" ".join(str(r[-1]) for r in db.execute_sql("EXPLAIN QUERY PLAN " + sql, ("x",)).fetchall())
             for sql in queries]
    assert "batch_requests_file_problems" in plans[0] and "batch_requests_batch_problems" in plans[1], plans
    db.close()


def test_stats_counts_estimated_calls_through_an_index(db_url):
    """`velvet stats` counts the calls whose tokens velvet estimated beside the rollups: through a partial index
    of those few calls, not by reading every call (it did: 270 ms at 1 M calls)."""
    from velvet_core.storage.database import open_db

    db = open_db(db_url)
    sql = f"SELECT model, started_at FROM calls WHERE usage_estimated AND started_at >= {db.param}"
    if isinstance(db, SqliteDatabase):
        rows = db.execute_sql("EXPLAIN QUERY PLAN " + sql, ("2026-01-01",)).fetchall()
        plan = " ".join(str(r[-1]) for r in rows)
        assert "calls_usage_estimated" in plan, plan
    else:  # (and on PostgreSQL, for a window with no start)
        db.execute_sql("SET enable_seqscan = off")  # (an empty table: ask whether the index can serve at all)
        plan = " ".join(r[0] for r in db.execute_sql("EXPLAIN SELECT model FROM calls WHERE usage_estimated"))
        db.execute_sql("RESET enable_seqscan")
        assert "calls_usage_estimated" in plan, plan
    db.close()


def at_version(db: Database, version: int) -> None:
    """Make ``db`` (empty) what the steps up to ``version`` make of velvet 0.1's schema."""
    from velvet_core.storage.migrations import _set_version

    load_released(db, BASELINE_VERSION)
    with db.atomic():
        for step in MIGRATIONS:
            if BASELINE_VERSION < step.version <= version:
                step.apply(db)
        _set_version(db, version)


def test_single_precision_columns_become_the_numbers_meant(new_db):
    """Schema v19: PostgreSQL's 4-byte REAL columns become doubles holding the number that was stored (0.0003, not
    the REAL's 0.00030000001), in a plain and a partitioned database, and the user's views on them (one reading
    another) survive; on SQLite (8-byte REALs already) nothing changes."""
    from datetime import datetime

    from velvet_core.storage import partitions

    first = new_db()
    for db in [first] if is_sqlite(first) else [first, new_db()]:
        at_version(db, 18)
        if db is not first:
            partitions.partition(db, "month", datetime(2026, 11, 24))
        p = db.param
        db.execute_sql(f"INSERT INTO calls (flow_id, started_at, method, host, path, endpoint, action, model, "
                       f"stream, complete, cost_usd, latency_ms, ttft_ms) VALUES ('f1', '2026-11-24 10:00:00', "
                       f"'POST', 'api.openai.com', '/v1/chat/completions', 'chat.completions', 'create', "
                       f"'gpt-4o-mini', {p}, {p}, {p}, {p}, {p})", (False, True, 0.0003, 123.456, 0.1))
        db.execute_sql(f"INSERT INTO alerts (at, rule, kind, subject, state, value, threshold, text) VALUES "
                       f"('2026-11-24 10:00:00', 'r', 'cost', 's', 'firing', {p}, {p}, 't')", (1.1e-5, 7.77))
        db.execute_sql("CREATE VIEW spend AS SELECT model, sum(cost_usd) AS usd FROM calls GROUP BY model")
        db.execute_sql("CREATE VIEW spend_top AS SELECT * FROM spend WHERE usd > 0")
        migrate(db)
        assert db.execute_sql("SELECT cost_usd, latency_ms, ttft_ms FROM calls").fetchall() == [
            (0.0003, 123.456, 0.1)]
        assert db.execute_sql("SELECT value, threshold FROM alerts").fetchall() == [(1.1e-5, 7.77)]
        assert db.execute_sql("SELECT model, usd FROM spend_top").fetchall() == [("gpt-4o-mini", 0.0003)]
        assert db.execute_sql("SELECT count(*) FROM batch_lines").fetchone() == (0,)  # velvet's views, made again
        if not is_sqlite(db):
            assert partitions.partitioned(db) == ([] if db is first else list(partitions.KEYS))
            single = db.execute_sql("SELECT table_name, column_name FROM information_schema.columns "
                                    "WHERE table_schema = current_schema() AND data_type = 'real'").fetchall()
            assert single == []


def test_money_keeps_every_digit_when_summed(db_url):
    """Every float column holds a double on both backends, and SQL sums them as doubles: 20,000 calls of
    $0.000123 are $2.46 (PostgreSQL's REAL made it 2.4598…), and a cost keeps its 15th digit."""
    from peewee import DoubleField, FloatField
    from velvet_core.storage.database import open_db

    db = open_db(db_url)
    with models.use(db):
        rows = [{"flow_id": f"f{i}", "started_at": "2026-11-24 10:00:00", "method": "POST", "host": "h",
                 "path": "/v1/chat/completions", "endpoint": "chat.completions", "action": "create",
                 "stream": False, "complete": True, "cost_usd": 0.000123} for i in range(20_000)]
        for i in range(0, len(rows), 1000):
            models.Call.insert_many(rows[i:i + 1000]).execute()
        models.Call.insert(flow_id="exact", started_at="2026-11-24 10:00:00", method="POST", host="h", path="/",
                           endpoint="e", action="a", stream=False, complete=True,
                           cost_usd=0.123456789012345).execute()
        for model in models.MODELS:
            for f in model._meta.sorted_fields:
                assert not isinstance(f, FloatField) or isinstance(f, DoubleField), (model, f.name)
    (total,) = db.execute_sql("SELECT sum(cost_usd) FROM calls WHERE flow_id <> 'exact'").fetchone()
    assert total == pytest.approx(2.46, rel=1e-12)
    assert db.execute_sql("SELECT cost_usd FROM calls WHERE flow_id = 'exact'").fetchone() == (0.123456789012345,)
    if not is_sqlite(db):
        assert db.execute_sql("SELECT table_name, column_name FROM information_schema.columns "
                              "WHERE table_schema = current_schema() AND data_type = 'real'").fetchall() == []
    db.close()


def test_a_view_of_another_schema_is_never_dropped_unseen():
    """PostgreSQL: a view in another schema that reads velvet's batch_lines: schema 19 stops and says so (nothing
    dropped, nothing retyped) rather than drop it with CASCADE."""
    db = connect(fresh_pg_url())
    db.connect()
    try:
        at_version(db, 18)
        (ns,) = db.execute_sql("SELECT current_schema()").fetchone()
        other = f"{ns}_mine"
        db.execute_sql(f'CREATE SCHEMA "{other}"')
        db.execute_sql(f'CREATE VIEW "{other}".answers AS SELECT custom_id, cost_usd FROM "{ns}".batch_lines')
        with pytest.raises(Exception, match="could not drop the views batch_lines"):
            migrate(db)
        assert schema_version(db) == 18
        assert db.execute_sql(f'SELECT count(*) FROM "{other}".answers').fetchone() == (0,)
        db.execute_sql(f'DROP SCHEMA "{other}" CASCADE')
    finally:
        db.close()
