"""Retention (``velvet prune``, ``velvet_retention``): bodies, then rows, removed in small transactions, a batch
always whole, and every figure of ``stats``, ``batches`` and the report the same afterwards (both backends)."""

from __future__ import annotations

import io
from datetime import timedelta

import orjson
import pytest
from support.helpers import jsonl
from support.rig import Proxy, call_row, wait_for
from test_e2e_batch import run_batch, wait_rows
from velvet_core import clock
from velvet_core.cli import main
from velvet_core.storage import rollups
from velvet_core.storage.database import open_db
from velvet_core.storage.models import BatchRequest, BatchResult
from velvet_core.storage.prune import Retention, RetentionError, prune

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "prune me"}]}


def cli(capsys, url: str, *argv: str) -> dict:
    capsys.readouterr()
    assert main([*argv, "--db", url, "--json"]) == 0, capsys.readouterr().err
    return orjson.loads(capsys.readouterr().out)


def counts(url: str) -> dict[str, int]:
    db = open_db(url)
    try:
        out = {t: db.execute_sql(f"SELECT count(*) FROM {t}").fetchone()[0]
               for t in ("calls", "batches", "batch_requests", "batch_results", "batch_events", "files")}
        out["bodies"] = db.execute_sql("SELECT count(*) FROM calls WHERE request_body IS NOT NULL").fetchone()[0]
        out["line_bodies"] = db.execute_sql("SELECT count(*) FROM batch_requests WHERE body IS NOT NULL"
                                            ).fetchone()[0]
        return out
    finally:
        db.close()


def test_prune_keeps_batches_whole_and_every_figure(proxy, monkeypatch, capsys):
    client = proxy.client(monkeypatch)
    request_ids = [client.chat.completions.with_raw_response.create(**CHAT).headers["x-request-id"]
                   for _ in range(3)]
    call_row(proxy.db_url, request_ids[-1])
    lines = [{"custom_id": f"p-{i}", "method": "POST", "url": "/v1/chat/completions", "body": CHAT}
             for i in range(4)]
    done = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    b, _ = run_batch(client, done.id)
    client.files.content(b.output_file_id).read()
    wait_rows(proxy.db_url, BatchResult, 4, BatchResult.batch_id == b.id, BatchResult.request.is_null(False))
    stuck_file = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    stuck, _ = run_batch(client, stuck_file.id, metadata={"standin": "stuck"}, until=("in_progress",))
    wait_rows(proxy.db_url, BatchRequest, 4, BatchRequest.batch_id == stuck.id)
    before = {"stats": cli(capsys, proxy.db_url, "stats"), "batches": cli(capsys, proxy.db_url, "batches")}
    future = clock.now() + timedelta(days=2)  # (the stand-in's clock runs ahead: everything is "older")

    db = open_db(proxy.db_url)
    try:
        counted = counts(proxy.db_url)
        dry = prune(db, bodies_before=future, dry_run=True)
        assert counts(proxy.db_url) == counted  # a dry run changes nothing
        real = prune(db, bodies_before=future)
        assert dry.as_dict() | {"seconds": 0} == real.as_dict() | {"seconds": 0}
        assert real.call_bodies_pruned >= 3 and real.batches_pruned == 1 and real.bytes_freed > 0
        assert real.lines_pruned == 0 and real.calls_pruned == 0
        after = counts(proxy.db_url)
        assert after["bodies"] == 0 and after["calls"] == counted["calls"]
        assert after["line_bodies"] == 4  # the batch still running keeps its lines' bodies: never half
        assert prune(db, bodies_before=future).as_dict()["call_bodies_pruned"] == 0  # nothing twice
    finally:
        db.close()
    shown = cli(capsys, proxy.db_url, "show", request_ids[0])
    assert shown["request"] is None and shown["pruned_at"] is not None and shown["input_tokens"] > 0
    capsys.readouterr()
    assert main(["show", "--db", proxy.db_url, request_ids[0]]) == 0
    assert "pruned" in capsys.readouterr().out
    line = cli(capsys, proxy.db_url, "show", b.id, "p-1")
    assert line["response"] is None and line["pruned_at"] is not None and line["cost_usd"] > 0

    capsys.readouterr()
    assert main(["prune", "--db", proxy.db_url, "--rows-after", "0s", "--dry-run", "--json"]) == 0
    dry_rows = orjson.loads(capsys.readouterr().out)
    db = open_db(proxy.db_url)
    try:
        real = prune(db, rows_before=future)
    finally:
        db.close()
    assert dry_rows["calls_pruned"] == real.calls_pruned == counted["calls"]
    after = counts(proxy.db_url)
    assert after["calls"] == 0 and real.batches_pruned == 1 and real.lines_pruned == 8  # 4 in, 4 out
    db = open_db(proxy.db_url)
    try:
        left = db.execute_sql("SELECT batch_id, count(*) FROM batch_requests GROUP BY batch_id").fetchall()
        assert left == [(stuck.id, 4)]  # the running batch, whole
        assert db.execute_sql("SELECT count(*) FROM batch_events WHERE batch_id = ?".replace(
            "?", db.param), (b.id,)).fetchone()[0] == 0
        pruned = db.execute_sql(f"SELECT pruned FROM batches WHERE id = {db.param}", (b.id,)).fetchone()[0]
        assert pruned == "rows"
        rollups.rebuild(db)  # a rebuild keeps what pruning took away from the rows
    finally:
        db.close()
    # the rollups and counters stay: the same figures as before (percentiles from the rollups' histograms: 2 %)
    stats = cli(capsys, proxy.db_url, "stats")
    assert stats["totals"] == before["stats"]["totals"] and stats["batches"] == before["stats"]["batches"]
    for now_, then in zip(stats["calls"], before["stats"]["calls"], strict=True):
        timing = {k for k in then if k.endswith("_ms")}
        assert {k: v for k, v in now_.items() if k not in timing} == {k: v for k, v in then.items()
                                                                       if k not in timing}
        assert all(now_[k] == pytest.approx(then[k], rel=0.02) for k in timing if then[k] is not None)
    assert cli(capsys, proxy.db_url, "batches") == before["batches"]


def test_retention_option_is_checked_and_applied_by_the_proxy(standin, tmp_path, db_url, monkeypatch, capsys):
    for bad in ("bodies", "bodies=soon", "rows=1d,bodies=2d", "files=3d", "bodies=1d,bodies=2d"):
        with pytest.raises(RetentionError):
            Retention.parse(bad)
    assert str(Retention.parse("bodies=30d, rows=400d")) == "bodies=30d,rows=400d"
    # a proxy with bodies=1h: a call of two hours ago loses its bodies at start, today's keeps them
    seed = Proxy(db_url, standin.url, tmp_path / "seed").start()
    try:
        client = seed.client(monkeypatch)
        ids = [client.chat.completions.with_raw_response.create(**CHAT).headers["x-request-id"] for _ in range(2)]
        call_row(db_url, ids[1])
    finally:
        seed.stop()
    db = open_db(db_url)
    old = clock.now() - timedelta(hours=2)
    db.execute_sql(f"UPDATE calls SET started_at = {db.param} WHERE request_id = {db.param}",
                   (old if "postgres" in db_url else old.isoformat(" "), ids[0]))
    db.close()
    p = Proxy(db_url, standin.url, tmp_path / "kept", extra=["--set", "velvet_retention=bodies=1h"]).start()
    try:
        wait_for(lambda: cli(capsys, db_url, "status")["database"]["retention_last_run"], what="a retention run")
        status = cli(capsys, db_url, "status")["database"]
        assert status["retention"] == "bodies=1h"
        assert status["retention_last_run"]["call_bodies_pruned"] == 1 and status["size_bytes"] > 0
        assert status["oldest_call_at"] is not None
        assert cli(capsys, db_url, "show", ids[0])["request"] is None
        assert cli(capsys, db_url, "show", ids[1])["request"] is not None
    finally:
        p.stop()


def test_sqlite_gives_pruned_pages_back_in_short_transactions(sqlite_url):
    from velvet_core.storage.models import Call, use

    db = open_db(sqlite_url)
    assert db.execute_sql("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental, for files velvet creates
    old = clock.now() - timedelta(days=40)
    body = orjson.dumps({"messages": [{"role": "user", "content": "x" * 4000}]}).decode()
    with use(db), db.atomic():
        for start in range(0, 6000, 500):
            Call.insert_many([{"flow_id": f"f{i}", "started_at": old + timedelta(seconds=i), "method": "POST",
                               "host": "api.openai.com", "path": "/v1/chat/completions", "endpoint": "chat",
                               "action": "create", "request_body": body, "response_body": body}
                              for i in range(start, start + 500)]).execute()
    pages = db.execute_sql("PRAGMA page_count").fetchone()[0]
    done = prune(db, bodies_before=clock.now() - timedelta(days=30))
    assert done.call_bodies_pruned == 6000 and done.bytes_freed >= 6000 * 2 * 4000
    assert done.longest_transaction_ms < 5000  # (chunks of 1,000 rows; scripts/faults measures the writer's wait)
    # bodies leave room in their pages for new rows; whole rows free whole pages, given back to the disk
    assert prune(db, rows_before=clock.now() - timedelta(days=30)).calls_pruned == 6000
    assert db.execute_sql("PRAGMA freelist_count").fetchone()[0] == 0
    assert db.execute_sql("PRAGMA page_count").fetchone()[0] < pages / 10  # the file shrank
    db.close()
