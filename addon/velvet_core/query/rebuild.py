"""``velvet rebuild``: recompute the per-batch counters and the call rollups from the rows themselves."""

from __future__ import annotations

import os
from typing import Any

from peewee import Database

from velvet_core.humanize import Progress
from velvet_core.storage import rollups
from velvet_core.storage.database import DatabaseURLError, open_db, sqlite_path


def open_writable(url: str) -> Database:
    """Open (and migrate) an existing database for writing."""
    if url.startswith("sqlite:") and not os.path.exists(sqlite_path(url)):
        raise DatabaseURLError(f"no database at {sqlite_path(url)} (has the proxy run yet?)")
    return open_db(url)


def rebuild(db: Database) -> dict[str, Any]:
    """``{batches, calls, rollup_rows, seconds}``, with a progress bar over the calls on a terminal."""
    total = db.execute_sql('SELECT count(*) FROM "calls"').fetchone()[0]
    progress = Progress(int(total), "rebuilding call rollups")
    try:
        return rollups.rebuild(db, progress.advance)
    finally:
        progress.close()
