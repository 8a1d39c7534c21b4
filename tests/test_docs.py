"""The generated references in docs/ are current, and ``scripts/docs --check`` (run by scripts/lint) catches a
stale one."""

from __future__ import annotations

import shutil
import subprocess

from support.rig import ROOT

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
                "compare", "alerts", "alerts check", "report", "rebuild", "ask"):
        assert f"`velvet {cmd}`\n\n```text\nusage: velvet {cmd} " in text, cmd


def test_readme_lists_the_dependencies_of_pyproject():
    """README's dependency list is pyproject.toml's, no more, no less (requirement names with their extras)."""
    import re
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.\-]+(\[[^\]]*\])?", d).group(0) for d in declared}
    readme = (ROOT / "README.md").read_text()
    para = readme[readme.index("Its dependencies, as `pyproject.toml` declares them:"):]
    para = para[:para.index(".\n") if ".\n" in para[:400] else para.index(". ")]
    listed = set(re.findall(r"`([^`]+)`", para.split(":", 1)[1]))
    assert listed == names


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    import re
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_is_short_and_its_links_and_docs_links_resolve():
    import re

    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    anchors = {p.resolve(): {_slug(h) for h in re.findall(r"^#+ (.+)$", p.read_text(), re.M)} for p in pages}
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page.resolve()
            assert dest.exists(), (page.name, target)
            if anchor:
                assert anchor in anchors.get(dest, set()), (page.name, target)
