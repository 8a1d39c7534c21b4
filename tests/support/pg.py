"""The test databases: the PostgreSQL server of the run (``$VELVET_TEST_PG``) and a fresh schema in it per test.

Without ``VELVET_TEST_PG`` a PostgreSQL test is skipped, with a reason naming ``scripts/test`` (which starts a
throwaway server); under CI or ``scripts/test`` (``VELVET_REQUIRE_PG``) it fails instead: never a silent skip.
"""

from __future__ import annotations

import os
import secrets
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest


def pg_base_url() -> str:
    url = os.environ.get("VELVET_TEST_PG")
    if not url:
        why = ("VELVET_TEST_PG is not set: run the suite with scripts/test, which starts a throwaway PostgreSQL, "
               "or point VELVET_TEST_PG at a test database URL")
        if os.environ.get("CI") or os.environ.get("VELVET_REQUIRE_PG"):
            pytest.fail(why)
        pytest.skip(why)
    return url


def fresh_pg_url() -> str:
    """A new schema in the test database, reached through ``search_path``."""
    base = pg_base_url()
    schema = f"t_{secrets.token_hex(5)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if urlsplit(base).query else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


def reader_url(admin_url: str, base_url: str | None = None) -> str:
    """A plain login role that may only read the test's schema (what docs/security.md tells users to make)."""
    schema = urlsplit(admin_url).query.split("search_path%3D")[1].split("&")[0]
    role = f"reader_{secrets.token_hex(4)}"
    with psycopg.connect(base_url or pg_base_url(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}")
    parts = urlsplit(admin_url)
    netloc = f"{role}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def own_database_url() -> str:
    """A new database in the test server, for a test that cuts every connection to its database (as a server
    restart or a failover cuts them): the run's other tests, in other processes (``scripts/test`` runs files side
    by side), share the base database, and a cut there ended their connections too."""
    base = pg_base_url()
    name = f"t_{secrets.token_hex(5)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def drop_database(url: str) -> None:
    """Drop a database of :func:`own_database_url`, whoever is still connected (a proxy's processes)."""
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(pg_base_url(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def cut_connections(db: Any) -> int:
    """Terminate every other connection to ``db``'s database, as a server restart does to its clients; refused
    in the run's shared database (use :func:`own_database_url`). Returns how many were cut."""
    name = db.execute_sql("SELECT current_database()").fetchone()[0]
    if name == urlsplit(pg_base_url()).path.lstrip("/"):
        raise AssertionError(f"connections cut in the shared test database {name}: the run's other tests use it "
                             "(give the test a database of its own: own_database_url())")
    return db.execute_sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
