"""``scripts/run`` as a user runs it: reverse mode (OpenAI and Azure targets) and ``--web``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import orjson
import pytest
from support.rig import API_KEY, ROOT, ROUTE, call_row, free_port

MSG = [{"role": "user", "content": "Say hello to the proxy"}]


class Run:
    """``scripts/run ARGS`` (which execs mitmdump or mitmweb) with its output in a file."""

    def __init__(self, tmp: Path, args: list[str]) -> None:
        self.port = free_port()
        self.out = tmp / "run.log"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("VELVET_")}
        env.update(VELVET_PORT=str(self.port), MITMPROXY_CONFDIR=str(tmp / "conf"))
        with open(self.out, "wb") as log:
            self.proc = subprocess.Popen([str(ROOT / "scripts" / "run"), *args], stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"scripts/run did not listen: {self.output()}")

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def standin_args(standin, host: str = "api.openai.com") -> list[str]:
    return ["--set", "connection_strategy=lazy", "--map-remote", f"|https://{re.escape(host)}/|{standin.url}/",
            "-s", str(ROUTE), "--set", f"standin_url={standin.url}", "--set", f"standin_hosts={host}"]


def test_run_reverse_prints_the_base_url_and_captures(standin, tmp_path, monkeypatch):
    db = f"sqlite:///{tmp_path / 'velvet.db'}"
    run = Run(tmp_path, ["--reverse", "--set", f"velvet_db={db}", *standin_args(standin)])
    try:
        banner = run.output()
        m = re.search(r"export OPENAI_BASE_URL=(\S+)", banner)
        assert m and m.group(1) == f"http://127.0.0.1:{run.port}/v1", banner
        assert "no CA to trust" in banner and "HTTPS_PROXY" not in banner
        with pytest.raises(OSError):  # on 127.0.0.1 only: another loopback address is refused
            socket.create_connection(("127.0.0.2", run.port), 1).close()
        for k in [k for k in os.environ if "proxy" in k.lower()]:
            monkeypatch.delenv(k)
        monkeypatch.setenv("OPENAI_BASE_URL", m.group(1))  # what the banner says, and nothing else
        r = openai.OpenAI(api_key=API_KEY, max_retries=0).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MSG)
        row = call_row(db, r.headers["x-request-id"])
    finally:
        run.stop()
    assert row.host == "api.openai.com" and row.output_tokens == r.parse().usage.completion_tokens
    assert "reverse proxy to https://api.openai.com listening at 127.0.0.1" in run.output()


def test_run_reverse_to_azure(standin, tmp_path, monkeypatch):
    """An Azure target: its host is added to velvet_hosts, and AzureOpenAI clients get their endpoint."""
    host = "velvetres.openai.azure.com"
    db = f"sqlite:///{tmp_path / 'velvet.db'}"
    run = Run(tmp_path, ["--reverse", f"https://{host}", "--set", f"velvet_db={db}", *standin_args(standin, host)])
    try:
        m = re.search(r"export AZURE_OPENAI_ENDPOINT=(\S+)", run.output())
        assert m and m.group(1) == f"http://127.0.0.1:{run.port}", run.output()
        for k in [k for k in os.environ if "proxy" in k.lower() or k.startswith(("AZURE_", "OPENAI_"))]:
            monkeypatch.delenv(k)
        monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", m.group(1))
        client = openai.AzureOpenAI(api_key="0123456789abcdef0123456789abcdef", api_version="2024-10-21",
                                    max_retries=0)
        r = client.chat.completions.with_raw_response.create(model="chat-prod", messages=MSG)
        row = call_row(db, r.headers["x-request-id"])
    finally:
        run.stop()
    assert row.host == host and row.deployment == "chat-prod" and row.model == "gpt-4o-mini-2024-07-18"


def test_run_web(standin, tmp_path):
    """mitmweb with the comment column and a generated password, printed once and never on the command line."""
    web_port = free_port()
    db = f"sqlite:///{tmp_path / 'velvet.db'}"
    run = Run(tmp_path, ["--web", "--web-port", str(web_port), "--no-web-open-browser",
                         "--set", f"velvet_db={db}", *standin_args(standin)])
    try:
        out = run.output()
        m = re.search(rf"http://127\.0\.0\.1:{web_port}/\?token=(\S+)", out)
        assert m, out
        password = m.group(1)
        assert out.count(password) == 1
        cmdline = Path(f"/proc/{run.proc.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline and b"web_password=$argon2" in cmdline

        def get(path: str, token: str) -> bytes:
            req = urllib.request.Request(f"http://127.0.0.1:{web_port}{path}",
                                         headers={"Authorization": f"Bearer {token}"})
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            deadline = time.monotonic() + 30
            while True:
                try:
                    with opener.open(req, timeout=30) as r:
                        return r.read()
                except urllib.error.URLError as e:
                    if isinstance(e, urllib.error.HTTPError) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)  # the web server may start after the proxy

        options = orjson.loads(get("/options", password))
        assert "comment" in options["web_columns"]["value"] and "path" in options["web_columns"]["value"]
        assert orjson.loads(get("/flows", password)) == []
        with pytest.raises(urllib.error.HTTPError) as ei:
            get("/flows", "not-the-password")
        assert ei.value.code == 403
    finally:
        run.stop()
