"""``velvet show`` prints a call's URL as it was sent (issue 24 item 13a): scheme and port kept, through a
real mitmdump in reverse mode to a plain-HTTP server on a high port, on both backends; and the URL of a
call through the usual proxy (https, default port) and of a row from before schema v12."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
from support.rig import Proxy, call_row
from velvet_core.query.queries import call_url

VELVET = Path(sys.executable).with_name("velvet")
MSG = [{"role": "user", "content": "where am I?"}]


def test_show_keeps_scheme_and_port(db_url, standin, tmp_path, monkeypatch):
    port = int(standin.url.rsplit(":", 1)[1])
    p = Proxy(db_url, standin.url, tmp_path, mode=f"reverse:{standin.url}",
              extra=["--set", "velvet_hosts=127.0.0.1"]).start()
    try:
        r = p.client(monkeypatch).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
        rid = r.headers["x-request-id"]
        row = call_row(db_url, rid, timeout=60)
    finally:
        p.stop()
    assert (row.scheme, row.host, row.port) == ("http", "127.0.0.1", port)
    out = subprocess.run([str(VELVET), "--db", db_url, "show", rid], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"POST http://127.0.0.1:{port}/v1/chat/completions\n" in out.stdout


def test_show_through_the_proxy_is_https(proxy, monkeypatch):
    client: openai.OpenAI = proxy.client(monkeypatch)
    r = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
    row = call_row(proxy.db_url, r.headers["x-request-id"])
    assert (row.scheme, row.host, row.port) == ("https", "api.openai.com", 443)
    out = subprocess.run([str(VELVET), "--db", proxy.db_url, "show", r.headers["x-request-id"]],
                         capture_output=True, text=True, timeout=120)
    assert "POST https://api.openai.com/v1/chat/completions\n" in out.stdout


def test_call_url():
    assert call_url({"host": "h", "path": "/v1/x"}) == "https://h/v1/x"  # a row from before v12
    assert call_url({"scheme": "http", "host": "h", "port": 80, "path": "/p"}) == "http://h/p"
    assert call_url({"scheme": "https", "host": "h", "port": 8443, "path": "/p"}) == "https://h:8443/p"
    assert call_url({"scheme": "http", "host": "h", "port": 443, "path": "/p"}) == "http://h:443/p"
