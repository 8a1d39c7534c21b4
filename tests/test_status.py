"""query/status.py: velvet status from the database and the spool."""

from __future__ import annotations

import json

from support.helpers import chat
from support.helpers import start_writer as run
from support.rig import free_port


def test_velvet_status_reads_the_database_and_the_spool(db_url, tmp_path, capsys):
    from velvet_core.cli import main

    spool = tmp_path / "spool"
    w = run(db_url, spool, [chat(i) for i in range(4)])
    assert main(["--db", db_url, "status", "--spool-dir", str(spool), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert set(s) == {"proxies", "database_error", "spool_dir", "spooled_files", "dead_letters",
                      "dead_letter_file", "quarantined", "world_readable"}
    assert s["world_readable"] == []  # velvet made all of them (0600, 0700)
    (p,) = s["proxies"]
    assert p["proxy"] == w.health.proxy and p["source"] == "both" and p["written"] >= 4
    assert p["running"] is False and p["stopped_at"] and p["failing_since"] is None
    assert main(["--db", db_url, "status", "--spool-dir", str(spool)]) == 0
    assert w.health.proxy in capsys.readouterr().out

    # the database gone: the spool's status file still speaks, and the exit code says something is wrong
    nowhere = f"postgresql://velvet:s3cret@127.0.0.1:{free_port()}/x?connect_timeout=1"
    assert main(["--db", nowhere, "status", "--spool-dir", str(spool), "--json"]) == 1
    out = capsys.readouterr()
    s = json.loads(out.out)
    assert s["database_error"] and [p["source"] for p in s["proxies"]] == ["file"]
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
