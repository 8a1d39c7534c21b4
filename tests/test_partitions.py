"""PostgreSQL: calls partitioned by time (velvet_pg_partitions, velvet migrate --partition): a new database made
so, an existing one converted with its rows and ids, every reading command on it, a flow written twice still
once, the periods ahead made and the default partition emptied into them, retention dropping whole partitions
while the rollups keep what went; through a real mitmdump with the option."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from support.helpers import chat, js, q, run, start_writer
from support.pg import fresh_pg_url
from support.rig import Proxy, wait_for
from velvet_core import clock
from velvet_core.storage import partitions
from velvet_core.storage.database import open_db

pytestmark = pytest.mark.pg



def at(days_ago: float, i: int) -> object:
    s = chat(i)
    s.started_at = s.ended_at = time.time() - days_ago * 86400
    return s


def where(url: str) -> dict[str, int]:
    """calls per partition."""
    return {r["p"]: r["n"] for r in q(url, "SELECT tableoid::regclass::text AS p, count(*) AS n FROM calls "
                                           "GROUP BY 1")}


def tables(url: str) -> set[str]:
    """calls' partitions."""
    return {r["relname"] for r in q(url, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = "
                                         "i.inhrelid WHERE i.inhparent = 'calls'::regclass")}


def test_a_new_database_is_partitioned_and_read_as_before(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(partitions.ENV, "month")
    url = fresh_pg_url()
    first = at(0, 1)
    start_writer(url, tmp_path / "spool", [first, at(0.5, 2), first])  # flow-1 twice (a journal replayed): once
    assert q(url, "SELECT count(*) AS n FROM pg_partitioned_table WHERE partrelid = 'calls'::regclass")[0][
        "n"] == 1
    assert q(url, "SELECT value FROM velvet_meta WHERE key = 'calls_partitions'")[0]["value"] == "month"
    now = clock.now()
    this = f"calls_p{partitions.start_of(now, 'month'):%Y%m%d}"
    names = tables(url)
    assert this in names and "calls_default" in names and len(names) >= partitions.AHEAD + 2
    placed = where(url)
    assert sum(placed.values()) == 2 and placed.get("calls_default", 0) <= 1  # (flow-2 may be last month's)
    # every reading command as on any database
    calls = js(capsys, "--db", url, "calls")
    assert len(calls) == 2
    assert js(capsys, "--db", url, "show", str(calls[0]["id"]))["status_code"] == 200
    assert js(capsys, "--db", url, "stats", "--since", "7d")["totals"]["calls"] == 2
    assert js(capsys, "--db", url, "report", "--since", "7d")["totals"]["calls"] == 2
    code, _, err = run(capsys, "--db", url, "migrate", "--partition", "week")
    assert code == 2 and "already partitioned by month" in err


def test_migrate_converts_an_existing_database_and_retention_drops_whole_partitions(tmp_path, capsys):
    url = fresh_pg_url()
    snaps = [at(d, i) for i, d in enumerate((200, 120, 95, 60, 59, 31, 10, 1, 0), 1)]
    start_writer(url, tmp_path / "spool", snaps)
    before = q(url, "SELECT id, flow_id, started_at FROM calls ORDER BY id")
    stats = js(capsys, "--db", url, "stats", "--since", "400d")["totals"]
    out = js(capsys, "--db", url, "migrate", "--partition", "month")
    assert out["partitions"] == "month" and out["partitioned"]["moved"] == len(before) == 9
    assert q(url, "SELECT id, flow_id, started_at FROM calls ORDER BY id") == before  # ids kept
    assert where(url).get("calls_default", 0) == 0  # every row in its month
    assert len(where(url)) >= 6
    # the id sequence goes on; a flow written again is still one row
    start_writer(url, tmp_path / "spool2", [at(0, 100), snaps[-1]])
    after = q(url, "SELECT id FROM calls ORDER BY id")
    assert len(after) == 10 and after[-1]["id"] > before[-1]["id"]
    # retention: the months wholly before the cutoff go as partitions, the rest row by row; rollups keep them
    cutoff_days = 90
    old = sum(1 for r in before if r["started_at"] < clock.now() - timedelta(days=cutoff_days))
    tables_before = tables(url)
    pruned = js(capsys, "--db", url, "prune", "--rows-after", f"{cutoff_days}d")
    assert pruned["calls_pruned"] == old == 3
    cutoff = clock.now() - timedelta(days=cutoff_days)
    wholly_before = {t for t in tables_before
                     if t != "calls_default" and partitions.next_start(datetime.strptime(t[7:], "%Y%m%d"),
                                                                       "month") <= cutoff}
    assert len(wholly_before) >= 4  # (from 200 days back: May to August)
    assert tables(url) == tables_before - wholly_before  # dropped, not emptied; the month of the cutoff kept
    assert js(capsys, "--db", url, "stats", "--since", "400d")["totals"]["calls"] == stats["calls"] + 1
    start_writer(f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "spool3", [chat(1)])
    code, _, err = run(capsys, "--db", f"sqlite:///{tmp_path / 'x.db'}", "migrate", "--partition", "month")
    assert code == 2 and "PostgreSQL" in err


def test_a_view_of_another_schema_stops_the_conversion_and_nothing_changes(tmp_path, capsys):
    """A view in another schema reading calls: `velvet migrate --partition` refuses (DROP TABLE … CASCADE took it
    along unseen), and the database is as it was: calls not partitioned, the views there, every row."""
    url = fresh_pg_url()
    start_writer(url, tmp_path / "spool", [at(1, 1), at(0, 2)])
    ns = url.split("search_path%3D")[1]
    db = open_db(url)
    db.execute_sql(f'CREATE SCHEMA "{ns}_mine"')
    db.execute_sql(f'CREATE VIEW "{ns}_mine".spend AS SELECT model, sum(cost_usd) AS usd FROM "{ns}".calls '
                   "GROUP BY model")
    code, _, err = run(capsys, "--db", url, "migrate", "--partition", "month")
    assert code != 0 and "depend" in err, err
    assert partitions.partitioned(db) == []
    assert db.execute_sql(f'SELECT count(*) FROM "{ns}_mine".spend').fetchone() == (1,)
    assert db.execute_sql("SELECT count(*) FROM calls").fetchone() == (2,)
    assert db.execute_sql("SELECT count(*) FROM batch_summary").fetchone() == (0,)  # velvet's views kept
    db.execute_sql(f'DROP SCHEMA "{ns}_mine" CASCADE')
    db.close()


def test_periods_ahead_and_the_default_partition(tmp_path, monkeypatch):
    monkeypatch.setenv(partitions.ENV, "day")
    url = fresh_pg_url()
    start_writer(url, tmp_path / "spool", [at(-10, 1), at(0, 2)])  # one call ten days ahead: no partition yet
    assert where(url).get("calls_default") == 1
    db = open_db(url)
    try:
        later = clock.now() + timedelta(days=10)
        made = partitions.ensure(db, later)
        assert f"calls_p{later:%Y%m%d}" in made
    finally:
        db.close()
    placed = where(url)
    assert placed.get("calls_default", 0) == 0 and placed[f"calls_p{later:%Y%m%d}"] == 1


def test_mitmdump_makes_a_new_database_partitioned(tmp_path, monkeypatch, standin):
    url = fresh_pg_url()
    proxy = Proxy(url, standin.url, tmp_path, extra=["--set", "velvet_pg_partitions=week"]).start()
    try:
        client = proxy.client(monkeypatch)
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        wait_for(lambda: sum(where(url).values()) == 3, what="the calls")
    finally:
        assert proxy.stop() == 0
    week = partitions.start_of(datetime.now(UTC), "week")
    assert where(url) == {f"calls_p{week:%Y%m%d}": 3}
    assert q(url, "SELECT value FROM velvet_meta WHERE key = 'calls_partitions'")[0]["value"] == "week"


# -- the batch tables ----------------------------------------------------------------------------------------

def batch(db, n: int, *, uploaded: datetime, created: datetime | None, ended: datetime | None,
          downloaded: datetime | None, lines: int = 6) -> dict[str, int]:
    """One batch's operations through the store, at the times given: its input file uploaded, the batch created
    (None: the file is never used), ended (None: still running) and its output downloaded."""
    from velvet_core.storage.ops import BatchSeen, FileSeen, InputDone, OutputDone, RequestLines, ResultLines
    from velvet_core.storage.store import Store

    store = Store(db)
    fin, fout, bid = f"file-in-{n}", f"file-out-{n}", f"batch_{n}"
    store.apply([FileSeen({"id": fin, "purpose": "batch", "created_at": uploaded, "first_seen_at": uploaded,
                           "updated_at": uploaded}),
                 RequestLines([{"file_id": fin, "line_no": i, "custom_id": f"r-{i}", "method": "POST",
                                "url": "/v1/chat/completions", "model": "gpt-4o-mini", "body": '{"n": 1}'}
                               for i in range(1, lines + 1)]), InputDone(fin)])
    if created is None:
        return {"requests": lines, "results": 0}
    base = {"id": bid, "endpoint": "/v1/chat/completions", "model": "gpt-4o-mini", "completion_window": "24h",
            "input_file_id": fin, "created_at": created}
    store.apply([BatchSeen({**base, "status": "in_progress", "in_progress_at": created}, created, "create")])
    if ended is None:
        return {"requests": lines, "results": 0}
    store.apply([BatchSeen({**base, "status": "completed", "in_progress_at": created, "completed_at": ended,
                            "output_file_id": fout, "request_total": lines, "request_completed": lines,
                            "request_failed": 0}, ended, "retrieve")])
    assert downloaded is not None
    results = [{"file_id": fout, "line_no": i, "custom_id": f"r-{i}", "status_code": 200, "model": "gpt-4o-mini",
                "input_tokens": 10, "output_tokens": 2, "body": '{"ok": true}', "seen_at": downloaded}
               for i in range(1, lines + 1)]
    store.apply([ResultLines(results), OutputDone(fout)])
    store.apply([ResultLines(results)])  # (a download read twice, hours later: the same lines, once)
    return {"requests": lines, "results": lines}


def lines_of(url: str) -> dict[str, dict[str, int]]:
    """Lines per batch (or file, for lines of no batch) per table."""
    out: dict[str, dict[str, int]] = {}
    for table in ("batch_requests", "batch_results"):
        for r in q(url, f"SELECT COALESCE(batch_id, file_id) AS b, count(*) AS n FROM {table} GROUP BY 1"):
            out.setdefault(r["b"], {"requests": 0, "results": 0})[table[6:]] = r["n"]
    return out


def line_tables(url: str, table: str) -> dict[str, int]:
    return {r["p"]: r["n"] for r in q(url, f"SELECT tableoid::regclass::text AS p, count(*) AS n FROM {table} "
                                           "GROUP BY 1")}


def test_batch_lines_are_partitioned_stored_once_and_pruned_a_batch_whole(monkeypatch, capsys):
    monkeypatch.setenv(partitions.ENV, "day")
    url = fresh_pg_url()
    now = clock.now()
    day = lambda n: now - timedelta(days=n)  # noqa: E731
    db = open_db(url)
    try:
        assert set(partitions.partitioned(db)) == {"calls", "batch_requests", "batch_results"}
        partitions.ensure(db, now, since=day(120))  # (a proxy running since then made them day by day)
        want = {
            # ended long ago: pruned; its input lines share a day with b's, its results have a day of their own
            "batch_1": batch(db, 1, uploaded=day(100), created=day(100), ended=day(99), downloaded=day(98)),
            # its input uploaded on the same day, but it ran lately: kept whole, and so is that day's partition
            "batch_2": batch(db, 2, uploaded=day(100), created=day(3), ended=day(2), downloaded=day(2)),
            "batch_3": batch(db, 3, uploaded=day(90), created=day(90), ended=None, downloaded=None),  # running
            "file-in-4": batch(db, 4, uploaded=day(80), created=None, ended=None, downloaded=None),  # never used
            "batch_5": batch(db, 5, uploaded=day(1), created=day(1), ended=day(1), downloaded=day(0)),
        }
        assert lines_of(url) == want  # every line once, though the downloads were read twice
        placed = line_tables(url, "batch_results")  # (an output file is first seen when its batch names it)
        assert "batch_results_default" not in placed and placed[f"batch_results_p{day(99):%Y%m%d}"] == 6
        # a line stored again later (a journal replayed, velvet sync) meets the one there: its file's time
        from velvet_core.storage.ops import InputDone, RequestLines
        from velvet_core.storage.store import Store

        Store(db).apply([RequestLines([{"file_id": "file-in-1", "line_no": 2, "custom_id": "r-2"},
                                       {"file_id": "file-in-1", "line_no": 7, "custom_id": "r-7"}]),
                         InputDone("file-in-1")])
        assert lines_of(url)["batch_1"]["requests"] == 7
        want["batch_1"]["requests"] = 7
        assert q(url, "SELECT count(DISTINCT file_at) AS n FROM batch_requests WHERE file_id = 'file-in-1'")[0][
            "n"] == 1
    finally:
        db.close()
    before = {"stats": js(capsys, "--db", url, "stats", "--since", "400d")["totals"],
              "batches": js(capsys, "--db", url, "batches", "--since", "400d")}
    results_before = line_tables(url, "batch_results")
    out = js(capsys, "--db", url, "prune", "--rows-after", "30d")
    assert out["batches_pruned"] == 1 and out["lines_pruned"] == 7 + 6 + 6  # batch_1, and the unused file's lines
    del want["batch_1"], want["file-in-4"]
    assert lines_of(url) == want  # batch_2 and batch_3 whole
    after_requests, after_results = line_tables(url, "batch_requests"), line_tables(url, "batch_results")
    assert f"batch_results_p{day(99):%Y%m%d}" in results_before
    assert f"batch_results_p{day(99):%Y%m%d}" not in after_results  # dropped whole
    assert f"batch_requests_p{day(80):%Y%m%d}" not in after_requests  # the unused file's day, dropped whole
    assert after_requests[f"batch_requests_p{day(100):%Y%m%d}"] == 6  # batch_2's day stays: batch_1's lines went
    assert after_requests[f"batch_requests_p{day(90):%Y%m%d}"] == 6  # the running batch's
    assert js(capsys, "--db", url, "stats", "--since", "400d")["totals"] == before["stats"]
    assert js(capsys, "--db", url, "batches", "--since", "400d") == before["batches"]  # batch_counts keep them


def test_migrate_partitions_the_lines_of_a_database_of_the_previous_schema(tmp_path, capsys):
    url = fresh_pg_url()
    db = open_db(url)
    try:
        now = clock.now()
        for n, days in enumerate((70, 40, 10, 0), 1):
            t = now - timedelta(days=days)
            batch(db, n, uploaded=t, created=t, ended=t + timedelta(hours=1), downloaded=t + timedelta(hours=2))
        # as the previous schema stored them: no file_at, and one file with no files row
        db.execute_sql("UPDATE batch_requests SET file_at = NULL")
        db.execute_sql("UPDATE batch_results SET file_at = NULL")
        db.execute_sql("DELETE FROM files WHERE id = 'file-out-2'")
    finally:
        db.close()
    ids = {t: q(url, f"SELECT id, file_id, line_no FROM {t} ORDER BY id") for t in ("batch_requests",
                                                                                  "batch_results")}
    shown = js(capsys, "--db", url, "batch", "batch_2")
    out = js(capsys, "--db", url, "migrate", "--partition", "week")
    assert out["partitioned"]["tables"] == ["calls", "batch_results", "batch_requests"]
    assert out["partitioned"]["lines"] == 4 * 12
    for t, rows in ids.items():
        assert q(url, f"SELECT id, file_id, line_no FROM {t} ORDER BY id") == rows  # ids kept
        assert line_tables(url, t).get(f"{t}_default", 0) == 0  # every line in its week
        assert len(line_tables(url, t)) >= 4
    assert q(url, "SELECT count(*) AS n FROM batch_results WHERE file_at IS NULL")[0]["n"] == 0
    assert js(capsys, "--db", url, "batch", "batch_2") == shown  # the views made again read the same
    # lines stored again after the conversion are still stored once (their file's time found), and new ones go on
    db = open_db(url)
    try:
        from velvet_core.storage.ops import ResultLines
        from velvet_core.storage.store import Store

        Store(db).apply([ResultLines([{"file_id": "file-out-2", "line_no": 1, "custom_id": "r-1",
                                       "seen_at": clock.now()}])])
        batch(db, 9, uploaded=clock.now(), created=clock.now(), ended=clock.now(), downloaded=clock.now())
    finally:
        db.close()
    assert lines_of(url)["batch_2"] == {"requests": 6, "results": 6}
    assert lines_of(url)["batch_9"] == {"requests": 6, "results": 6}
    code, _, err = run(capsys, "--db", url, "migrate", "--partition", "week")
    assert code == 2 and "already partitioned" in err


def test_an_upload_in_parts_becomes_a_file_whose_lines_share_its_time(monkeypatch):
    """Lines of upload parts are stored before their file exists; at completion they take the file's time (moved
    to its partition), so the file's lines stored again later meet them."""
    from velvet_core.storage.batch_store import add_requests
    from velvet_core.storage.ops import PartSeen, RequestLines, UploadCompleted, UploadSeen
    from velvet_core.storage.store import Store

    monkeypatch.setenv(partitions.ENV, "day")
    url = fresh_pg_url()
    now = clock.now()
    db = open_db(url)
    try:
        partitions.ensure(db, now, since=now - timedelta(days=5))
        store = Store(db)
        store.apply([UploadSeen({"id": "upload_1", "status": "pending", "filename": "in.jsonl",
                                 "updated_at": now - timedelta(days=3)})])
        for n, days in ((1, 3), (2, 2)):  # two parts sent a day apart, three whole lines each
            store.apply([RequestLines([{"upload_part_id": f"part_{n}", "part_line_no": i, "custom_id": f"p{n}-{i}",
                                        "seen_at": now - timedelta(days=days)} for i in range(1, 4)]),
                         PartSeen(f"part_{n}", "upload_1", head=b"", tail=b"", lines=3, bytes=300,
                                  seen_at=now - timedelta(days=days))])
        assert len({r["p"] for r in q(url, "SELECT tableoid::regclass::text AS p FROM batch_requests")}) == 2
        store.apply([UploadCompleted("upload_1", ["part_1", "part_2"], {"id": "file-up", "purpose": "batch",
                                                                         "first_seen_at": now})])
        got = q(url, "SELECT file_id, line_no, file_at, tableoid::regclass::text AS p FROM batch_requests "
                     "ORDER BY line_no")
        assert len(got) == 8  # (each part's head is a line of its own: stitched at completion)
        assert {r["file_id"] for r in got} == {"file-up"} and len({r["file_at"] for r in got}) == 1
        assert {r["p"] for r in got} == {f"batch_requests_p{now:%Y%m%d}"}
        with models_use(db):
            add_requests("file-up", [{"line_no": r["line_no"], "custom_id": "again"} for r in got])  # (sync)
        assert q(url, "SELECT count(*) AS n FROM batch_requests")[0]["n"] == 8
    finally:
        db.close()


def models_use(db):
    from velvet_core.storage import models

    return models.use(db)


def test_migrate_partitions_a_released_database_upgraded(capsys):
    """A database velvet made at schema v2 (lines with no file_at, no files rows), upgraded, then partitioned: the
    lines keep their ids and links, in a period's partition (their batch's time), and the views read them."""
    from test_migrations import insert_lines, load_released
    from velvet_core.storage.database import connect
    from velvet_core.storage.migrations import SCHEMA_VERSION, migrate

    url = fresh_pg_url()
    db = connect(url)  # (no migration: the released schema first)
    try:
        load_released(db, 2)
        insert_lines(db)
        db.execute_sql("UPDATE batches SET created_at = '2026-11-24 09:00', completed_at = '2026-11-24 11:00'")
        assert migrate(db) == SCHEMA_VERSION
    finally:
        db.close()
    before = q(url, "SELECT r.id, r.custom_id, x.request_row_id FROM batch_requests r JOIN batch_results x ON "
                    "x.request_row_id = r.id")
    shown = js(capsys, "--db", url, "lines", "batch_1")
    out = js(capsys, "--db", url, "migrate", "--partition", "month")
    assert out["partitioned"]["lines"] == 2
    assert q(url, "SELECT r.id, r.custom_id, x.request_row_id FROM batch_requests r JOIN batch_results x ON "
                  "x.request_row_id = r.id") == before
    assert line_tables(url, "batch_requests") == {"batch_requests_p20261101": 1}  # (its batch's creation)
    assert line_tables(url, "batch_results") == {"batch_results_p20261101": 1}
    assert js(capsys, "--db", url, "lines", "batch_1") == shown
