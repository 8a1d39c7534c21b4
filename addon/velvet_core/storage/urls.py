"""Database URLs: checked and read without importing a database driver (the proxy checks velvet_db)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from velvet_core.redact import redact


class DatabaseURLError(ValueError):
    pass


def check_url(url: str) -> str:
    """Raise :class:`DatabaseURLError` unless ``url`` is a usable sqlite or postgresql URL."""
    try:
        parts = urlsplit(url)
    except ValueError as e:  # (an unclosed IPv6 bracket)
        raise DatabaseURLError(f"{redact(url)!r}: {e}") from None
    if parts.scheme == "sqlite":
        if not parts.path or parts.path == "/":
            raise DatabaseURLError(f"{redact(url)!r}: a SQLite URL needs a file path, e.g. sqlite:///var/velvet.db")
        if parts.query or parts.fragment:  # (``?mode=ro`` would be dropped, and the file opened read-write)
            raise DatabaseURLError(f"{redact(url)!r}: a SQLite URL takes no parameters (the commands open it "
                                   "read-only by themselves; a '?' or '#' in a file's name is written %3F or %23)")
    elif parts.scheme in ("postgresql", "postgres"):
        pg_params(url)
    else:
        raise DatabaseURLError(f"{redact(url)!r}: use sqlite:///path or postgresql://user:pass@host:port/db")
    return url


def pg_params(url: str) -> dict[str, Any]:
    """The keywords of a PostgreSQL URL's connection (``dbname``, ``user``, ``password``, ``host``, ``port`` and
    the query's libpq parameters), as libpq reads such a URL: ``postgresql:///velvet?host=/run/postgresql`` is
    a Unix socket. A keyword given twice, in the URL's parts and again in its query, raises
    :class:`DatabaseURLError` naming it (libpq would take one of the two, and velvet could open another
    database, as another user, than the URL seems to say)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise DatabaseURLError(f"{redact(url)!r}: the port is not a number from 0 to 65535 (several hosts go in "
                               "the query: postgresql://user@/velvet?host=h1,h2&port=5432,5433)") from None
    # (the host as written, percent-decoded as libpq does: %2Frun%2Fpostgresql is a socket's folder, whose case
    # ``hostname`` would lower)
    host = parts.netloc.rpartition("@")[2]
    host = host[1:host.find("]")] if host.startswith("[") else host.partition(":")[0]
    out: dict[str, Any] = {k: v for k, v in (
        ("dbname", unquote(parts.path.lstrip("/"))), ("user", unquote(parts.username or "")),
        ("password", unquote(parts.password or "")), ("host", unquote(host)), ("port", port)) if v}
    for name, value in url_params(url).items():
        if name in out:
            raise DatabaseURLError(f"{redact(url)!r}: {name!r} is given twice, in the URL and in its query; "
                                   "give it once")
        out[name] = value
    if not out.get("dbname"):
        raise DatabaseURLError(f"{redact(url)!r}: a PostgreSQL URL needs a database name, "
                               "e.g. postgresql://user:pass@host:5432/velvet")
    return out


def url_params(url: str) -> dict[str, str]:
    """A PostgreSQL URL's query parameters (the connection's keywords). A repeated ``options`` is joined, in order:
    libpq keeps only the last of a repeated parameter, so ``?options=-csearch_path%3Dx&options=-c%20...`` would
    quietly lose the schema, and velvet would write to (or read) another one. Any other parameter given twice
    raises :class:`DatabaseURLError`: which one was meant is not velvet's to guess."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(urlsplit(url).query):
        if name not in params:
            params[name] = value
        elif name == "options":
            params[name] = f"{params[name]} {value}"
        else:
            raise DatabaseURLError(f"{redact(url)!r}: the parameter {name!r} is given twice; give it once")
    return params


def sqlite_path(url: str) -> str:
    """As SQLAlchemy and peewee: ``sqlite:///rel.db`` is relative, ``sqlite:////abs.db`` absolute."""
    return unquote(urlsplit(url).path)[1:]


def with_connect_timeout(url: str, seconds: int) -> str:
    """``url`` with ``connect_timeout`` (PostgreSQL) unless it has one: libpq otherwise waits for the system's TCP
    timeout (about two minutes) on a server that does not answer. A SQLite URL is returned as it is."""
    parts = urlsplit(url)
    if parts.scheme.startswith("sqlite") or "connect_timeout" in url_params(url):
        return url
    return urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, f"connect_timeout={seconds}"]))))
