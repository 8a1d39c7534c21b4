"""The ``velvet`` command. For now: ``velvet [--db URL] sql "SELECT …" [--json]`` (read-only)."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

import orjson
from peewee import PostgresqlDatabase

from . import config
from .database import DatabaseURLError, check_url, connect, sqlite_path


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(v)


def run_sql(url: str, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``query`` read-only: SQLite opened with mode=ro, PostgreSQL in a read-only transaction."""
    db = connect(url, readonly=True)
    db.connect()
    try:
        if isinstance(db, PostgresqlDatabase):
            db.execute_sql("BEGIN READ ONLY")
        cur = db.execute_sql(query)
        cols = [d[0] for d in cur.description or ()]
        rows = [tuple(r) for r in cur.fetchall()] if cols else []
        if isinstance(db, PostgresqlDatabase):
            db.execute_sql("ROLLBACK")
        return cols, rows
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="velvet", description="Query what velvet captured.")
    ap.add_argument("--db", default=None, help=f"database URL (default: $VELVET_DB or {config.default_db_url()})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sql = sub.add_parser("sql", help="run a read-only SQL query")
    sql.add_argument("query")
    sql.add_argument("--json", action="store_true", help="print a JSON array of objects")
    sql.add_argument("--db", default=None, dest="db_after", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    url = args.db_after or args.db or config.default_db_url()
    try:
        check_url(url)
        if url.startswith("sqlite:"):
            import os
            if not os.path.exists(sqlite_path(url)):
                raise DatabaseURLError(f"no database at {sqlite_path(url)} (has the proxy run yet?)")
        cols, rows = run_sql(url, args.query)
    except DatabaseURLError as e:
        print(f"velvet: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"velvet: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e}",
              file=sys.stderr)
        return 1
    if args.json:
        out = [dict(zip(cols, r, strict=True)) for r in rows]
        sys.stdout.write(orjson.dumps(out, default=_fmt, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    table = [cols] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
