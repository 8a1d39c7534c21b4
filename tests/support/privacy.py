"""Planted secrets and file modes after a real run: shared by tests/test_private.py and scripts/faults.py.

:func:`probe` runs a real mitmdump (umask 022, which its processes inherit) at the stand-in with keys in URL
queries and in gateway headers, exports and reports what it stored, then looks for every byte of every planted
secret on disk (the database's files, spool, journal, status files, mitmdump's log, exports, report), in the
database's rows (every table) and in what the CLI printed, and for every file or folder velvet made that is not
0600 / 0700.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from velvet_core.storage import models
from velvet_core.storage.database import connect

from support import faultkit as fk
from support.rig import API_KEY, bound, wait_for
from support.standin import StandIn

S = {name: f"PLANTED{name.upper()}{i:02d}x7q" for i, name in enumerate((
    "key", "apikey", "token", "sig", "code", "secret", "password", "goog", "apim", "portkey", "cookie", "aig",
    "setcookie", "upstream"))}
QUERY = {"key": S["key"], "api-key": S["apikey"], "Access_Token": S["token"], "sig": S["sig"],
         "code": S["code"], "client_secret": S["secret"], "password": S["password"], "api-version": "2024-10-21"}
HEADERS = {"x-goog-api-key": S["goog"], "Ocp-Apim-Subscription-Key": S["apim"], "x-portkey-api-key": S["portkey"],
           "cookie": f"session={S['cookie']}", "cf-aig-authorization": f"Bearer {S['aig']}"}
PLANTED = [*S.values(), API_KEY]
MSG = [{"role": "user", "content": "hello"}]
CALLS = 6  # what :func:`traffic` makes: 4 calls, a file upload and a batch


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def found(data: bytes) -> list[str]:
    return [s for s in PLANTED if s.encode() in data]


def occurrences(data: bytes) -> int:
    return sum(data.count(s.encode()) for s in PLANTED)


def scan(*roots: Path) -> dict[str, int]:
    """Planted secrets in the files below ``roots``: occurrences by path."""
    hits = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and (n := occurrences(p.read_bytes())):
                hits[str(p)] = n
    return hits


def not_private(*roots: Path) -> dict[str, str]:
    """The files and folders below (and at) ``roots`` that are not 0600 / 0700: octal mode by path."""
    return {str(p): f"{mode(p):04o}" for root in roots if root.exists() for p in [root, *root.rglob("*")]
            if mode(p) != (0o700 if p.is_dir() else 0o600)}


def dump_database(url: str) -> bytes:
    """Every row of every table as text."""
    db = connect(url, readonly=url.startswith("sqlite"))
    db.connect()
    try:
        out = []
        for t in db.get_tables():
            out += [repr(row) for row in db.execute_sql(f'SELECT * FROM "{t}"').fetchall()]
        return "\n".join(out).encode()
    finally:
        db.close()


def traffic(client: openai.OpenAI, standin: StandIn) -> None:
    """Calls, a stream, an error, an answer with set-cookie, an upload and a batch: keys in query and headers."""
    canned = standin.can(b'{"object": "list", "data": []}', headers=[
        (b"set-cookie", f"sid={S['setcookie']}".encode()), (b"x-upstream-token", S["upstream"].encode())])
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=MSG, stream=True))
    client.models.list(extra_headers={"x-standin-canned": canned})
    with contextlib.suppress(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                       extra_headers={"x-standin-scenario": "500"})
    lines = b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": "gpt-4o-mini", "messages": MSG}}).encode() + b"\n"
                     for i in range(3))
    f = client.files.create(file=("in.jsonl", lines), purpose="batch")
    client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")


@dataclass
class Probe:
    secrets: dict[str, int] = field(default_factory=dict)  # where planted secrets were found: occurrences
    loose: dict[str, str] = field(default_factory=dict)  # files and folders velvet made not 0600 / 0700
    paths: list[str] = field(default_factory=list)  # calls.path as stored
    fingerprints: set[str | None] = field(default_factory=set)
    made: list[str] = field(default_factory=list)  # what was in the spool folder while running

    def figures(self) -> dict[str, Any]:
        return {"secrets_found": sum(self.secrets.values()), "world_readable_files": len(self.loose)}


def probe(standin: StandIn, tmp: Path, url: str) -> Probe:
    """The run described in the module's docstring. A SQLite ``url`` is put under ``tmp/data`` (made by velvet);
    ``tmp/run`` holds mitmdump's files (its log included), ``tmp/out`` the exports and the report."""
    from velvet_core.cli import main

    run, data, out = tmp / "run", tmp / "data", tmp / "out"
    if url.startswith("sqlite"):
        url = f"sqlite:///{data / 'velvet.db'}"
    r = Probe()
    printed = io.StringIO()
    with umask(0o022):
        # mitmproxy's own flow listing prints each URL as sent: flow_detail=0 (fk's QUIET), see docs/security.md
        # (a low stream threshold: the upload goes through velvet's tap, whose spill files are under spool/streams)
        p = fk.start_proxy(url, standin, run, extra=["--set", "velvet_stream_threshold=100"])
        try:
            traffic(fk.sdk(p).with_options(default_query=QUERY, default_headers=HEADERS), standin)

            def stored() -> bool:
                with bound(url):
                    return models.Call.select().count() >= CALLS
            wait_for(stored, 60, f"{CALLS} calls")
            with bound(url):
                r.paths = [c.path for c in models.Call.select()]
                r.fingerprints = {c.key_fingerprint for c in models.Call.select()}
            wait_for(lambda: list((run / "spool").glob("status-*.json")), 15, "a status file")
            out.mkdir(mode=0o700)
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                for name, args in (("calls.jsonl", ["export", "--format", "jsonl"]),
                                   ("calls.csv", ["export", "--format", "csv"]),
                                   ("lines.jsonl", ["export", "--lines", "--format", "jsonl"]),
                                   ("report.html", ["report"])):
                    main(["--db", url, *args, "-o", str(out / name)])
                # (velvet status is left out while a proxy runs until issue 24 item 9 is fixed: it crashes on
                # mixed naive and aware times; the status files it reads are scanned below)
                for args in (["calls"], ["calls", "--json"], ["batches"], ["stats"], ["show", "1"], ["show", "2"]):
                    main(["--db", url, *args])
            r.loose |= not_private(run / "spool", data, *out.iterdir())
            r.made = sorted(str(x.relative_to(tmp)) for x in (run / "spool").rglob("*"))
            r.secrets |= scan(run, data, out)
            if n := occurrences(dump_database(url)):
                r.secrets["database rows (running)"] = n
        finally:
            fk.stop_proxy(p)
    r.loose |= not_private(run / "spool", data)
    r.secrets |= scan(run, data, out)
    if n := occurrences(dump_database(url)):
        r.secrets["database rows"] = n
    if n := occurrences(printed.getvalue().encode()):
        r.secrets["printed by velvet"] = n
    return r
