"""The ``velvet sql`` command on real databases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
from velvet_core.cli import main
from velvet_core.database import open_db

VELVET = Path(sys.executable).with_name("velvet")


def test_sql_json_and_readonly(db_url, capsys):
    open_db(db_url).close()
    assert main(["--db", db_url, "sql", "SELECT count(*) AS n FROM calls", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out) == [{"n": 0}]
    assert main(["sql", "DELETE FROM calls", "--db", db_url]) == 1  # read-only
    assert "velvet:" in capsys.readouterr().err


def test_console_script_errors_cleanly(tmp_path):
    r = subprocess.run([str(VELVET), "--db", f"sqlite:///{tmp_path}/missing.db", "sql", "SELECT 1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no database" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([str(VELVET), "--db", "mysql://x/y", "sql", "SELECT 1"], capture_output=True, text=True)
    assert r.returncode == 2 and "use sqlite" in r.stderr
