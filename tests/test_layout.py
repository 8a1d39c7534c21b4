"""The package's shape: data flows one way (capture -> writer -> process -> storage), each layer imports
only the layers it may, and the writer thread's modules do not import mitmproxy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "addon" / "velvet_core"

# what each subpackage may import from velvet_core (besides itself and the leaf modules of LEAVES)
LEAVES = ("config", "humanize", "redact", "pids", "private", "secret_names")  # top-level modules any layer may use
ALLOWED = {
    "parsing": set(),
    "storage": {"parsing"},
    "process": {"parsing", "storage.ops", "capture.snapshot", "capture.markers"},
    "writer": {"storage", "parsing", "capture.snapshot", "capture.tap", "process.processor"},
    "capture": {"parsing", "process.processor", "storage.urls", "writer.writer", "writer.health",
                "writer.process", "query.summary", "alerts.rules", "alerts.runner"},
    # the velvet command wires in the experiments', alerts' and report's commands
    "query": {"storage", "experiments.commands", "alerts.cli", "report.cli"},
    "experiments": {"storage", "query", "parsing"},
    "alerts": {"storage", "query.queries"},
    "report": {"storage", "query.queries", "parsing", "alerts.history", "experiments.compare"},
}


def velvet_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("velvet_core."):
            out.add(node.module.removeprefix("velvet_core."))
        elif isinstance(node, ast.ImportFrom) and node.module == "velvet_core":
            out.update(a.name for a in node.names)
    return out


def test_layers_import_only_downstream():
    wrong = []
    for sub, allowed in ALLOWED.items():
        for path in (PKG / sub).glob("*.py"):
            for mod in velvet_imports(path):
                top = mod.split(".")[0]
                if top in (sub, *LEAVES, "__version__") or top in allowed or mod in allowed:
                    continue
                wrong.append(f"{sub}/{path.name} imports velvet_core.{mod}")
    assert not wrong, "\n".join(wrong)


def test_every_module_is_in_a_layer():
    loose = {p.name for p in PKG.glob("*.py")} - {"__init__.py", *(f"{m}.py" for m in LEAVES)}
    assert not loose, loose
    assert {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ALLOWED)


def test_writer_thread_modules_do_not_import_mitmproxy():
    code = ("import sys; import velvet_core.process.processor, velvet_core.writer.writer, "
            "velvet_core.storage.store; print(sorted(m for m in sys.modules if m.startswith('mitmproxy')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_the_proxy_side_loads_no_database_code():
    """mitmproxy's process imports the addon; with the writer in its own process it never touches the database,
    so peewee, psycopg and the price data stay out of its heap (each full garbage collection walks it)."""
    code = ("import sys; import velvet_core.capture.addon, velvet_core.writer.process; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('peewee', 'playhouse', 'psycopg', 'sqlite3', 'genai_prices', 'tiktoken', 'pygal')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


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
    assert {"velvet_core/parsing/encodings/o200k_base.tiktoken.gz",
            "velvet_core/parsing/encodings/cl100k_base.tiktoken.gz"} <= set(names)
