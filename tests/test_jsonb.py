"""JSON columns: jsonb on PostgreSQL, JSON text on SQLite; the migration of existing rows; the documented queries
(docs/schema.md)."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from support.pg import reader_url
from support.rig import call_row
from test_migrations import new_db, run_script  # noqa: F401 - new_db is a fixture
from velvet_core.cli import main
from velvet_core.query import queries
from velvet_core.storage import models
from velvet_core.storage.database import connect, migrate
from velvet_core.storage.migrations import (
    _JSON_COLUMNS,
    BASELINE_PG,
    BASELINE_SQLITE,
    BASELINE_VERSION,
    MIGRATIONS,
    _set_version,
)
from velvet_core.storage.ops import CallRow, RequestLines
from velvet_core.storage.store import Store

SCHEMA_DOC = Path(__file__).resolve().parent.parent / "docs" / "schema.md"


def is_sqlite(db) -> bool:
    return db.__class__.__name__.startswith("Sqlite")


def before_jsonb(db) -> None:
    """``db`` as the schema was just before the jsonb step (whatever number the step gets)."""
    run_script(db, BASELINE_SQLITE if is_sqlite(db) else BASELINE_PG)
    version = BASELINE_VERSION
    for step in MIGRATIONS:
        if step.name == "jsonb":
            break
        if step.version > BASELINE_VERSION:
            step.apply(db)
            version = step.version
    _set_version(db, version)


def one(db, sql: str) -> object:
    return db.execute_sql(sql).fetchone()[0]


def test_json_columns_are_the_models_json_fields():
    fields = {(m._meta.table_name, f.column_name) for m in models.MODELS for f in m._meta.sorted_fields
              if isinstance(f, models.JSONField)}
    assert fields == {(t, c) for t, cs in _JSON_COLUMNS.items() for c in cs.split()}


def test_existing_rows_are_converted(new_db):  # noqa: F811
    db = new_db()
    before_jsonb(db)
    p = db.param
    rows = {
        "calls": dict(flow_id="f1", started_at="2026-11-24 10:00:00", method="POST", host="api.openai.com",
                      path="/v1/chat/completions", endpoint="chat.completions", action="create", stream=False,
                      complete=True, usage_estimated=False, tags='{"team": "ml"}',
                      request_headers='{"user-agent": "OpenAI/Python 1.99.0", "content-type": "text/plain"}',
                      request_body="not json at all", response_body='{"text": "a\\u0000b", "n": 1}',
                      response_headers=None),
        "batches": dict(id="batch_1", status="completed", input_file_id="file-in",
                        first_seen_at="2026-11-24 10:00:00",
                        last_seen_at="2026-11-24 10:00:00", metadata='{"job": "x"}', usage='{"input_tokens": 3}',
                        errors='{"data": []}', output_expires_after='{"anchor": "created_at", "seconds": 3600}'),
        "uploads": dict(id="upload_1", updated_at="2026-11-24 10:00:00", part_ids='["part_1", "part_2"]'),
    }
    for table, values in rows.items():
        db.execute_sql(f'INSERT INTO "{table}" ({", ".join(values)}) VALUES ({", ".join([p] * len(values))})',
                       tuple(values.values()))
    for line, body in ((1, '{"messages": []}'), (2, '{"custom_id": "broken')):
        db.execute_sql(f"INSERT INTO batch_requests (file_id, line_no, custom_id, body, batch_id) "
                       f"VALUES ({p}, {p}, {p}, {p}, {p})", ("file-in", line, f"r{line}", body, "batch_1"))
    db.execute_sql(f"INSERT INTO batch_results (file_id, line_no, batch_id, custom_id, request_row_id, body, "
                   f"failed, seen_at) VALUES ({p}, 1, 'batch_1', 'r1', (SELECT id FROM batch_requests WHERE "
                   f"line_no = 1), {p}, {p}, '2026-11-24 10:00:00')",
                   ("file-out", '{"usage": {"total_tokens": 7}}', False))

    migrate(db)

    if is_sqlite(db):
        ua = one(db, "SELECT json_extract(request_headers, '$.\"user-agent\"') FROM calls")
        assert one(db, "SELECT json_extract(request_body, '$') FROM calls") == "not json at all"
        assert one(db, "SELECT json_extract(response_body, '$.text') FROM calls") == "a\ufffdb"
        assert one(db, "SELECT count(*) FROM batch_requests WHERE json_valid(body)") == 2
        assert one(db, "SELECT json_extract(part_ids, '$[1]') FROM uploads") == "part_2"
    else:
        types = db.execute_sql("SELECT table_name, column_name FROM information_schema.columns WHERE "
                               "table_schema = current_schema() AND data_type = 'jsonb'").fetchall()
        assert {(t, c) for t, c in types if t in _JSON_COLUMNS} == {
            (t, c) for t, cs in _JSON_COLUMNS.items() for c in cs.split()}
        ua = one(db, "SELECT request_headers->>'user-agent' FROM calls")
        assert one(db, "SELECT request_body #>> '{}' FROM calls") == "not json at all"
        assert one(db, "SELECT response_body->>'text' FROM calls") == "a\ufffdb"  # jsonb refuses \u0000
        assert one(db, "SELECT (response_body->>'n')::int + 1 FROM calls") == 2
        assert one(db, "SELECT jsonb_typeof(body) FROM batch_requests WHERE line_no = 2") == "string"
        assert one(db, "SELECT part_ids->>1 FROM uploads") == "part_2"
        assert one(db, "SELECT count(*) FROM pg_proc WHERE proname = 'velvet_to_jsonb'") == 0
    assert ua == "OpenAI/Python 1.99.0"
    # the views are back and read the converted columns; the read side parses what it gets
    assert db.execute_sql("SELECT id, lines, answered FROM batch_summary").fetchall() == [("batch_1", 2, 1)]
    line = queries.batch_line(db, "batch_1", "r1")
    assert line["request"] == {"messages": []} and line["response"] == {"usage": {"total_tokens": 7}}
    assert queries.call(db, "f1")["request"] == "not json at all"
    assert queries.batch(db, "batch_1")["metadata"] == {"job": "x"}
    with models.use(db):
        assert orjson.loads(models.Batch.get_by_id("batch_1").output_expires_after)["seconds"] == 3600
        broken = models.BatchRequest.get(models.BatchRequest.line_no == 2)
        assert orjson.loads(broken.body) == '{"custom_id": "broken'


@pytest.mark.parametrize("value", ['{"a": "x\\u0000y", "b": "\\\\u0000"}', {"a": "x\x00y", "b": "\\u0000"}])
def test_writes_take_any_json(db_url, value):
    """Rows as the writer writes them (executemany and peewee's queries); NUL escapes become U+FFFD on both
    backends; values read back as JSON text."""
    db = connect(db_url)
    db.connect()
    try:
        migrate(db)
        Store(db).apply([
            CallRow({"flow_id": "f", "started_at": "2026-11-24 10:00:00", "method": "POST", "host": "h",
                     "path": "/", "endpoint": "other", "action": "other", "response_body": value,
                     "request_body": orjson.dumps("plain text").decode()}),
            RequestLines([{"file_id": "file-1", "line_no": 1, "body": value}])])
        with models.use(db):
            call = models.Call.get()
            assert orjson.loads(call.response_body) == {"a": "x\ufffdy", "b": "\\u0000"}
            assert orjson.loads(call.request_body) == "plain text" and call.usage_estimated is False
            assert orjson.loads(models.BatchRequest.get().body) == {"a": "x\ufffdy", "b": "\\u0000"}
            models.Batch.insert(id="b", status="completed", first_seen_at="2026-11-24 10:00:00",
                                last_seen_at="2026-11-24 10:00:00", metadata={"k": "v\x00"}).execute()
            models.Batch.update(usage='{"input_tokens": 1}').execute()
            b = models.Batch.get()
            assert (orjson.loads(b.metadata), orjson.loads(b.usage)) == ({"k": "v\ufffd"}, {"input_tokens": 1})
    finally:
        db.close()


def test_json_text_only_touches_nul_escapes():
    assert models.json_text('{"a": "\\\\\\u0000"}') == '{"a": "\\\\\\ufffd"}'  # escaped backslash, then NUL
    assert models.json_text('{"a": "\\\\u0000"}') == '{"a": "\\\\u0000"}'  # a backslash and the text u0000
    assert models.json_text("[1]") == "[1]" and models.json_text(None) is None and models.json_text([1]) == "[1]"


def readme_queries(backend: str) -> list[str]:
    """The statements of docs/schema.md's SQL block that starts with ``-- <backend>``."""
    blocks = re.findall(r"```sql\n(.*?)```", SCHEMA_DOC.read_text(), re.S)
    [block] = [b for b in blocks if b.startswith(f"-- {backend}")]
    code = "\n".join(line for line in block.splitlines() if not line.startswith("--"))
    return [s.strip() for s in code.split(";\n") if s.strip()]


def test_readme_json_queries(proxy, monkeypatch, capsys):
    """docs/schema.md's JSON queries for the proxy's backend, through ``velvet sql``, on a call the SDK made."""
    client = proxy.client(monkeypatch)
    msg = "What does jsonb give me?"
    r = client.chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                         messages=[{"role": "user", "content": msg}])
    call_row(proxy.db_url, r.headers["x-request-id"])
    queries_ = readme_queries("SQLite" if proxy.db_url.startswith("sqlite") else "PostgreSQL")
    assert len(queries_) >= 3
    results = []
    url = reader_url(proxy.db_url) if proxy.db_url.startswith("postgresql") else proxy.db_url  # a read-only role
    for sql in queries_:
        assert main(["--db", url, "sql", sql, "--json"]) == 0, sql
        results.append(orjson.loads(capsys.readouterr().out))
    clients = {r["client"] for r in results[0]}
    assert any(c.startswith("OpenAI/Python") for c in clients), results[0]
    assert msg in {r["first_message"] for r in results[1]}
