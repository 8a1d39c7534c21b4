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
