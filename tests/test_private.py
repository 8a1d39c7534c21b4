"""No secret stored, files private to their owner (issue 24, items 3 and 4).

Keys in URL queries (``?api-key=``, ``?key=``) and in gateway headers (``x-goog-api-key``...) never reach the
database, the journal, the spool, the status file, the logs, exports or the report; every file velvet writes is
0600 and every folder 0700 whatever the umask, and an existing one keeps its owner's mode (``velvet status`` says
so). End to end through a real mitmdump on both backends, with the helpers' classes tested beside.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from mitmproxy.test import tflow
from support.privacy import HEADERS, QUERY, S, found, mode, probe, umask
from support.rig import API_KEY
from velvet_core.capture.take import begin, finish
from velvet_core.capture.tap import BodyTap
from velvet_core.parsing.classify import classify
from velvet_core.parsing.extract import key_fingerprint, safe_headers
from velvet_core.private import loose, open_private, private_dir, touch_private, write_private
from velvet_core.redact import redact
from velvet_core.secret_names import redact_path, secret_header, secret_name
from velvet_core.storage.database import connect, open_db
from velvet_core.storage.snapshot import settle, to_record
from velvet_core.writer.deadletter import DeadLetters
from velvet_core.writer.spool import Spool

# -- the names ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["key", "KEY", "api-key", "Api_Key", "apikey", "token", "access_token", "sig",
                                  "Signature", "code", "client_secret", "password", "auth", "x-goog-api-key",
                                  "X-Amz-Security-Token", "subscription-key", "my_service_key", "refresh_token",
                                  "x-portkey-api-key", "helicone-auth", "cf-aig-authorization", "set-cookie"])
def test_secret_names(name):
    assert secret_name(name) and secret_header(name.encode())


@pytest.mark.parametrize("name", ["api-version", "model", "limit", "after", "max_tokens", "x-request-id",
                                  "x-ratelimit-remaining-tokens", "content-type", "idempotency-key", "order"])
def test_names_that_are_not_secret(name):
    assert not secret_name(name) and not secret_header(name.encode())


@pytest.mark.parametrize("path", [
    f"/v1/chat/completions?api-key={S['apikey']}",
    f"/openai/deployments/d/chat/completions?api-version=2024-10-21&api-key={S['apikey']}",
    f"/v1/models?KEY={S['apikey']}&limit=2",
    f"/v1/models?api%2Dkey={S['apikey']}",  # a name percent-encoded is decoded before it is judged
    f"/v1/models?a=1&access_token={S['apikey']}&sig={S['apikey']}",
    f"/v1/models?api_key={S['apikey']}&api_key={S['apikey']}",
])
def test_redact_path(path):
    out, key = redact_path(path)
    assert S["apikey"] not in out and "***" in out and key == S["apikey"]
    assert S["apikey"] not in redact(f"GET https://h{path} failed")
    assert redact_path(out)[0] == out  # idempotent


def test_redact_path_keeps_what_is_not_secret():
    assert redact_path("/v1/chat/completions") == ("/v1/chat/completions", None)
    assert redact_path("/openai/deployments/d/chat?api-version=2024-10-21&x=1") == (
        "/openai/deployments/d/chat?api-version=2024-10-21&x=1", None)


def test_the_snapshot_holds_no_secret_and_keeps_the_fingerprint():
    """What the event loop hands on (the journal's frame) holds no byte of any secret: query or header."""
    f = tflow.tflow(resp=True)
    f.request.path = "/v1/chat/completions?" + "&".join(f"{k}={v}" for k, v in QUERY.items())
    for k, v in HEADERS.items():
        f.request.headers[k] = v
    f.response.headers["set-cookie"] = f"sid={S['setcookie']}"
    f.response.headers["x-upstream-token"] = S["upstream"]
    snap = begin(f, classify(f.request.method, f.request.path), "api.openai.com")
    assert snap.key_fingerprint == key_fingerprint({"x-goog-api-key": S["goog"]})
    finish(snap, f)
    assert found(pickle.dumps(to_record(snap))) == []
    settle(snap)
    assert "api-version=2024-10-21" in snap.path and snap.route.kind == "chat.completions"
    assert found(repr(snap).encode()) == []
    # only a key in the query: its fingerprint, as the header's would be
    g = tflow.tflow()
    g.request.path = f"/v1/models?key={S['key']}"
    for k in [k for k in g.request.headers if secret_name(k)]:
        del g.request.headers[k]
    assert begin(g, classify("GET", "/v1/models"), "h").key_fingerprint == key_fingerprint({"api-key": S["key"]})
    assert safe_headers({"x-goog-api-key": "x", "x-my-token": "y", "accept": "z"}) == {"accept": "z"}


# -- the files ----------------------------------------------------------------------------------------------------

def test_private_helpers_under_umask_022(tmp_path):
    with umask(0o022):
        d = private_dir(tmp_path / "a" / "b" / "c")
        assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", d)] == [0o700] * 3
        with open_private(d / "f", "ab") as f:
            f.write(b"x")
        write_private(d / "g", b"y")
        touch_private(d / "h")
        assert [mode(d / n) for n in "fgh"] == [0o600] * 3
        # an existing folder or file keeps its owner's mode, and is reported
        (tmp_path / "open").mkdir(mode=0o755)
        (tmp_path / "open" / "db").write_bytes(b"")
        private_dir(tmp_path / "open")
        touch_private(tmp_path / "open" / "db")
        write_private(tmp_path / "open" / "db", b"z")
        assert mode(tmp_path / "open") == 0o755 and mode(tmp_path / "open" / "db") == 0o644
        assert loose([tmp_path / "open", tmp_path / "open" / "db", d / "f"]) == [
            {"path": str(tmp_path / "open"), "mode": "0755"},
            {"path": str(tmp_path / "open" / "db"), "mode": "0644"}]
        # velvet's own files: a symbolic link put in their place is refused, not followed
        (d / "link").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(OSError):
            open_private(d / "link", "ab")
        assert not (tmp_path / "elsewhere").exists()


def test_spool_journal_tap_and_dead_letters_are_private(tmp_path):
    from velvet_core.storage import ops
    from velvet_core.writer.journal import Journal

    f = tflow.tflow(resp=True)
    with umask(0o022):
        spool = Spool(tmp_path / "spool", "t")
        spool.write([ops.FileSeen({"id": "file-1"})])
        j = Journal(tmp_path / "spool" / "journal", "t")
        assert j.append(begin(f, classify("GET", "/v1/models"), "h")) is not None
        tap = BodyTap(tmp_path / "spool" / "streams", {"flow_id": "x"})
        tap(b"some bytes")
        tap(b"")
        DeadLetters(tmp_path / "spool" / "dead" / "dead-letters.jsonl").add(ops.FileSeen({"id": "f"}), "e", "p")
    made = list((tmp_path / "spool").rglob("*"))
    assert {p.name.split("-")[0] for p in made} >= {"spool", "journal", "streams", "tap", "dead"}
    assert {str(p): mode(p) for p in made} == {str(p): 0o700 if p.is_dir() else 0o600 for p in made}
    j.close()


def test_an_existing_database_keeps_its_mode_and_status_says_so(db_url, tmp_path, capsys):
    """A database (SQLite) or spool folder made by its owner readable by others stays so, and is named."""
    from velvet_core.cli import main

    with umask(0o022):
        spool = tmp_path / "spool"
        spool.mkdir()
        assert mode(spool) == 0o755
        if db_url.startswith("sqlite"):
            db = tmp_path / "velvet.db"
            db.write_bytes(b"")
            assert mode(db) == 0o644
        open_db(db_url).close()
        assert main(["--db", db_url, "status", "--spool-dir", str(spool), "--json"]) == 0
        s = json.loads(capsys.readouterr().out)
        assert main(["--db", db_url, "status", "--spool-dir", str(spool)]) == 0
        text = capsys.readouterr().out
    want = [{"path": str(spool), "mode": "0755"}]
    if db_url.startswith("sqlite"):
        assert mode(db) == 0o644
        # (its -wal and -shm, while a reader has them, take the database's mode: they are named too)
        want = [{"path": str(db) + x, "mode": "0644"} for x in ("", "-wal", "-shm") if Path(str(db) + x).exists()
                or x == ""] + want
        assert f"readable by other users: {db} (mode 0644" in text
    assert [w for w in s["world_readable"] if not w["path"].endswith(("-wal", "-shm"))] == [
        w for w in want if not w["path"].endswith(("-wal", "-shm"))]
    assert all(w["mode"] in ("0644", "0755") for w in s["world_readable"])
    assert f"readable by other users: {spool} (mode 0755" in text


def test_a_new_sqlite_database_and_its_wal_are_private(tmp_path):
    with umask(0o022):
        url = f"sqlite:///{tmp_path / 'new' / 'velvet.db'}"
        db = open_db(url)
        db.execute_sql("CREATE TABLE x (a)")
        db.execute_sql("INSERT INTO x VALUES (1)")
        files = sorted((tmp_path / "new").iterdir())
        assert [p.name for p in files] == ["velvet.db", "velvet.db-shm", "velvet.db-wal"]
        assert [mode(p) for p in files] == [0o600] * 3 and mode(tmp_path / "new") == 0o700
        db.close()
        ro = connect(url, readonly=True)  # a reader creates nothing
        ro.connect()
        ro.close()


# -- end to end ---------------------------------------------------------------------------------------------------

def test_no_secret_reaches_disk_or_outputs_and_every_file_is_private(db_url, standin, tmp_path):
    """Secret-bearing queries and headers through a real mitmdump (umask 022, inherited): no byte of them in
    the database (every table), its files, the spool, journal and status files, mitmdump's log, exports, the
    report or what the CLI printed; every file and folder velvet made is 0600 / 0700 (see tests/privacy.py)."""
    r = probe(standin, tmp_path, db_url)
    assert len(r.paths) >= 6 and all("api-version=2024-10-21" in x and "key=***" in x for x in r.paths), r.paths
    assert r.fingerprints == {key_fingerprint({"authorization": f"Bearer {API_KEY}"})}
    for made in ("run/spool/streams", "run/spool/journal/journal-", "run/spool/journal/writer-",
                 "run/spool/status-"):
        assert any(m.startswith(made) for m in r.made), (made, r.made)  # (all of them were walked)
    assert r.secrets == {}
    assert r.loose == {}
    assert r.figures() == {"secrets_found": 0, "world_readable_files": 0}


def test_a_batch_lines_url_is_kept_without_its_key():
    """A batch input line's ``url`` is a path velvet keeps (batch_requests.url): the same redaction."""
    from velvet_core.parsing.jsonl import Line
    from velvet_core.parsing.lines import request_row

    row = request_row(Line(1, json.dumps({"custom_id": "a", "method": "POST", "body": {"model": "m"},
                                          "url": f"/v1/chat/completions?api-key={S['apikey']}"}).encode()))
    assert row["url"] == "/v1/chat/completions?api-key=***" and row["problem"] is None
