"""query/status.py: velvet status from the database and the spool."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from support.helpers import chat
from support.helpers import run as cli
from support.helpers import start_writer as run
from support.pg import fresh_pg_url
from support.rig import Proxy, free_port, wait_for


def test_velvet_status_reads_the_database_and_the_spool(db_url, tmp_path, capsys):
    from velvet_core.cli import main

    spool = tmp_path / "spool"
    w = run(db_url, spool, [chat(i) for i in range(4)])
    assert main(["--db", db_url, "status", "--spool-dir", str(spool), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert set(s) == {"proxies", "database_error", "spool_dir", "spooled_files", "dead_letters",
                      "dead_letter_file", "quarantined", "world_readable", "spool_unsafe", "database"}
    assert set(s["database"]) == {"size_bytes", "oldest_call_at", "oldest_batch_at", "retention",
                                  "retention_last_run", "refresh"}
    d = s["database"]
    assert d["size_bytes"] > 0 and d["oldest_call_at"] and d["retention"] is None
    assert s["spool_unsafe"] is None
    assert s["world_readable"] == []  # velvet made all of them (0600, 0700)
    (p,) = s["proxies"]
    assert p["proxy"] == w.health.proxy and p["source"] == "both" and p["written"] >= 4
    assert p["running"] is False and p["stopped_at"] and p["failing_since"] is None
    assert main(["--db", db_url, "status", "--spool-dir", str(spool)]) == 0
    shown = capsys.readouterr().out
    assert w.health.proxy in shown and "retention: off" in shown

    # the database gone: the spool's status file still speaks, and the exit code says something is wrong
    nowhere = f"postgresql://velvet:s3cret@127.0.0.1:{free_port()}/x?connect_timeout=1"
    assert main(["--db", nowhere, "status", "--spool-dir", str(spool), "--json"]) == 1
    out = capsys.readouterr()
    s = json.loads(out.out)
    assert s["database_error"] and [p["source"] for p in s["proxies"]] == ["file"] and s["database"] is None
    assert "s3cret" not in out.out + out.err


async def test_velvet_status_command(tmp_path):
    from mitmproxy.test import taddons
    from velvet_core.addon import Velvet

    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_writer="thread",
                       velvet_db=f"sqlite:///{tmp_path / 'v.db'}", velvet_spool_dir=str(tmp_path / "spool"))
        v.running()
        assert v.status().startswith("velvet: writing; last write")
        v.done()
        assert v.status() == "velvet: not running"


def test_timestamps_of_every_kind_compare(tmp_path):
    """A status file says ``…Z``, a database row is naive, an API gives Unix seconds: one kind after reading."""
    from velvet_core import clock

    kinds = [clock.parse("2026-11-24T15:00:00Z"), clock.parse("2026-11-24T16:00:00+01:00"),
             clock.parse("2026-11-24 15:00:00"), clock.parse(datetime(2026, 11, 24, 15, tzinfo=UTC)),
             clock.from_epoch(datetime(2026, 11, 24, 15, tzinfo=UTC).timestamp())]
    assert len(set(kinds)) == 1 and all(k.tzinfo is None for k in kinds)
    assert clock.now() - kinds[0] > timedelta(0)


def test_status_of_a_file_and_a_row_of_the_same_proxy(sqlite_url, tmp_path):
    """The crash of 5 runs in 6: the proxy's status file (``…Z``) newer than its database row (naive)."""
    from velvet_core.query.status import status
    from velvet_core.storage.database import open_db

    db = open_db(sqlite_url)
    now = datetime.now(UTC).replace(tzinfo=None)
    db.execute_sql("INSERT INTO velvet_proxies (proxy, hostname, pid, started_at, updated_at, queue_depth, "
                   "pending, spooled, dead_lettered, written) "
                   "VALUES ('h:1:1', 'elsewhere', 1, ?, ?, 0, 0, 0, 0, 0)",
                   (now - timedelta(minutes=1), now - timedelta(seconds=5)))
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "status-x.json").write_text(
        f'{{"proxy": "h:1:1", "hostname": "elsewhere", "pid": 1, "updated_at": "{now:%Y-%m-%dT%H:%M:%S}Z"}}')
    (p,) = status(db, spool)["proxies"]
    assert p["running"] and p["source"] == "both"
    db.close()


def test_velvet_status_while_proxies_on_two_databases_run(standin, tmp_path, monkeypatch, capsys):
    """Default spool folders (one per database): each `velvet status` lists its own proxy only, every time."""
    monkeypatch.setenv("VELVET_HOME", str(tmp_path / "home"))
    urls = [f"sqlite:///{tmp_path / 'a.db'}", fresh_pg_url()]
    proxies = [Proxy(u, standin.url, tmp_path / f"p{i}", extra=["--set", "velvet_spool_dir="]).start()
               for i, u in enumerate(urls)]
    try:
        for p in proxies:
            p.client(monkeypatch).chat.completions.create(model="gpt-4o-mini",
                                                          messages=[{"role": "user", "content": "hi"}])
        def running(p: Proxy) -> list[str]:
            code, out, err = cli(capsys, "status", "--db", p.db_url, "--json")
            assert code == 0, err
            got = orjson.loads(out)
            assert Path(got["spool_dir"]).parent == tmp_path / "home" / "spool"
            return [x["proxy"] for x in got["proxies"] if x["running"]]

        for p in proxies:
            wait_for(lambda p=p: running(p), 15, "the proxy's status")
        seen = [set(), set()]
        for _ in range(10):
            for i, p in enumerate(proxies):
                names = running(p)
                assert len(names) == 1, names
                seen[i].update(names)
            time.sleep(0.3)
        assert len(seen[0]) == len(seen[1]) == 1 and not seen[0] & seen[1]
    finally:
        for p in proxies:
            p.stop()
