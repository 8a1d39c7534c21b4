"""Read-only means no write of any kind: the one door for SQL that velvet did not write.

``velvet sql``, ``velvet replay --sql``, ``velvet ask`` (a model's SQL) and any future such command go through
:func:`statement`. The database engine enforces it, not a keyword filter:

- SQLite: every read-only connection (:class:`ReadOnlySqlite`, made by ``database.connect(readonly=True)``) is
  opened ``mode=ro`` with ``PRAGMA query_only``, no database may be attached (so ``ATTACH`` and ``VACUUM INTO``
  cannot create a file), and an authorizer admits only reading: no write, schema change, pragma with a value,
  ``ATTACH``/``DETACH`` or extension loading. One statement per call (the sqlite3 module refuses more), and a
  time limit through the progress handler.
- PostgreSQL: one statement (sent as a prepared statement: the server refuses several), in a ``READ ONLY``
  transaction with ``statement_timeout``, rolled back; the connection runs nothing after it. A role that can do
  more than read (superuser, or member of the roles that reach the server's files and programs) is refused,
  with the lines that make a read-only role, unless the user says ``--allow-powerful-role``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peewee import Database, PostgresqlDatabase, SqliteDatabase

from velvet_core import config

DEFAULT_TIMEOUT = config.SQL_TIMEOUT

# Pragmas a read-only connection may run: those that only report (any argument names what to report on), and
# settings it may read but never set (no value).
REPORT_PRAGMAS = frozenset({
    "table_info", "table_xinfo", "table_list", "index_info", "index_xinfo", "index_list", "foreign_key_list",
    "database_list", "collation_list", "function_list", "module_list", "pragma_list", "compile_options",
    "integrity_check", "quick_check", "foreign_key_check", "page_count", "freelist_count", "data_version",
})
READ_PRAGMAS = frozenset({
    "page_size", "user_version", "schema_version", "application_id", "encoding", "journal_mode", "auto_vacuum",
    "busy_timeout", "query_only", "cache_size", "synchronous", "foreign_keys", "wal_autocheckpoint",
})
# SQL functions that reach outside the database (most are absent from Python's sqlite3, refused all the same).
FILE_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "lsdir"})
_READ_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE})


class ReadOnlyError(Exception):
    """The statement (or the connection's role) is not one velvet runs read-only; the message says why."""


def _authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in FILE_FUNCTIONS else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        ok = name in REPORT_PRAGMAS or (name in READ_PRAGMAS and arg2 is None)
        return sqlite3.SQLITE_OK if ok else sqlite3.SQLITE_DENY
    if action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT):
        return sqlite3.SQLITE_OK  # (nothing to commit on a read-only connection)
    return sqlite3.SQLITE_DENY  # insert, update, delete, create, drop, alter, attach, detach, analyze, ...


def lock_down(conn: sqlite3.Connection) -> None:
    """Make an open SQLite connection read-only by the engine's rules (see the module's docstring)."""
    conn.execute("PRAGMA query_only = 1")
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)  # ATTACH and VACUUM INTO (which attaches its target) fail
    if hasattr(conn, "enable_load_extension"):  # (absent where Python was built without it)
        conn.enable_load_extension(False)
    conn.set_authorizer(_authorize)


class ReadOnlySqlite(SqliteDatabase):
    """A peewee SQLite database whose every connection is locked down after peewee's own set-up."""

    def _add_conn_hooks(self, conn: sqlite3.Connection) -> None:
        super()._add_conn_hooks(conn)  # type: ignore[misc]
        lock_down(conn)


def powerful_role(db: Database) -> str | None:
    """Why the connection's role can do more than read (None when it cannot): PostgreSQL only."""
    if not isinstance(db, PostgresqlDatabase):
        return None
    row = db.execute_sql(
        "SELECT r.rolsuper, pg_has_role(current_user, 'pg_read_server_files', 'MEMBER'), "
        "pg_has_role(current_user, 'pg_write_server_files', 'MEMBER'), "
        "pg_has_role(current_user, 'pg_execute_server_program', 'MEMBER'), current_user "
        "FROM pg_roles r WHERE r.rolname = current_user").fetchone()
    if row is None:
        return None
    why = [name for flag, name in zip(row[:4], ("a superuser", "a member of pg_read_server_files",
                                                  "a member of pg_write_server_files",
                                                  "a member of pg_execute_server_program"), strict=True) if flag]
    return f"role {row[4]!r} is {' and '.join(why)}" if why else None


def refuse_powerful_role(db: Database) -> None:
    """Raise :class:`ReadOnlyError` with how to make a read-only role when the role can do more than read."""
    if why := powerful_role(db):
        raise ReadOnlyError(
            f"{why}: it can reach the server's files and programs, which no read-only transaction stops. "
            "Connect as a read-only role (CREATE ROLE velvet_reader LOGIN PASSWORD '...'; GRANT USAGE ON SCHEMA "
            "public TO velvet_reader; GRANT SELECT ON ALL TABLES IN SCHEMA public TO velvet_reader; see "
            "docs/security.md), or pass --allow-powerful-role")


@contextmanager
def statement(db: Database, sql: str, *, timeout: float = DEFAULT_TIMEOUT,
              allow_powerful_role: bool = False) -> Iterator[Any]:
    """Run exactly one statement read-only, with a time limit; yields its cursor (rows are read inside)."""
    if isinstance(db, PostgresqlDatabase):
        if not allow_powerful_role:
            refuse_powerful_role(db)
        cur = db.connection().cursor()
        cur.execute("BEGIN READ ONLY")
        try:
            cur.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}")
            cur.execute(sql, prepare=True)  # (a prepared statement: one statement, '%' left alone)
            yield cur
        finally:
            cur.execute("ROLLBACK")
        return
    conn = db.connection()
    locked = isinstance(db, ReadOnlySqlite)
    if not locked:  # a writable connection (a test's, a command's own): locked down for this statement only
        attached = conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.execute("PRAGMA query_only = 1")
        conn.set_authorizer(_authorize)
    deadline = time.monotonic() + timeout
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        try:
            cur = conn.execute(sql)
        except sqlite3.ProgrammingError as e:  # (more than one statement: nothing of it ran)
            raise ReadOnlyError(f"refused: {e}") from None
        except sqlite3.DatabaseError as e:
            if any(w in str(e) for w in ("authoriz", "prohibited", "readonly", "attached databases")):
                raise ReadOnlyError(f"refused: velvet runs read-only SQL ({e})") from None
            if "interrupted" in str(e):
                raise ReadOnlyError(f"stopped after {timeout:g} s") from None
            raise
        yield cur
    finally:
        conn.set_progress_handler(None, 0)
        if not locked:
            conn.set_authorizer(None)
            conn.execute("PRAGMA query_only = 0")
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, attached)
