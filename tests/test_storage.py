"""Storage and the writer thread on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from support.helpers import snapshot
from support.pg import fresh_pg_url
from support.rig import bound, free_port
from velvet_core.parsing.classify import classify
from velvet_core.storage import models
from velvet_core.storage.database import SCHEMA_VERSION, DatabaseURLError, check_url, open_db, schema_version
from velvet_core.storage.ops import CallRow
from velvet_core.storage.snapshot import CallSnapshot
from velvet_core.storage.sql import rows
from velvet_core.storage.urls import pg_params, url_params
from velvet_core.writer.spool import Unprocessed
from velvet_core.writer.writer import Writer


def call_row(i: int) -> dict:
    return {"flow_id": f"f{i}", "method": "POST", "host": "api.openai.com",
            "path": "/v1/chat/completions", "endpoint": "chat.completions", "action": "create",
            "started_at": "2026-11-24 10:00:00", "model": "gpt-4o-mini", "input_tokens": i}


def snap(i: int) -> CallSnapshot:
    return snapshot(flow_id=f"f{i}", started_at=1.0 + i)


def call_op(s: CallSnapshot | int) -> list:
    """A stand-in for the processor: the flow's call row."""
    i = s if isinstance(s, int) else int(s.flow_id[1:])
    return [CallRow(call_row(i))]


def test_schema_is_created_once_with_version(db_url):
    db = open_db(db_url)
    assert schema_version(db) == SCHEMA_VERSION
    db.close()
    db = open_db(db_url)  # a second start migrates nothing and keeps the version
    assert schema_version(db) == SCHEMA_VERSION
    assert {"calls", "batches", "batch_requests", "batch_results", "files", "velvet_meta"} <= set(
        db.get_tables())
    idx = {i.name for i in db.get_indexes("calls")}
    assert any("started_at" in n for n in idx) and any("model" in n for n in idx)
    db.close()


def test_concurrent_migrations(db_url):
    errors = []

    def go():
        try:
            open_db(db_url).close()
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def refused(url: str, why: str) -> subprocess.CompletedProcess[str]:
    """``velvet --db URL stats --json``, which must refuse the URL in one line saying ``why``."""
    out = subprocess.run([str(Path(sys.executable).with_name("velvet")), "--db", url, "stats", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and why in out.stderr and "Traceback" not in out.stderr
    return out


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite://", "postgresql://host", "nonsense",
                                 "sqlite:///v.db?mode=ro", "sqlite:////tmp/v.db#x", "postgresql://u@[::1/v",
                                 "postgresql://u@h:99999/v", "postgresql://u@h:-1/v"])
def test_bad_urls(url):
    with pytest.raises(DatabaseURLError):
        check_url(url)


def test_a_sqlite_file_whose_name_holds_a_question_mark(tmp_path):
    """Written %3F in the URL (a bare '?' starts the parameters a SQLite URL refuses): the file of that name."""
    db = open_db(f"sqlite:///{tmp_path}/odd%3Fname%23.db")
    db.close()
    assert (tmp_path / "odd?name#.db").exists()
    # a command refuses parameters too, in one line, even on a file that is there (?mode=ro was dropped)
    out = refused(f"sqlite:///{tmp_path}/odd%3Fname%23.db?mode=ro", "a SQLite URL takes no parameters")
    assert out.stdout == ""


def test_writer_writes_everything(db_url, tmp_path):
    w = Writer(db_url, call_op, spool_dir=tmp_path / "spool", batch_size=37)
    w.start()
    for i in range(1000):
        w.submit(snap(i))
    assert w.stop(timeout=60)
    with bound(db_url):
        assert models.Call.select().count() == 1000
        assert sum(r.input_tokens for r in models.Call.select()) == sum(range(1000))


def test_writer_survives_bad_records(db_url, tmp_path, caplog):
    """A bug while processing one flow costs that flow only (the processor's own fallback row aside)."""
    def process(s):
        i = int(s.flow_id[1:])
        if i == 3:
            raise ValueError("boom")
        yield from call_op(i)

    w = Writer(db_url, process, spool_dir=tmp_path)
    w.start()
    for i in range(6):
        w.submit(snap(i))
    assert w.stop(30)
    with bound(db_url):
        assert sorted(r.flow_id for r in models.Call.select()) == ["f0", "f1", "f2", "f4", "f5"]
    assert "boom" in caplog.text


def test_unreachable_db_spools_and_replays(tmp_path):
    """A PostgreSQL server that is not there: at shutdown the rows go to the spool file."""
    port = free_port()  # nothing listens here
    url = f"postgresql://velvet@127.0.0.1:{port}/nowhere?connect_timeout=1"
    spool = tmp_path / "spool"
    w = Writer(url, call_op, spool_dir=spool)
    w.start()
    for i in range(25):
        w.submit(snap(i))
    time.sleep(0.5)
    assert not w.stop(timeout=1.0)  # could not write: spooled
    files = list(spool.glob("spool-*.pkl"))
    assert len(files) == 1 and files[0].stat().st_size > 0


def test_spool_replay_into_real_db(db_url, tmp_path):
    """Operations spooled while the DB was down land once the next writer reaches it."""
    spool = tmp_path / "spool"
    down = Writer(db_url, call_op, spool_dir=spool)
    # simulate an outage: spill directly as the writer does when it cannot connect
    down.spool.write([op for i in range(30) for op in call_op(i)])
    down.spool.write([Unprocessed(snap(99))])
    # and a file written by velvet 0.1, whose entries were (kind, payload) tuples
    down.spool.write([("call", call_row(101)), ("raw", ("call", snap(102)))])
    w = Writer(db_url, call_op, spool_dir=spool)
    w.start()
    w.submit(snap(100))
    assert w.stop(30)
    with bound(db_url):
        assert models.Call.select().count() == 34
    assert not list(spool.glob("spool-*"))


def test_db_outage_then_recovery(tmp_path):
    """A SQLite database whose directory appears only later: the writer retries and catches up."""
    target = tmp_path / "later"
    target.mkdir()
    target.chmod(0o500)  # cannot create the db file yet (not as root: see skip below)
    url = f"sqlite:///{target / 'v.db'}"
    import os
    if os.geteuid() == 0:
        target.chmod(0o700)
        # as root, permissions do not stop us: use a file in place of the directory instead
        target.rmdir()
        target.write_text("not a directory")
    w = Writer(url, call_op, spool_dir=tmp_path / "spool")
    w.start()
    for i in range(10):
        w.submit(snap(i))
    time.sleep(1.0)
    assert w.failures == 0 and w.written == 0  # could not even connect
    if target.is_file():
        target.unlink()
    target.mkdir(exist_ok=True)
    target.chmod(0o700)
    assert w.stop(timeout=20)
    with bound(url):
        assert models.Call.select().count() == 10


def test_classify_is_pickleable_for_spool():
    import pickle
    r = classify("GET", "/v1/files/file-1/content")
    assert pickle.loads(pickle.dumps(r)) == r


def test_sqlite_writer_connections_are_set_for_bulk_writes(tmp_path):
    """WAL, normal syncs, and a checkpoint every 8,192 pages rather than SQLite's 1,000: fewer fsyncs
    while a big batch file is written. Read-only connections (the velvet command) change nothing."""
    from velvet_core.storage.database import connect

    db = connect(f"sqlite:///{tmp_path / 'v.db'}")
    db.connect()
    assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert db.execute_sql("PRAGMA wal_autocheckpoint").fetchone()[0] == 8192
    db.close()


def test_a_new_sqlite_database_gets_16k_pages_and_an_old_one_keeps_its_own(tmp_path):
    """A batch line of a few kB fits a 16 kB page (with 4 kB pages it spilled onto overflow pages); a database
    created before keeps its 4 kB pages, and works as before."""
    import sqlite3

    from velvet_core.storage.database import open_db

    new = open_db(f"sqlite:///{tmp_path / 'new.db'}")
    assert new.execute_sql("PRAGMA page_size").fetchone()[0] == 16384
    new.close()
    old = tmp_path / "old.db"
    c = sqlite3.connect(old)
    c.execute("PRAGMA page_size=4096")
    c.execute("CREATE TABLE made_before (x)")  # (the first table fixes the page size)
    c.commit()
    c.close()
    db = open_db(f"sqlite:///{old}")
    assert db.execute_sql("PRAGMA page_size").fetchone()[0] == 4096
    from velvet_core.storage.store import Store

    with models.use(db):
        Store(db).apply(call_op(7))
        assert models.Call.get(models.Call.flow_id == "f7").input_tokens == 7
    db.close()
    db = open_db(f"sqlite:///{old}")  # and again: nothing changes on a second start
    assert db.execute_sql("PRAGMA page_size").fetchone()[0] == 4096
    db.close()


def test_first_opens_of_a_new_sqlite_database_at_once(tmp_path):
    """Four writers opening a new SQLite file at the same moment, 30 times: none fails ("database is locked" came
    from two connections switching a new file to WAL at once, 1 start in 10 on a busy machine)."""
    errors: list[Exception] = []
    for n in range(30):
        url = f"sqlite:///{tmp_path / f'{n}.db'}"

        def go(url: str = url) -> None:
            try:
                open_db(url).close()
            except Exception as e:  # pragma: no cover - the assertion below reports it
                errors.append(e)

        threads = [threading.Thread(target=go) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_a_connect_timeout_joins_a_postgresql_url_unless_it_has_one():
    from velvet_core.storage.urls import with_connect_timeout

    assert with_connect_timeout("sqlite:////tmp/v.db", 3) == "sqlite:////tmp/v.db"
    assert with_connect_timeout("postgresql://u:p%40ss@h:5/db", 3) == "postgresql://u:p%40ss@h:5/db?connect_timeout=3"
    assert with_connect_timeout("postgresql://h/db?sslmode=require", 3) == \
        "postgresql://h/db?sslmode=require&connect_timeout=3"
    assert with_connect_timeout("postgresql://h/db?connect_timeout=9", 3) == "postgresql://h/db?connect_timeout=9"


def test_a_repeated_url_parameter_is_never_dropped_quietly():
    """libpq keeps the last of a repeated parameter: velvet joins repeated ``options`` and refuses any other."""
    assert url_params("postgresql://h/db?options=-csearch_path%3Dx&sslmode=require&options=-c%20jit%3Doff") == \
        {"options": "-csearch_path=x -c jit=off", "sslmode": "require"}
    for url in ("postgresql://h/db?sslmode=disable&sslmode=require", "postgres://h/db?host=a&host=b"):
        with pytest.raises(DatabaseURLError, match="given twice"):
            check_url(url)
    with pytest.raises(DatabaseURLError) as e:  # (the message names the parameter, never a password's value)
        check_url("postgresql://h/db?password=hunter2secret&password=other2secret")
    assert "'password' is given twice" in str(e.value) and "secret" not in str(e.value)


def test_two_options_parameters_both_apply():
    """A URL with two ``options`` (a schema, then a setting): velvet's tables go to that schema, and the setting
    holds too; the CLI refuses a URL with another parameter repeated, in one line."""
    url = fresh_pg_url() + "&options=" + quote("-c statement_timeout=4321")
    db = open_db(url)
    try:
        assert rows(db, "SHOW statement_timeout")[0]["statement_timeout"] == "4321ms"
        schema = url.split("search_path%3D")[1].split("&")[0]
        assert rows(db, "SELECT current_schema() AS s")[0]["s"] == schema
        assert rows(db, "SELECT count(*) AS n FROM information_schema.tables WHERE table_schema = %s "
                        "AND table_name = 'calls'", (schema,))[0]["n"] == 1
    finally:
        db.close()
    bad = url + "&sslmode=disable&sslmode=prefer"
    refused(bad, "'sslmode' is given twice")


def test_a_postgresql_urls_keywords_as_libpq_reads_them():
    """Host, port, user and database from the URL's parts or its query (a Unix socket's folder, several hosts),
    never from both: a keyword given twice is refused naming it, where libpq would take one of the two."""
    assert pg_params("postgresql://u:p%40ss@db.example:5433/velvet?sslmode=require") == {
        "dbname": "velvet", "user": "u", "password": "p@ss", "host": "db.example", "port": 5433,
        "sslmode": "require"}
    assert pg_params("postgresql:///v?host=/run/postgresql") == {"dbname": "v", "host": "/run/postgresql"}
    assert pg_params("postgresql://%2FRun%2FPG/velvet")["host"] == "/Run/PG"  # (decoded, its case kept)
    assert pg_params("postgresql://u@[::1]:5/v")["host"] == "::1"
    assert pg_params("postgresql://u@/v?host=h1,h2&port=5432,5433") == {
        "dbname": "v", "user": "u", "host": "h1,h2", "port": "5432,5433"}
    assert pg_params("postgresql://h/?dbname=velvet")["dbname"] == "velvet"
    for url, name in [("postgresql://u@h/v?user=x", "user"), ("postgresql://u:p@h/v?password=q", "password"),
                      ("postgresql://h/v?host=other", "host"), ("postgresql://h:5/v?port=6", "port"),
                      ("postgresql://h/v?dbname=postgres", "dbname")]:
        with pytest.raises(DatabaseURLError, match=f"'{name}' is given twice, in the URL and in its query"):
            check_url(url)
    for url, why in [("postgresql://h/", "needs a database name"), ("postgresql://h1:5,h2:6/v", "several hosts"),
                     ("postgresql://h:port/v", "not a number"), ("postgresql://h:70000/v", "0 to 65535")]:
        with pytest.raises(DatabaseURLError, match=why):
            check_url(url)


def test_a_postgresql_url_reaches_the_server_by_its_socket_and_by_several_hosts():
    """libpq's ways to name the server in a URL, against the real one: its Unix socket's folder in the query or
    percent-encoded in the URL's host, and a list of hosts in the query (the first one down)."""
    url = fresh_pg_url()
    parts = urlsplit(url)
    db = open_db(url)
    try:
        folder = rows(db, "SHOW unix_socket_directories")[0]["unix_socket_directories"].split(",")[0].strip()
    finally:
        db.close()
    assert folder.startswith("/")
    user, port, name, query = parts.username, parts.port, parts.path, parts.query
    for other in (f"postgresql://{user}@{name}?host={quote(folder, safe='')}&port={port}&{query}",
                  f"postgresql://{user}@{quote(folder, safe='')}:{port}{name}?{query}",
                  f"postgresql://{user}@{name}?host=127.0.0.9,{parts.hostname}&port={port},{port}&{query}"
                  "&connect_timeout=3"):
        db = open_db(other)
        try:
            assert rows(db, "SELECT count(*) AS n FROM calls")[0]["n"] == 0
            addr = rows(db, "SELECT inet_server_addr() AS a")[0]["a"]
            assert (addr is None) == ("127.0.0.9" not in other)  # (None: over the socket)
        finally:
            db.close()
