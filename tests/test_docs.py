"""The generated references in docs/ are current, and ``scripts/docs --check`` (run by scripts/lint) catches a
stale one."""

from __future__ import annotations

import shutil
import subprocess

from rig import ROOT

DOCS = ("docs/cli.md", "docs/options.md")


def check(*files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "scripts" / "docs"), "--check", *files], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_generated_docs_are_current():
    r = check()
    assert r.returncode == 0, r.stdout + r.stderr


def test_stale_reference_is_caught(tmp_path):
    for name in DOCS:
        copy = tmp_path / name.replace("/", "_")
        shutil.copy(ROOT / name, copy)
        text = copy.read_text()
        end = text.index("<!-- [[[end]]] -->")
        line_start = text.rindex("\n", 0, text.rindex("\n", 0, end)) + 1  # the generated text's last line
        copy.write_text(text[:line_start] + "stale\n" + text[line_start:])
        r = check(str(copy))
        assert r.returncode != 0, name
        assert "run scripts/docs" in r.stdout + r.stderr, r.stdout + r.stderr
        assert "stale" in r.stdout  # --diff shows the difference


def test_cli_reference_covers_every_command():
    """Every command and subcommand of the parser has its section (the walk is recursive)."""
    text = (ROOT / "docs" / "cli.md").read_text()
    for cmd in ("batches", "batch", "lines", "show", "calls", "stats", "status", "sql", "export", "replay",
                "compare", "alerts", "alerts check", "report", "rebuild"):
        assert f"`velvet {cmd}`\n\n```text\nusage: velvet {cmd} " in text, cmd
