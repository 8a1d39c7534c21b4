"""``scripts/demo`` works offline from the repository, as a new user would run it."""

from __future__ import annotations

import os
import re
import subprocess

import orjson
from rig import ROOT
from velvet_core.query.cli import main


def test_demo(tmp_path, capsys):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "OPENAI_API_KEY"}
    r = subprocess.run([str(ROOT / "scripts" / "demo"), "--dir", str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"batch_\w+: validating → in_progress → finalizing → completed", out)
    row = r"^batch_\w+\s+completed\s+/v1/chat/completions\s+gpt-4o-mini\S*\s+.*\s20\s+18\s+2\s+3m 0s\s+\$"
    assert re.search(row, out, re.M)
    assert "Live calls" in out and "TURNAROUND P50" in out and "Traceback" not in r.stderr
    url = f"sqlite:///{tmp_path / 'velvet.db'}"
    assert main(["--db", url, "sql", "SELECT count(*) AS n FROM calls", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out) == [{"n": 12}]
