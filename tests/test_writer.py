"""writer/writer.py: the writer thread queues, writes, isolates refused operations, reports health, rides
out outages."""

from __future__ import annotations

import json
import os
import time

import orjson
from support.helpers import Refused, calls, chat
from support.helpers import start_writer as run
from support.rig import bound
from velvet_core.cost.prices import Pricer
from velvet_core.parsing.classify import classify
from velvet_core.processing.processor import Processor
from velvet_core.storage import models
from velvet_core.storage.ops import CallRow, RequestLines
from velvet_core.storage.snapshot import CallSnapshot
from velvet_core.writer.writer import Writer


def test_a_refused_operation_never_blocks_the_others(db_url, tmp_path):
    """The bad operation is isolated: the others are written, it lands in a smaller form or as a dead letter."""
    good = [CallRow({"flow_id": f"g{i}", "method": "POST", "host": "h", "path": "/v1/x", "endpoint": "other",
                     "action": "other", "started_at": "2026-11-24 10:00:00"}) for i in range(40)]
    smaller = CallRow({**good[0].row, "flow_id": "bad-model", "input_tokens": Refused()})  # kept without it…
    smaller.row["request_body"] = "{}"
    dead = CallRow({**good[0].row, "flow_id": "no-start", "started_at": None})  # NOT NULL: cannot be stored
    lines = RequestLines([{"file_id": "f", "line_no": n, "custom_id": f"c{n}",
                           "body": Refused() if n == 7 else "{}"} for n in range(1, 21)])
    ops = [*good[:20], smaller, dead, lines, *good[20:]]

    w = Writer(db_url, lambda s: iter(ops), spool_dir=tmp_path / "spool")
    w.start()
    w.submit(chat(0))
    assert w.stop(60)
    rows = calls(db_url)
    assert {f"g{i}" for i in range(40)} <= set(rows)
    assert "bad-model" in rows and "only its identity was kept" in rows["bad-model"].problem
    assert "no-start" not in rows
    with bound(db_url):
        got = {r.line_no: r for r in models.BatchRequest.select()}
    assert set(got) == set(range(1, 21)) and got[8].body == "{}"
    assert got[7].body is None and "left out: body" in got[7].problem
    letters = [json.loads(line) for line in (tmp_path / "spool" / "dead-letters.jsonl").read_text().splitlines()]
    assert [d["data"]["row"]["flow_id"] for d in letters] == ["no-start"] and letters[0]["operation"] == "CallRow"
    assert w.health.dead_lettered == 1 and w.status()["dead_lettered"] == 1


def test_health_is_published(db_url, tmp_path):
    spool = tmp_path / "spool"
    w = run(db_url, spool, [chat(i) for i in range(3)])
    (status,) = [orjson.loads(p.read_bytes()) for p in spool.glob("status-*.json")]
    assert status["written"] >= 3 and status["failing_since"] is None and status["stopped_at"]
    assert status["pid"] == os.getpid() and "password" not in status["db"]
    with bound(db_url):
        (row,) = list(models.ProxyStatus.select())
    assert row.proxy == w.health.proxy and row.written >= 3 and row.stopped_at is not None


def test_health_is_published_less_often_while_nothing_changes(db_url, tmp_path, monkeypatch):
    """The status file every 2 s and the database row every 5 s while the writer works; both every 10 s (a
    heartbeat, well within the 30 s after which ``velvet status`` calls a proxy stopped) while nothing changes:
    an idle proxy does not write its row every 5 s for as long as it runs."""
    from types import SimpleNamespace

    from velvet_core.query.status import STALE
    from velvet_core.storage.database import open_db
    from velvet_core.writer import health as health_mod

    now = [1000.0]
    monkeypatch.setattr(health_mod, "time", SimpleNamespace(monotonic=lambda: now[0], time=time.time))
    h = health_mod.Health(db_url, tmp_path, "tag")
    db = open_db(db_url)
    try:
        def published(at: float) -> tuple[bool, bool]:
            """(file, row) written by a publish at ``at``."""
            now[0] = 1000.0 + at
            h.file.unlink(missing_ok=True)
            db.execute_sql("DELETE FROM velvet_proxies")
            h.publish(db)
            return h.file.exists(), db.execute_sql("SELECT count(*) FROM velvet_proxies").fetchone()[0] == 1

        assert published(0) == (True, True)
        assert [published(t) for t in (3, 6, 9.5)] == [(False, False)] * 3  # quiet: nothing before 10 s
        assert published(10) == (True, True)
        h.wrote(5)  # a change: the file within 2 s, the row within 5 s
        assert published(11) == (False, False)
        assert published(12) == (True, False)
        assert published(15) == (False, True)
        h.queue_depth = 3
        assert published(17) == (True, False)
        assert STALE.total_seconds() > health_mod.QUIET * 2
    finally:
        db.close()


def test_outage_warns_then_recovers(tmp_path, caplog):
    """Writes failing for longer than a few seconds: one warning, then one when they recover."""
    target = tmp_path / "later"
    target.write_text("not a directory")  # the database cannot be created yet
    url = f"sqlite:///{target / 'v.db'}"
    w = Writer(url, Processor().operations, spool_dir=tmp_path / "spool", warn_after=0.5)
    w.start()
    w.submit(chat(1))
    deadline = time.monotonic() + 10
    while "have failed for" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "have failed for" in caplog.text and w.status()["failing_since"] is not None
    target.unlink()  # (the writer's next try makes the folder itself: it may win the race with this mkdir)
    target.mkdir(exist_ok=True)
    assert w.stop(30)
    assert "recovered after" in caplog.text and set(calls(url)) == {"flow-1"}


def test_a_batch_file_is_written_at_once_however_long_the_writer_lets_calls_gather(sqlite_url, tmp_path):
    """A writer lets live calls gather before a transaction (1 s in the writer process); a batch file going up
    is a transaction's worth on its own and is written without that wait."""
    from test_batch_units import multipart_body

    b = "velvetboundary"
    data = b"".join(b'{"custom_id":"r-%d","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n' % i
                    for i in range(20))
    now = time.time()
    upload = CallSnapshot(
        flow_id="up-1", method="POST", host="api.openai.com", path="/v1/files",
        route=classify("POST", "/v1/files"),
        key_fingerprint="fp", tags={}, request_headers={"content-type": f"multipart/form-data; boundary={b}"},
        request_body=multipart_body(b, [("purpose", None, b"batch"), ("file", "in.jsonl", data)]),
        request_encoding=None, started_at=now, ended_at=now, status_code=200,
        response_headers={"content-type": "application/json"},
        response_body=b'{"id":"file-up1","object":"file","purpose":"batch","filename":"in.jsonl","bytes":1}')
    w = Writer(sqlite_url, Processor(Pricer()).operations, spool_dir=tmp_path / "spool", linger=60)
    w.start()
    try:
        w.submit(upload)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and w.written == 0:
            time.sleep(0.05)
        assert w.written > 0, "the upload waited for the linger"
        with bound(sqlite_url):
            assert models.BatchRequest.select().where(models.BatchRequest.file_id == "file-up1").count() == 20
    finally:
        assert w.stop(60)
