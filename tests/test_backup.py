"""``velvet backup FILE`` while a real mitmdump writes (issue 24 item 13c): SQLite's online backup API gives
a consistent private copy; PostgreSQL is told to use pg_dump."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import orjson
from support.rig import wait_for
from velvet_core.storage.database import sqlite_path

VELVET = Path(sys.executable).with_name("velvet")
MSG = [{"role": "user", "content": "back me up"}]


def velvet(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VELVET), "--db", url, *args], capture_output=True, text=True, timeout=120)


def calls_in(path: Path) -> int:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT count(*) FROM calls").fetchone()[0]


def test_backup_while_the_proxy_writes(proxy, monkeypatch, tmp_path):
    client = proxy.client(monkeypatch)
    stop = threading.Event()
    sent = []

    def traffic() -> None:
        while not stop.is_set():
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
            sent.append(1)

    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    out = tmp_path / "copy.db"
    try:
        if proxy.db_url.startswith("postgresql"):
            r = velvet(proxy.db_url, "backup", str(out))
            assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
            assert "pg_dump" in r.stderr and not out.exists()
            return
        live = Path(sqlite_path(proxy.db_url))
        wait_for(lambda: calls_in(live) > 0, timeout=60, what="a first call row")
        wait_for(lambda: len(sent) >= 3, timeout=60, what="traffic")
        r = velvet(proxy.db_url, "backup", str(out), "--json")
        n_sent = len(sent)
    finally:
        stop.set()
        t.join(60)
    assert r.returncode == 0, r.stderr
    got = orjson.loads(r.stdout)
    assert set(got) == {"path", "bytes", "pages", "seconds"} and got["path"] == str(out.resolve())
    assert got["bytes"] == out.stat().st_size and got["pages"] * 16384 == got["bytes"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # it holds prompts
    assert not Path(f"{out}-wal").exists()  # one self-contained file
    with sqlite3.connect(out) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        n = c.execute("SELECT count(*) FROM calls").fetchone()[0]
        assert c.execute("SELECT count(*) FROM calls WHERE request_body IS NULL").fetchone()[0] == 0
    assert 1 <= n <= n_sent + 1 + 1  # the rows written when it was taken (at most one call in flight)
    again = velvet(proxy.db_url, "backup", str(out))  # never overwrites
    assert again.returncode == 2 and "exists" in again.stderr and calls_in(out) == n
    r = velvet(proxy.db_url, "backup", str(tmp_path / "people.db"))
    assert r.returncode == 0 and r.stdout.startswith("backed up ") and "pages" in r.stdout
