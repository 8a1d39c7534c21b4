"""Read-only means no write of any kind: `velvet sql` and `velvet replay --sql` tried as an attacker would, on
both backends, through the real command. Each attack must change no row and create no file."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from support import attacks
from support.helpers import run
from support.pg import fresh_pg_url, reader_url
from velvet_core.storage.database import open_db
from velvet_core.storage.ops import CallRow
from velvet_core.storage.store import Store


def _fill(url: str) -> None:
    db = open_db(url)
    Store(db).apply([CallRow({"flow_id": f"f{i}", "method": "POST", "host": "api.openai.com", "path": "/v1/x",
                              "endpoint": "chat.completions", "action": "create",
                              "started_at": datetime(2026, 11, 24, 10), "model": "gpt-4o-mini"})
                     for i in range(3)])
    db.close()


def _count(url: str) -> tuple[int, list[str]]:
    db = open_db(url)
    n = db.execute_sql("SELECT count(*) FROM calls").fetchone()[0]
    models = sorted(str(r[0]) for r in db.execute_sql("SELECT model FROM calls").fetchall())
    db.close()
    return n, models


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path) -> tuple[str, str]:
    """(url to attack through, url of the owner) of a database holding three calls."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'velvet.db'}"
        _fill(url)
        return url, url
    url = fresh_pg_url()
    _fill(url)
    return reader_url(url), url


def test_no_statement_writes_anything(target, tmp_path, capsys, request):
    url, owner = target
    pg = url.startswith("postgresql")
    spot = tmp_path / "spot"
    before = _count(owner)
    got = attacks.probe(url, spot, lambda: _count(owner) != before,
                        lambda sql: run(capsys, "sql", "--db", url, sql)[0])
    assert got.tried == len(attacks.ATTACKS) + len(attacks.PG_ATTACKS if pg else attacks.SQLITE_ATTACKS)
    assert got.written == [] and got.files == []
    # the session a statement ran in kept nothing: a later write is refused as the first one was
    code, _, _ = run(capsys, "sql", "--db", url, "DELETE FROM calls")
    assert code == 1 and _count(owner) == before


def test_reading_still_works(target, capsys):
    url, _ = target
    code, out, err = run(capsys, "sql", "--db", url, "SELECT count(*) AS n, max(flow_id) AS last FROM calls "
                                                     "WHERE path LIKE '%/x%'", "--json")
    assert code == 0, err
    assert '"n": 3' in out


def test_a_statement_that_runs_too_long_is_stopped(target, capsys):
    url, _ = target
    slow = ("SELECT pg_sleep(30)" if url.startswith("postgresql") else
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
    t = time.monotonic()
    code, _, err = run(capsys, "sql", "--db", url, "--timeout", "0.5", slow)
    assert code == 1 and time.monotonic() - t < 10, err


def test_a_powerful_role_is_refused_unless_allowed(capsys):
    url = fresh_pg_url()  # the test server's role is a superuser
    _fill(url)
    code, _, err = run(capsys, "sql", "--db", url, "SELECT 1")
    assert code == 1 and "superuser" in err and "CREATE ROLE" in err and "--allow-powerful-role" in err
    code, out, err = run(capsys, "sql", "--db", url, "--allow-powerful-role", "SELECT count(*) AS n FROM calls")
    assert code == 0 and "3" in out
    # the read-only transaction still holds with the override
    code, _, err = run(capsys, "sql", "--db", url, "--allow-powerful-role", "DELETE FROM calls")
    assert code == 1 and "read-only" in err and _count(url)[0] == 3


def test_replay_sql_goes_through_the_same_door(target, capsys, tmp_path):
    url, owner = target
    before = _count(owner)
    for attack in ("DELETE FROM calls", "SELECT 1 AS request_body; DELETE FROM calls",
                   "WITH x AS (DELETE FROM calls RETURNING 1) SELECT * FROM x"):
        code, _, err = run(capsys, "replay", "--db", url, "--sql", attack, "--model", "gpt-4o", "--dry-run")
        assert code != 0 and _count(owner) == before, (attack, err)


def test_a_writable_connection_is_locked_for_the_statement_only(tmp_path):
    """A command may hold a writable connection (replay records its experiment): user SQL on it is read-only,
    and the connection writes again afterwards."""
    from velvet_core.storage import readonly

    url = f"sqlite:///{tmp_path / 'velvet.db'}"
    _fill(url)
    db = open_db(url)
    with pytest.raises(readonly.ReadOnlyError, match="read-only"), readonly.statement(db, "DELETE FROM calls"):
        pass
    with pytest.raises(readonly.ReadOnlyError), readonly.statement(db, f"VACUUM INTO '{tmp_path / 'x.db'}'"):
        pass
    with readonly.statement(db, "SELECT count(*) FROM calls") as cur:
        assert cur.fetchone()[0] == 3
    db.execute_sql("DELETE FROM calls WHERE flow_id = 'f0'")
    assert db.execute_sql("SELECT count(*) FROM calls").fetchone()[0] == 2 and not (tmp_path / "x.db").exists()
    db.close()
