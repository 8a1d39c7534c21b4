"""The test databases: the PostgreSQL server of the run (``$VELVET_TEST_PG``) and a fresh schema in it per test.

Without ``VELVET_TEST_PG`` a PostgreSQL test is skipped, with a reason naming ``scripts/test`` (which starts a
throwaway server); under CI or ``scripts/test`` (``VELVET_REQUIRE_PG``) it fails instead: never a silent skip.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import urlsplit

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
