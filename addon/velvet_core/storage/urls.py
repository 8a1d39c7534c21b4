"""Database URLs: checked and read without importing a database driver (the proxy checks velvet_db)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from velvet_core.redact import redact


class DatabaseURLError(ValueError):
    pass


def check_url(url: str) -> str:
    """Raise :class:`DatabaseURLError` unless ``url`` is a usable sqlite or postgresql URL."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if not parts.path or parts.path == "/":
            raise DatabaseURLError(f"{redact(url)!r}: a SQLite URL needs a file path, e.g. sqlite:///var/velvet.db")
    elif parts.scheme in ("postgresql", "postgres"):
        if not parts.path.strip("/"):
            raise DatabaseURLError(f"{redact(url)!r}: a PostgreSQL URL needs a database name, "
                                   "e.g. postgresql://user:pass@host:5432/velvet")
    else:
        raise DatabaseURLError(f"{redact(url)!r}: use sqlite:///path or postgresql://user:pass@host:port/db")
    return url


def sqlite_path(url: str) -> str:
    """As SQLAlchemy and peewee: ``sqlite:///rel.db`` is relative, ``sqlite:////abs.db`` absolute."""
    return unquote(urlsplit(url).path)[1:]
