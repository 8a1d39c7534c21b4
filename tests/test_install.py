"""velvet as a team installs it: a wheel into a fresh venv outside the checkout (what ``pipx install`` does), then
``velvet proxy`` with no checkout at all, ``velvet addon-path`` and ``velvet proxy --service``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from support.rig import API_KEY, ROOT, call_row, free_port
from test_run_script import MSG, standin_args


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a fresh venv with velvet's wheel and its dependencies installed."""
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp)],
                   check=True, capture_output=True, cwd=tmp)
    (wheel,) = tmp.glob("velvet-*.whl")  # (a "wheel" built from the checkout)
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", str(tmp / "venv")], check=True)
    subprocess.run([str(tmp / "venv" / "bin" / "pip"), "install", "-q", str(wheel)], check=True,
                   capture_output=True, cwd=tmp, timeout=600)
    return tmp / "venv" / "bin"


def clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if "proxy" not in k.lower() and not k.startswith(("VELVET_", "PYTHON"))}
    env.update(HOME=str(tmp), MITMPROXY_CONFDIR=str(tmp / "conf"))
    return env


def test_the_installed_addon_is_the_installed_package(installed, tmp_path):
    out = subprocess.run([str(installed / "velvet"), "addon-path"], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=clean_env(tmp_path)).stdout.strip()
    path = Path(out)
    assert path.is_file() and path.is_relative_to(installed.parent) and path.name == "velvet.py"
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix == ".py") == ["velvet.py"]  # alone there
    code = "import velvet_core, sys; print(velvet_core.__file__)"
    where = subprocess.run([str(installed / "python"), "-c", code], capture_output=True, text=True,
                           cwd=tmp_path, env=clean_env(tmp_path), check=True).stdout
    assert where.startswith(str(installed.parent)) and str(ROOT) not in where


def test_velvet_proxy_from_the_installed_wheel_captures(installed, standin, tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path / 'velvet.db'}"
    port = free_port()
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(installed / "velvet"), "proxy", "--reverse", "--port", str(port),
                                 "--set", f"velvet_db={db}", *standin_args(standin)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=clean_env(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        banner = log.read_text()
        m = re.search(r"export OPENAI_BASE_URL=(\S+)", banner)
        assert m and m.group(1) == f"http://127.0.0.1:{port}/v1", banner
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert str(installed.parent).encode() in cmdline[0]  # mitmdump of the venv (velvet proxy exec'd it)
        assert any(a.endswith(b"site-packages/velvet_core/script/velvet.py") for a in cmdline)
        for k in [k for k in os.environ if "proxy" in k.lower()]:
            monkeypatch.delenv(k)
        client = openai.OpenAI(api_key=API_KEY, base_url=m.group(1), max_retries=0)
        r = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
        row = call_row(db, r.headers["x-request-id"])
        assert row.output_tokens == r.parse().usage.completion_tokens and row.cost_usd > 0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_service_unit_keeps_the_database_password_out(installed, tmp_path):
    secret = "s3cr3t-pw"
    for kind, target in (("user", "default.target"), ("system", "multi-user.target")):
        r = subprocess.run([str(installed / "velvet"), "proxy", f"--service={kind}", "--reverse", "--port", "9000",
                            "--set", f"velvet_db=postgresql://velvet:{secret}@db.example/velvet",
                            "--set", "velvet_body_limit=1000000"],
                           capture_output=True, text=True, cwd=tmp_path, env=clean_env(tmp_path), check=True)
        unit = r.stdout
        assert secret not in unit and secret not in r.stderr
        (exec_start,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
        assert exec_start.startswith(f"ExecStart={installed / 'velvet'} proxy --reverse https://api.openai.com "
                                     "--port 9000")
        assert "velvet_body_limit=1000000" in exec_start and "velvet_db" not in exec_start
        assert "#   VELVET_DB=postgresql://velvet:" in unit and "EnvironmentFile=-" in unit
        assert f"WantedBy={target}" in unit and "KillSignal=SIGINT" in unit
