"""The package's shape: data flows one way (capture -> writer -> processing -> storage), each layer imports
only the layers below it (no circles), and the writer's modules do not import mitmproxy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "addon" / "velvet_core"

# Leaf modules any layer may use (they import no other part of velvet_core but each other's constants).
LEAVES = ("config", "humanize", "redact", "pids", "jsonout", "private", "secret_names", "clock")
# The layers, bottom first: each may import only the layers before it (and the leaves). The data path is
# capture (hooks) -> storage.snapshot -> writer -> processing -> storage (store); the commands read storage.
LAYERS = ("parsing", "cost", "api", "storage", "processing", "writer", "capture", "query", "alerts", "evals",
          "experiments", "sync", "jobs", "report", "cache", "ask", "options", "addon", "serve", "script", "cli")


def velvet_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("velvet_core."):
            out.add(node.module.removeprefix("velvet_core."))
        elif isinstance(node, ast.ImportFrom) and node.module == "velvet_core":
            out.update(a.name for a in node.names)
    return out


def _layer_of(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def test_layers_import_only_downstream():
    wrong = []
    for path in PKG.rglob("*.py"):
        me = _layer_of(path)
        if me in LEAVES or me == "__init__":
            continue
        below = LAYERS[:LAYERS.index(me)]
        for mod in velvet_imports(path):
            top = mod.split(".")[0]
            if top in (me, *LEAVES, "__version__", "SCHEMA") or top in below:
                continue
            wrong.append(f"{path.relative_to(PKG)} ({me}) imports velvet_core.{mod}")
    assert not wrong, "\n".join(wrong)


def test_leaves_import_no_layer():
    for name in LEAVES:
        assert {m.split(".")[0] for m in velvet_imports(PKG / f"{name}.py")} <= {*LEAVES, "__version__"}, name


def test_every_module_is_in_a_layer():
    found = {p.name.removesuffix(".py") for p in PKG.glob("*.py")} - {"__init__"}
    found |= {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert found == {*LAYERS, *LEAVES}


def test_every_module_says_its_job():
    for path in PKG.rglob("*.py"):
        if path.name != "__init__.py" or path.stat().st_size:
            assert ast.get_docstring(ast.parse(path.read_text())), path


def test_writer_thread_modules_do_not_import_mitmproxy():
    code = ("import sys; import velvet_core.processing.processor, velvet_core.writer.writer, "
            "velvet_core.storage.store; print(sorted(m for m in sys.modules if m.startswith('mitmproxy')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_the_proxy_side_loads_no_database_code():
    """mitmproxy's process imports the addon; with the writer in its own process it never touches the database,
    so peewee, psycopg and the price data stay out of its heap (each full garbage collection walks it)."""
    code = ("import sys; import velvet_core.addon, velvet_core.writer.child; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('peewee', 'playhouse', 'psycopg', 'sqlite3', 'genai_prices', 'tiktoken', 'pygal')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_no_byte_string_is_searched_with_in():
    """``b"x" in data`` first tries the needle as an int (CPython 3.12's bytes_contains), raising and clearing a
    TypeError each time: 0.4-0.7 us, on the event loop for every call where it stood (the response's content type,
    the cache key's float check). The package searches bytes with ``.find()``, or a byte's value (``ord``)."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) \
                    and isinstance(node.left.value, bytes) and isinstance(node.ops[0], ast.In | ast.NotIn):
                found.append(f"{path.relative_to(PKG)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "search bytes with .find() or a byte's ord():\n" + "\n".join(found)


def test_only_a_database_of_the_tests_own_has_its_connections_cut():
    """scripts/test runs test files side by side, in one PostgreSQL database (a schema per test): a test that cut
    every connection to it (a server restart, as its clients see it) ended other tests' connections mid-query. Such
    a test uses support.pg.cut_connections, which refuses the shared database, in a database of its own."""
    tests = Path(__file__).resolve().parent
    found = [str(p.relative_to(tests)) for p in sorted(tests.rglob("*.py"))
             if "pg_terminate_backend" in p.read_text() and p != tests / "support" / "pg.py"
             and p != Path(__file__).resolve()]
    assert not found, "cut connections with support.pg.cut_connections (a database of the test's own):\n" + \
        "\n".join(found)


def test_wheel_ships_the_package_only(tmp_path):
    """The stand-in API and the tests stay out of what users install."""
    import zipfile

    root = PKG.parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(root),
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("velvet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if n.endswith(".py")]
    assert code and all(n.startswith("velvet_core/") for n in code)
    assert not [n for n in names if "standin" in n or n.startswith("tests/")]
    # the tokenizer's encodings, which tiktoken would otherwise download
    assert {"velvet_core/cost/encodings/o200k_base.tiktoken.gz",
            "velvet_core/cost/encodings/cl100k_base.tiktoken.gz"} <= set(names)
