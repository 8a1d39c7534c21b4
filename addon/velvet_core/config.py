"""Defaults shared by the addon, the writer and the CLI: where the database and the spool live, default sizes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from velvet_core.redact import redact

ENV_DB = "VELVET_DB"
DEFAULT_HOSTS = ("api.openai.com",)
BODY_LIMIT = 8 * 1024 * 1024  # velvet_body_limit's default
STREAM_THRESHOLD = 4 * 1024 * 1024  # velvet_stream_threshold's default
SQL_TIMEOUT = 10.0  # seconds a statement given by a user may run (velvet sql --timeout)
STATS_GROUPS = ("model", "endpoint", "day", "key")  # velvet stats --by


def data_dir() -> Path:
    """``$VELVET_HOME``, else ``$XDG_DATA_HOME/velvet``, else ``~/.local/share/velvet``."""
    if home := os.environ.get("VELVET_HOME"):
        return Path(home)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "velvet"


def default_db_url() -> str:
    """``$VELVET_DB`` when set, else the SQLite file ``<data dir>/velvet.db``."""
    return os.environ.get(ENV_DB) or f"sqlite:///{data_dir() / 'velvet.db'}"


def default_spool_dir(db_url: str | None = None) -> Path:
    """``<data dir>/spool/<12 hex>``: a folder per database (by a hash of its URL without the password), so that
    ``velvet status`` of one database never lists the proxies of another. Without a URL, the folder above them."""
    base = data_dir() / "spool"
    if db_url is None:
        return base
    return base / hashlib.sha256(redact(db_url).encode()).hexdigest()[:12]
