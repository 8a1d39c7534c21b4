"""Shared fixtures: fresh SQLite and PostgreSQL databases, the stand-in API and a real mitmdump."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
from rig import Proxy
from standin import StandIn


def pg_base_url() -> str:
    url = os.environ.get("VELVET_TEST_PG")
    if not url:
        pytest.fail("VELVET_TEST_PG is not set: run the suite with scripts/test, which starts a "
                    "throwaway PostgreSQL, or point VELVET_TEST_PG at a test database URL")
    return url


def fresh_pg_url() -> str:
    """A new schema in the test database, reached through ``search_path``."""
    base = pg_base_url()
    schema = f"t_{secrets.token_hex(5)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if urlsplit(base).query else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A URL of an empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'velvet.db'}"
    return fresh_pg_url()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'velvet.db'}"


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    srv = StandIn().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def proxy(request: pytest.FixtureRequest, standin: StandIn, tmp_path_factory) -> Iterator[Proxy]:
    """A real ``mitmdump -s addon/velvet.py`` mapped to the stand-in, on each backend."""
    tmp = tmp_path_factory.mktemp(f"proxy-{request.param}")
    url = f"sqlite:///{tmp / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()
    p = Proxy(url, standin.url, tmp).start()
    yield p
    p.stop()
