"""Shared fixtures: fresh SQLite and PostgreSQL databases, the stand-in API and a real mitmdump."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from support.pg import drop_database, fresh_pg_url, own_database_url
from support.rig import Proxy
from support.standin import StandIn


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A URL of an empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'velvet.db'}"
    return fresh_pg_url()


@pytest.fixture
def own_pg_url() -> Iterator[str]:
    """A PostgreSQL database of the test's own (not a schema of the shared one): for a test that cuts every
    connection to its database (support.pg.cut_connections), which would cut the run's other tests' too."""
    url = own_database_url()
    yield url
    drop_database(url)


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
    # (the proxy's background processes write to its log too: none may die, even at its shutdown)
    assert "Fatal Python error" not in p.output(), p.output()[-3000:]


# -- markers: what a test needs, found from its fixtures and its code ----------------------------------------
# e2e: it starts mitmdump (or mitmweb, node, scripts/run); pg: it uses a PostgreSQL database; slow: it runs the
# bench, the fault suite, the demo or builds a wheel. `scripts/test --quick` runs the rest.

_E2E = ("Proxy(", "MITMDUMP", "mitmdump", "mitmweb", "scripts\" / \"run", "scripts/run", "run_node(",
        "start_proxy(", "fk.", "probe(")
_PG = ("fresh_pg_url(", "pg_base_url(", "own_database_url(")
_SLOW = ("scripts\" / \"bench", "scripts\" / \"faults", "scripts\" / \"demo", "\"wheel\"", "scale.py")


def _sources(item: pytest.Item) -> str:
    """The code of the test and of every fixture it uses (their own code, not what they call)."""
    import inspect

    out = []
    fn = getattr(item, "function", None)
    funcs = [fn] if fn is not None else []
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        funcs += [d.func for d in defs]
    for f in funcs:
        with contextlib.suppress(OSError, TypeError):  # (a builtin, or code without a file)
            out.append(inspect.getsource(f))
    return "\n".join(out)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        code = _sources(item)
        params = getattr(getattr(item, "callspec", None), "params", {})
        backends = {v for v in params.values() if v in ("sqlite", "postgres")}
        if "postgres" in backends or (not backends and any(t in code for t in _PG)):
            item.add_marker(pytest.mark.pg)
        if any(t in code for t in _E2E):
            item.add_marker(pytest.mark.e2e)
        if any(t in code for t in _SLOW):
            item.add_marker(pytest.mark.slow)
