"""Open a database from a URL and bring its schema to the current version (see migrations.py)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from peewee import Database, PostgresqlDatabase, Psycopg3Adapter, SqliteDatabase

from velvet_core.private import private_dir, touch_private
from velvet_core.redact import redact
from velvet_core.storage.migrations import SCHEMA_VERSION, migrate, schema_version
from velvet_core.storage.sql import has_table
from velvet_core.storage.urls import DatabaseURLError, check_url, pg_params, sqlite_path

__all__ = ["SCHEMA_VERSION", "DatabaseURLError", "PostgresDatabase", "check_url", "connect", "migrate", "open_db",
           "schema_version", "sqlite_path"]


class _Psycopg3(Psycopg3Adapter):
    """peewee's psycopg 3 adapter, importing the driver itself: peewee may have been imported without it
    (:mod:`velvet_core.storage.drivers`), and then its own adapter finds none."""

    def __init__(self) -> None:
        import psycopg
        from psycopg.pq import TransactionStatus
        from psycopg.types.json import Json, Jsonb

        super().__init__()
        self.psycopg, self.intrans = psycopg, TransactionStatus.INTRANS
        self.json_type, self.jsonb_type = Json, Jsonb
        self.txn_idle, self.txn_inerror = TransactionStatus.IDLE, TransactionStatus.INERROR
        self.txn_unknown = TransactionStatus.UNKNOWN

    def check_driver(self) -> None:
        pass

    def get_binary_type(self) -> Any:
        return self.psycopg.Binary

    def connect(self, db: Any, **params: Any) -> Any:
        if db._encoding:
            params.setdefault("client_encoding", db._encoding)
        params.setdefault("conninfo" if db.database.startswith("postgresql://") else "dbname", db.database)
        return self.psycopg.connect(**params)

    def server_side_cursor(self, conn: Any) -> Any:
        # in a transaction a named cursor streams and lives as long as it; outside one the server wants
        # WITH HOLD (as peewee's own adapter does)
        return conn.cursor(name=str(uuid.uuid4()), withhold=conn.pgconn.transaction_status != self.intrans)


class PostgresDatabase(PostgresqlDatabase):
    """PostgreSQL through psycopg 3, with ``json``/``jsonb`` values read back as their JSON text.

    psycopg would parse them into dicts; as text they read alike on both backends (SQLite keeps JSON as
    text), so the models, the queries and ``velvet sql`` need no per-backend handling.
    """

    psycopg2_adapter = psycopg3_adapter = _Psycopg3  # whichever peewee picks: psycopg 3, imported on use

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("prefer_psycopg3", True)  # stream_rows and the jsonb loader need psycopg 3
        super().__init__(*args, **kwargs)

    def _initialize_connection(self, conn: Any) -> None:
        super()._initialize_connection(conn)  # type: ignore[misc]  # (missing from peewee's stubs)
        from psycopg.types.string import TextLoader

        for name in ("json", "jsonb"):
            conn.adapters.register_loader(name, TextLoader)


# A new SQLite database gets 16 kB pages (SQLite's default is 4 kB; an existing database keeps its own: the
# pragma only applies before the first table). A batch line's body is often a few kB: with 4 kB pages each such
# row spilled onto overflow pages. The bench's 200 MB / 50,000-line upload: SQLite's share of the ingest 0.93 ->
# 0.58 s, the whole offline ingest about 25 % less (three alternated runs); live writes and the --scale queries
# were unchanged or faster (BENCHMARKS.md at c8ffec3, session 5). 32 kB was no better.
PAGE_SIZE = 16384
# A checkpoint (pages copied from the WAL into the database, then fsync) every 8,192 pages (128 MB of WAL at
# 16 kB pages; 32 MB at 4 kB) instead of SQLite's 1,000: a 200 MB upload's ingest took about 7 % less (median
# of 8 alternated pairs, 4 kB pages) and 2,048 pages were slower again at 16 kB (three alternated runs).
WAL_CHECKPOINT_PAGES = 8192


def connect(url: str, *, readonly: bool = False) -> Database:
    """A peewee Database for ``url`` (not yet connected)."""
    check_url(url)
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = sqlite_path(url)
        if not readonly:
            private_dir(Path(path).parent)
            touch_private(path)  # 0600 before SQLite creates it: its -wal and -shm take the file's mode
        # auto_vacuum applies to a file created now (before its first table): pruning returns pages to the disk
        pragmas = {"page_size": PAGE_SIZE, "auto_vacuum": "incremental", "busy_timeout": 15000,
                   "journal_mode": "wal", "synchronous": "normal",
                   "foreign_keys": 1, "wal_autocheckpoint": WAL_CHECKPOINT_PAGES}
        if readonly:
            from velvet_core.storage.readonly import ReadOnlySqlite

            return ReadOnlySqlite(f"file:{path}?mode=ro", uri=True, pragmas={"busy_timeout": 10000})
        return SqliteDatabase(path, pragmas=pragmas, check_same_thread=False)
    params = pg_params(url)
    # velvet's statements are short and go through indexes: JIT compilation (tens of ms, triggered by
    # cost estimates over a big table) only made them slower
    params["options"] = f"{params.get('options', '')} -c jit=off".strip()
    return PostgresDatabase(params.pop("dbname"), **params)


def open_db(url: str) -> Database:
    """Connect and migrate."""
    db = connect(url)
    with _one_opener(url):
        db.connect(reuse_if_open=True)
        migrate(db)
    return db


@contextlib.contextmanager
def _one_opener(url: str) -> Iterator[None]:
    """SQLite: one writer at a time opens (and migrates) a database, across threads and processes.

    Connecting sets ``journal_mode=wal``; two connections converting a new file at the same moment made one fail
    at once with "database is locked" (SQLite's busy handler does not wait there: 15 of 150 starts of four
    threads at once on a busy machine). The lock is the database folder's (flock): never a descriptor of the
    database file itself, whose closing would drop SQLite's own POSIX locks in this process.
    """
    try:
        import fcntl
    except ImportError:  # (not on Windows: there, the race stays)
        fcntl = None  # type: ignore[assignment]
    if fcntl is None or not url.startswith("sqlite:"):
        yield
        return
    fd = os.open(Path(sqlite_path(url)).parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (releases the flock)


def open_readonly(url: str) -> Database:
    """Connect read-only: SQLite with ``mode=ro``, PostgreSQL with read-only transactions."""
    db = connect(url, readonly=True)  # (checks the URL; nothing is opened or made yet)
    if url.startswith("sqlite:") and not os.path.exists(sqlite_path(url)):
        raise DatabaseURLError(f"no database at {sqlite_path(url)} (has the proxy run yet?)")
    db.connect()
    if isinstance(db, PostgresqlDatabase):  # (a statement, not the URL's options: the URL cannot undo it)
        db.execute_sql("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    if not has_table(db, "batches"):
        db.close()
        raise DatabaseURLError(f"{redact(url)}: not a velvet database (no tables yet)")
    return db
