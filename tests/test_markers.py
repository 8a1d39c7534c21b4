"""The test loop's rules: markers come from what a test uses, and a PostgreSQL test never skips silently where
the whole suite runs (scripts/test, CI) but skips with a reason elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _pytest(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(
        "import pytest\nfrom support.pg import fresh_pg_url\n\n\n"
        "@pytest.mark.parametrize('backend', ['sqlite', 'postgres'])\n"
        "def test_pg(backend):\n    assert backend == 'sqlite' or fresh_pg_url()\n")
    base = {k: v for k, v in os.environ.items() if k not in ("VELVET_TEST_PG", "CI", "VELVET_REQUIRE_PG")}
    base["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", str(tmp_path), *args],
                          cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("env", "outcome"), [({}, "1 passed, 1 skipped"), ({"CI": "true"}, "1 failed, 1 passed"),
                                              ({"VELVET_REQUIRE_PG": "1"}, "1 failed, 1 passed")])
def test_a_postgres_test_without_a_server_skips_only_outside_the_full_suite(tmp_path, env, outcome):
    r = _pytest(tmp_path, env)
    assert outcome in r.stdout, r.stdout[-2000:]
    assert "scripts/test" in r.stdout  # the reason names the way to run it


def test_markers_follow_the_fixtures(request):
    items = {i.nodeid.split("::", 1)[1]: {m.name for m in i.iter_markers()} for i in request.session.items}
    pg = [n for n, m in items.items() if n.endswith("[postgres]") and "pg" not in m]
    assert not pg, pg[:5]
    sqlite_only = [n for n, m in items.items() if n.endswith("[sqlite]") and "pg" in m]
    assert not sqlite_only, sqlite_only[:5]
    assert {"e2e", "pg"} <= items.get("test_batches_json[postgres]", {"e2e", "pg"})
