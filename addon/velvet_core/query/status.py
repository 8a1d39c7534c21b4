"""``velvet status``: the health of every proxy writing to a database, from its rows and the spool's files.

The database says what each proxy last published; the status files in the spool directory still speak
when the database does not answer (the usual reason to look). Both are merged per proxy.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
from peewee import Database, PostgresqlDatabase

from velvet_core import clock, config
from velvet_core.pids import alive
from velvet_core.private import loose, unsafe_dir
from velvet_core.storage.sql import has_table, iso, rows, to_dt
from velvet_core.storage.urls import sqlite_path

KEYS = ("proxy", "hostname", "pid", "running", "db", "started_at", "updated_at", "stopped_at", "last_write_at",
        "failing_since", "last_error", "queue_depth", "pending", "spooled", "dead_lettered", "written", "source")
STALE = timedelta(seconds=30)  # a proxy that has not published for this long is not running



def status(db: Database | None, spool_dir: Path, db_error: str | None = None,
           files: Sequence[Path] = ()) -> dict[str, Any]:
    """Every proxy known to the database or the spool directory, newest first, the spool's leftovers, and which
    of ``files``, the spool directory and what it holds other users may read (``world_readable``)."""
    found: dict[str, dict[str, Any]] = {}
    if db is not None and has_table(db, "velvet_proxies"):
        cur = db.execute_sql("SELECT * FROM velvet_proxies")
        names = [c[0] for c in cur.description]
        for values in cur.fetchall():
            row = dict(zip(names, values, strict=True))
            found[row["proxy"]] = {**row, "source": "database"}
    for path in sorted(spool_dir.glob("status-*.json")) if spool_dir.is_dir() else ():
        try:
            row = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        old = found.get(row.get("proxy", ""))
        if old is None or str(to_dt(old["updated_at"])) <= str(to_dt(row.get("updated_at"))):
            found[row["proxy"]] = {**row, "source": "file" if old is None else "both"}
        else:
            old["source"] = "both"
    now = clock.now()
    here = socket.gethostname()
    proxies = []
    for p in found.values():
        updated = to_dt(p.get("updated_at"))
        running = p.get("stopped_at") is None and updated is not None and now - updated < STALE
        if p.get("hostname") == here and p.get("pid"):
            running = running and alive(int(p["pid"]))
        out = {k: p.get(k) for k in KEYS}
        for k in ("started_at", "updated_at", "stopped_at", "last_write_at", "failing_since"):
            out[k] = iso(p.get(k))
        out["running"] = running
        proxies.append(out)
    proxies.sort(key=lambda p: p["updated_at"] or "", reverse=True)
    letters = spool_dir / "dead-letters.jsonl"
    return {
        "proxies": proxies,
        "database_error": db_error,
        "spool_dir": str(spool_dir),
        "spooled_files": sorted(str(p) for p in spool_dir.glob("spool-*")) if spool_dir.is_dir() else [],
        "dead_letters": sum(1 for _ in letters.open("rb")) if letters.is_file() else 0,
        "dead_letter_file": str(letters),
        "quarantined": sorted(str(p) for p in spool_dir.rglob("*.damaged-*")) if spool_dir.is_dir() else [],
        # made by their owner so (velvet creates its own 0600 and 0700, and leaves existing ones alone)
        "spool_unsafe": unsafe_dir(spool_dir) or unsafe_dir(spool_dir / "journal"),
        "world_readable": loose([*files, spool_dir, *sorted(spool_dir.rglob("*"))]),
        "database": database_facts(db, files) if db is not None else None,
    }


def database_facts(db: Database, files: Sequence[Path] = ()) -> dict[str, Any]:
    """The database's size, its oldest rows, and the retention in force (as the proxy that applies it
    recorded it in ``velvet_meta``, with its last run)."""
    if isinstance(db, PostgresqlDatabase):
        size = int(rows(db, "SELECT pg_database_size(current_database()) AS n")[0]["n"])
    else:
        size = sum(f.stat().st_size for f in files if f.is_file())
    oldest_call = rows(db, "SELECT min(started_at) AS t FROM calls")[0]["t"] if has_table(db, "calls") else None
    oldest_batch = rows(db, "SELECT min(COALESCE(created_at, first_seen_at)) AS t FROM batches")[0]["t"] \
        if has_table(db, "batches") else None
    meta = {r["key"]: r["value"] for r in rows(db, "SELECT key, value FROM velvet_meta WHERE key IN "
                                                   "('retention', 'retention_last_run', 'refresh')")} \
        if has_table(db, "velvet_meta") else {}
    last = meta.get("retention_last_run")
    refresh = meta.get("refresh")  # the last proxy's velvet_refresh: on (its last round) or off (and why)
    return {"size_bytes": size, "oldest_call_at": iso(oldest_call), "oldest_batch_at": iso(oldest_batch),
            "retention": meta.get("retention"), "retention_last_run": orjson.loads(last) if last else None,
            "refresh": orjson.loads(refresh) if refresh else None}


def database_files(url: str) -> list[Path]:
    """What holds a database's rows on this machine: a SQLite file with its -wal and -shm, and its folder when
    that is velvet's data folder (PostgreSQL's files are the server's)."""
    if not url.startswith("sqlite:"):
        return []
    db = Path(sqlite_path(url))
    own = [db.parent] if db.parent.resolve() == config.data_dir().resolve() else []
    return [*own, db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
