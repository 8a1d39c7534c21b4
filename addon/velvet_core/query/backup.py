"""``velvet backup FILE``: a consistent copy of a live SQLite database, made with SQLite's online backup API.

A live SQLite database is its ``.db`` file plus its ``-wal``: ``cp`` of the ``.db`` alone misses what the
WAL holds, and a copy taken mid-write can be torn. The backup API reads one snapshot while proxies go on
writing (WAL readers block no writer). PostgreSQL has pg_dump for this.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from velvet_core.humanize import duration, printable
from velvet_core.redact import redact
from velvet_core.storage.urls import check_url, sqlite_path


class BackupError(Exception):
    """Why no backup was made: one line, and the exit status (2: usage)."""


def backup(url: str, dest: str) -> dict[str, Any]:
    """Copy the SQLite database at ``url`` to the new file ``dest`` (created 0600: it holds prompts).

    Returns ``{"path", "bytes", "pages", "seconds"}``."""
    check_url(url)
    if urlsplit(url).scheme != "sqlite":
        raise BackupError("backup copies SQLite databases; for PostgreSQL use pg_dump (pg_dump -Fc DBNAME > FILE)")
    src_path = sqlite_path(url)
    if not Path(src_path).is_file():
        raise BackupError(f"no database at {src_path}")
    out = Path(dest).expanduser()
    t0 = time.monotonic()
    try:
        # O_EXCL: never overwrite (a typo must not clobber a database); 0600 before any byte is written
        os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise BackupError(f"{out} exists; give a new file name") from None
    except OSError as e:
        raise BackupError(f"cannot create {out}: {e.strerror}") from None
    try:
        src = sqlite3.connect(f"file:{src_path}?mode=ro", uri=True, timeout=15)
        try:
            dst = sqlite3.connect(out)
            try:
                # pages=-1: the whole database in one step, from one snapshot. Step by step, every write of
                # a proxy in between would restart the copy (it might never end under steady traffic).
                src.backup(dst, pages=-1)
                # the copy is one self-contained file: no -wal to carry along
                dst.execute("PRAGMA journal_mode=DELETE")
                pages = dst.execute("PRAGMA page_count").fetchone()[0]
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        out.unlink(missing_ok=True)
        raise BackupError(f"backup of {src_path} failed: {e}") from None
    return {"path": str(out.resolve()), "bytes": out.stat().st_size, "pages": pages,
            "seconds": round(time.monotonic() - t0, 3)}


def cmd_backup(url: str, dest: str, as_json: bool) -> int:
    """The command: one line for people (or the JSON), errors as one line on stderr with status 2."""
    try:
        r = backup(url, dest)
    except BackupError as e:
        print(f"velvet: {printable(redact(str(e)))}", file=sys.stderr)
        return 2
    if as_json:
        print(orjson.dumps(r).decode())
    else:
        print(f"backed up {r['bytes']:,} bytes ({r['pages']:,} pages) to {printable(r['path'])} "
              f"in {duration(r['seconds'])}")
    return 0
