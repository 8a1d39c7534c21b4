"""What a command imports before it answers: only what it needs (issue 27). A fresh interpreter runs the CLI and
lists the modules it loaded, so that a later change cannot quietly bring a heavy import back."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from support.pg import fresh_pg_url
from velvet_core.storage.database import open_db

PROBE = """
import sys
from velvet_core.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
sys.stdout.flush()
sys.stderr.write("\\nMODULES " + " ".join(sorted(sys.modules)) + "\\n")
"""
# imported by their own commands only
HEAVY = ("psycopg", "tiktoken", "pygal", "httpx", "httpx2", "mitmproxy", "velvet_core.alerts.commands",
         "velvet_core.alerts.evaluate", "velvet_core.experiments.commands", "velvet_core.experiments.replay",
         "velvet_core.experiments.judge", "velvet_core.experiments.compare", "velvet_core.experiments.export",
         "velvet_core.report.commands", "velvet_core.report.charts", "velvet_core.cost", "velvet_core.writer",
         "velvet_core.processing", "velvet_core.capture", "velvet_core.parsing")


def loaded(*argv: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    line = out.stderr.rsplit("MODULES ", 1)[1]
    return set(line.split())


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["batches", "--help"], ["report", "--help"]])
def test_help_and_version_import_no_command_and_no_database(argv):
    modules = loaded(*argv)
    assert "velvet_core.cli" in modules  # the probe ran the CLI
    assert not heavy(modules)
    assert "peewee" not in modules and not any(m.startswith("velvet_core.storage.") and m != "velvet_core.storage"
                                               for m in modules)


@pytest.mark.parametrize("cmd", ["batches", "stats", "calls"])
def test_a_reading_command_on_sqlite_never_imports_psycopg(tmp_path, cmd):
    url = f"sqlite:///{tmp_path / 'v.db'}"
    open_db(url).close()
    probe = subprocess.run([sys.executable, "-c", PROBE, "--db", url, cmd, "--json"], capture_output=True,
                           text=True, timeout=60)
    assert orjson.loads(probe.stdout) is not None  # it answered
    modules = set(probe.stderr.rsplit("MODULES ", 1)[1].split())
    assert "peewee" in modules and "velvet_core.query.commands" in modules
    assert not heavy(modules)


def test_postgres_still_opens_after_peewee_was_imported_without_its_driver():
    pg_url = fresh_pg_url()
    # cli.py imports peewee with psycopg hidden; a PostgreSQL URL must still connect (the adapter imports it)
    code = ("import sys\nfrom velvet_core.storage.drivers import import_peewee\nimport_peewee()\n"
            "import peewee\nassert peewee.psycopg is None\n"
            "from velvet_core.storage.database import open_db\n"
            "db = open_db(sys.argv[1])\nprint(db.execute_sql('SELECT 41 + 1').fetchone()[0])\n"
            "print(list(db.execute_sql('SELECT 1')))\n")
    out = subprocess.run([sys.executable, "-c", code, pg_url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "42"
