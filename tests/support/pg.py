"""The test databases: the PostgreSQL server of the run (``$VELVET_TEST_PG``) and a fresh schema in it per test.

Without ``VELVET_TEST_PG`` a PostgreSQL test is skipped, with a reason naming ``scripts/test`` (which starts a
throwaway server); under CI or ``scripts/test`` (``VELVET_REQUIRE_PG``) it fails instead: never a silent skip.
"""

from __future__ import annotations

import os
import secrets
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
