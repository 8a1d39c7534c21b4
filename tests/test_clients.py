"""Every client of docs/clients.md, through a real mitmdump with velvet at the stand-in.

Python (the openai SDK, requests, httpx), Node (the official openai npm SDK, in reverse mode and with
undici's EnvHttpProxyAgent; and Node's fetch ignoring HTTPS_PROXY), curl; reverse mode itself, and the
warning velvet gives when flows pass and none is captured. What velvet stored is compared with what the
client got back.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import requests
from support.pg import fresh_pg_url
from support.rig import API_KEY, ROOT, Proxy, bound, call_row, stored_batch, wait_for
from velvet_core.storage import models

NODE_DIR = ROOT / "tests" / "node"
MSG = [{"role": "user", "content": "Say hello to the proxy"}]


def batch_lines(prefix: str, n: int, bad: int | None = None) -> bytes:
    return b"".join(orjson.dumps({
        "custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "bad-model" if i == bad else "gpt-4o-mini",
                 "messages": [{"role": "user", "content": f"{prefix} line {i}"}]}}) + b"\n"
        for i in range(1, n + 1))


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's app: no proxy or OpenAI settings of ours, then ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if "proxy" not in k.lower() and not k.startswith(("OPENAI_", "NODE_", "SSL_CERT", "REQUESTS_CA"))}
    return {**env, **extra}


def proxy_for(request: pytest.FixtureRequest, standin, tmp_path_factory, **kw: Any) -> Proxy:
    tmp = tmp_path_factory.mktemp(f"{kw.get('mode') or 'regular'}-{request.param}".replace(":", "_")
                                  .replace("/", "_"))
    url = f"sqlite:///{tmp / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()
    return Proxy(url, standin.url, tmp, **kw).start()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def reverse(request, standin, tmp_path_factory):
    """``mitmdump --mode reverse:https://api.openai.com -s addon/velvet.py``, as ``scripts/run --reverse``."""
    p = proxy_for(request, standin, tmp_path_factory, mode="reverse:https://api.openai.com")
    yield p
    p.stop()


# -- Node ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_clients() -> Path:
    """tests/node installed with ``npm ci`` into a cache dir keyed by the lock file (once per lock)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed for the Node SDK tests: not found on PATH")
    manifest = (NODE_DIR / "package.json").read_bytes() + (NODE_DIR / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("VELVET_TEST_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "velvet-tests")
    home = cache / f"node-{hashlib.sha256(manifest).hexdigest()[:16]}"
    if not (home / "node_modules" / ".velvet-installed").exists():
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="node-install-", dir=cache))
        for name in ("package.json", "package-lock.json"):
            shutil.copy(NODE_DIR / name, work / name)
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=work,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            pytest.fail(f"npm ci of tests/node failed:\n{r.stdout}\n{r.stderr}")
        (work / "node_modules" / ".velvet-installed").touch()
        try:
            work.rename(home)
        except OSError:  # another run installed it meanwhile
            shutil.rmtree(work, ignore_errors=True)
    script = home / f"clients-{os.getpid()}.mjs"  # beside node_modules, so that imports resolve
    shutil.copy(NODE_DIR / "clients.mjs", script)
    yield script
    script.unlink(missing_ok=True)


def run_node(script: Path, mode: str, env: dict[str, str]) -> dict[str, Any]:
    r = subprocess.run(["node", str(script), mode], env=clean_env(VELVET_TEST_KEY=API_KEY, **env),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"node {mode} failed:\n{r.stdout}\n{r.stderr}"
    return orjson.loads(r.stdout.strip().splitlines()[-1])


def check_node_run(url: str, out: dict[str, Any]) -> None:
    """What the SDK got back is what velvet stored: ids, token counts, text, and every batch line."""
    chat = call_row(url, out["chat"]["request_id"])
    assert chat.host == "api.openai.com" and chat.endpoint == "chat.completions" and chat.status_code == 200
    assert orjson.loads(chat.response_body)["id"] == out["chat"]["id"] and chat.model == out["chat"]["model"]
    assert chat.input_tokens == out["chat"]["usage"]["prompt_tokens"]
    assert chat.output_tokens == out["chat"]["usage"]["completion_tokens"] and chat.cost_usd > 0
    assert "OpenAI/JS" in orjson.loads(chat.request_headers)["user-agent"]
    assert API_KEY not in chat.request_headers

    stream = call_row(url, out["stream"]["request_id"])
    assert stream.stream and stream.complete and stream.problem is None
    assert stream.response_text == out["stream"]["text"] == "Hello from the stand-in API."
    assert stream.input_tokens == out["stream"]["usage"]["prompt_tokens"]
    assert stream.output_tokens == out["stream"]["usage"]["completion_tokens"]

    b = out["batch"]
    assert b["status"] == "completed" and b["statuses"][-1] == "completed"
    got = stored_batch(url, b["id"], len(b["output_custom_ids"]) + len(b["error_custom_ids"]))
    assert got["custom_ids"] == b["custom_ids"]  # every input line, in order
    assert got["request_counts"] == b["request_counts"]
    assert got["events"] == b["statuses"]
    assert sorted(got["results"]) == sorted(b["output_custom_ids"] + b["error_custom_ids"])
    assert got["matched"] == {c: c for c in got["results"]}  # each answer linked to its own input line
    assert {c for c, r in got["results"].items() if r.failed} == set(b["error_custom_ids"]) == {"node-5"}
    inp, output = got["files"][b["file_id"]], got["files"][b["output_file_id"]]
    assert (inp.role, inp.lines, inp.bad_lines, inp.bytes, inp.complete) == ("input", 12, 0, b["file_bytes"], True)
    assert output.role == "output" and output.lines == 11 and output.complete


def test_node_sdk_in_reverse_mode(reverse, node_clients):
    """No code change: OPENAI_BASE_URL=http://127.0.0.1:PORT/v1, no proxy, no CA."""
    out = run_node(node_clients, "reverse", reverse.env())
    check_node_run(reverse.db_url, out)


def test_node_sdk_with_env_http_proxy_agent(proxy, node_clients):
    """Regular mode: HTTPS_PROXY + NODE_EXTRA_CA_CERTS and undici's EnvHttpProxyAgent as global dispatcher."""
    out = run_node(node_clients, "agent", {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}",
                                           "NODE_EXTRA_CA_CERTS": str(proxy.ca)})
    check_node_run(proxy.db_url, out)


def test_node_fetch_ignores_https_proxy(node_clients, standin, tmp_path):
    """Node 20's fetch does not read HTTPS_PROXY: the SDK connects straight to its target, unlogged.

    The target is a local socket of ours (never the real API): it sees the direct connection, and the
    proxy sees nothing."""
    p = Proxy(f"sqlite:///{tmp_path / 'velvet.db'}", standin.url, tmp_path).start()
    direct = socket.create_server(("127.0.0.1", 0))
    hits: list[bytes] = []

    def accept() -> None:
        conn, _ = direct.accept()
        with conn:
            hits.append(conn.recv(5))  # a TLS ClientHello, meant for the API itself

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        out = run_node(node_clients, "plain", {
            "HTTPS_PROXY": f"http://127.0.0.1:{p.port}", "NODE_EXTRA_CA_CERTS": str(p.ca),
            "OPENAI_BASE_URL": f"https://127.0.0.1:{direct.getsockname()[1]}/v1"})
        t.join(10)
    finally:
        direct.close()
        p.stop()
    assert out["chat"]["ok"] is False and "Connection error" in out["chat"]["error"]
    assert hits and hits[0][:1] == b"\x16"  # the handshake came straight to the target
    assert "/v1/chat/completions" not in p.output()  # and never to the proxy
    with bound(p.db_url):
        assert models.Call.select().count() == 0


def test_node_sdk_with_undici_fetch_cannot_upload(proxy, node_clients):
    """openai-node's own proxy recipe (undici's fetch with a ProxyAgent) makes calls but refuses uploads."""
    out = run_node(node_clients, "undici-fetch", {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}",
                                                  "NODE_EXTRA_CA_CERTS": str(proxy.ca)})
    assert out["chat"]["ok"] and out["chat"]["id"].startswith("chatcmpl-")
    assert out["upload"]["ok"] is False
    assert "does not support file uploads with the current global FormData" in out["upload"]["error"]


# -- Python ----------------------------------------------------------------------------------------


def test_python_sdk_in_reverse_mode(reverse, monkeypatch):
    """The openai SDK reads OPENAI_BASE_URL: chat, a stream, and a legacy completions stream."""
    client = reverse.client(monkeypatch)
    assert str(client.base_url) == reverse.base_url + "/"
    r = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
    c = r.parse()
    row = call_row(reverse.db_url, r.headers["x-request-id"])
    assert row.host == "api.openai.com" and row.path == "/v1/chat/completions"
    assert row.input_tokens == c.usage.prompt_tokens and row.output_tokens == c.usage.completion_tokens
    assert orjson.loads(row.response_body)["id"] == c.id and row.problem is None

    with client.completions.with_streaming_response.create(
            model="gpt-3.5-turbo-instruct", prompt="Once upon a time", stream=True,
            stream_options={"include_usage": True}) as s:
        rid = s.headers["x-request-id"]
        chunks = list(s.parse())
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    usage = next(ch.usage for ch in chunks if ch.usage)
    row = call_row(reverse.db_url, rid)
    assert row.endpoint == "completions" and row.stream and row.complete and row.problem is None
    assert row.response_text == text == "Hello from the stand-in API."
    assert orjson.loads(row.response_body)["choices"][0]["text"] == text
    assert row.finish_reason == "stop" and row.ttft_ms is not None
    assert (row.input_tokens, row.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)


def test_requests(proxy, monkeypatch):
    """requests honours HTTPS_PROXY and REQUESTS_CA_BUNDLE: a call and a multipart batch upload."""
    for k in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(proxy.ca))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = requests.post("https://api.openai.com/v1/chat/completions", headers=auth, timeout=30,
                      json={"model": "gpt-4o-mini", "messages": MSG})
    assert r.status_code == 200
    row = call_row(proxy.db_url, r.headers["x-request-id"])
    assert row.output_tokens == r.json()["usage"]["completion_tokens"] and "python-requests" in row.request_headers
    data = batch_lines("rq", 7)
    r = requests.post("https://api.openai.com/v1/files", headers=auth, timeout=30,
                      files={"file": ("rq.jsonl", data)}, data={"purpose": "batch"})
    fid = r.json()["id"]
    with_lines = wait_for(lambda: (f := _file(proxy.db_url, fid)) and f.lines is not None and f, what="lines")
    assert with_lines.role == "input" and with_lines.lines == 7 and with_lines.complete
    assert _custom_ids(proxy.db_url, fid) == [f"rq-{i}" for i in range(1, 8)]


def test_httpx(proxy, monkeypatch):
    """httpx honours HTTPS_PROXY and SSL_CERT_FILE (trust_env): a call and a stream."""
    for k in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=30) as http:
        r = http.post("https://api.openai.com/v1/embeddings", headers=auth,
                      json={"model": "text-embedding-3-small", "input": ["a b", "c"]})
        row = call_row(proxy.db_url, r.headers["x-request-id"])
        assert row.endpoint == "embeddings" and row.input_tokens == r.json()["usage"]["prompt_tokens"] == 3
        assert "python-httpx" in row.request_headers
        body = {"model": "gpt-4o-mini", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", "https://api.openai.com/v1/chat/completions", headers=auth, json=body) as s:
            rid = s.headers["x-request-id"]
            events = [orjson.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    row = call_row(proxy.db_url, rid)
    assert row.stream and row.complete and row.response_text == text == "Hello from the stand-in API."
    assert row.output_tokens == events[-1]["usage"]["completion_tokens"]


def test_requests_and_httpx_in_reverse_mode(reverse, monkeypatch):
    """In reverse mode a plain HTTP client only needs the base URL: no proxy, no CA."""
    for k in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(k)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "gpt-4o-mini", "messages": MSG}
    r1 = requests.post(f"{reverse.base_url}/chat/completions", headers=auth, json=body, timeout=30)
    with httpx.Client(timeout=30) as http:
        r2 = http.post(f"{reverse.base_url}/chat/completions", headers=auth, json=body)
    for r, agent in ((r1, "python-requests"), (r2, "python-httpx")):
        row = call_row(reverse.db_url, r.headers["x-request-id"])
        assert row.host == "api.openai.com" and agent in row.request_headers
        assert orjson.loads(row.response_body)["id"] == r.json()["id"]


def _file(url: str, fid: str) -> models.File | None:
    with bound(url):
        return models.File.get_or_none(models.File.id == fid)


def _custom_ids(url: str, fid: str) -> list[str]:
    with bound(url):
        return [r.custom_id for r in models.BatchRequest.select().where(models.BatchRequest.file_id == fid)
                .order_by(models.BatchRequest.line_no)]


# -- curl ------------------------------------------------------------------------------------------


def curl(*args: str, env: dict[str, str]) -> bytes:
    if not shutil.which("curl"):
        pytest.skip("curl is needed for the curl tests: not found on PATH")
    r = subprocess.run(["curl", "-sS", "--fail-with-body", *args], env=clean_env(**env), capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_curl_batch_cycle(proxy, tmp_path):
    """curl with HTTPS_PROXY and --cacert: a multipart upload (file before purpose), a batch, its output."""
    env = {"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}"}
    tls = ["--cacert", str(proxy.ca), "-H", f"Authorization: Bearer {API_KEY}"]
    (tmp_path / "batch.jsonl").write_bytes(batch_lines("curl", 9, bad=2))
    f = orjson.loads(curl(*tls, "https://api.openai.com/v1/files", "-F", f"file=@{tmp_path / 'batch.jsonl'}",
                          "-F", "purpose=batch", env=env))
    b = orjson.loads(curl(*tls, "https://api.openai.com/v1/batches", "-H", "Content-Type: application/json",
                          "-d", orjson.dumps({"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h"}).decode(), env=env))
    while b["status"] != "completed":
        b = orjson.loads(curl(*tls, f"https://api.openai.com/v1/batches/{b['id']}", env=env))
    out = curl(*tls, "--compressed", "-H", "x-standin-gzip: 1",
               f"https://api.openai.com/v1/files/{b['output_file_id']}/content", env=env)
    err = curl(*tls, f"https://api.openai.com/v1/files/{b['error_file_id']}/content", env=env)
    ids = [orjson.loads(line)["custom_id"] for line in (out + err).splitlines()]
    got = stored_batch(proxy.db_url, b["id"], len(ids))
    assert got["custom_ids"] == [f"curl-{i}" for i in range(1, 10)]
    assert sorted(got["results"]) == sorted(ids) and got["matched"] == {c: c for c in ids}
    assert [c for c, r in got["results"].items() if r.failed] == ["curl-2"]
    assert got["files"][f["id"]].purpose == "batch" and got["files"][f["id"]].lines == 9


def test_curl_in_reverse_mode(reverse):
    """curl straight at the reverse proxy (plain HTTP): a call and a stream."""
    auth = ["-H", f"Authorization: Bearer {API_KEY}", "-H", "Content-Type: application/json", "-D", "-"]
    raw = curl(*auth, f"{reverse.base_url}/chat/completions", "-d",
               orjson.dumps({"model": "gpt-4o-mini", "messages": MSG}).decode(), env={})
    head, _, body = raw.partition(b"\r\n\r\n")
    rid = next(line.split(b":", 1)[1].strip().decode() for line in head.splitlines()
               if line.lower().startswith(b"x-request-id:"))
    row = call_row(reverse.db_url, rid)
    assert orjson.loads(row.response_body)["id"] == orjson.loads(body)["id"] and "curl/" in row.request_headers
    raw = curl(*auth, "-N", f"{reverse.base_url}/chat/completions", "-d", orjson.dumps(
        {"model": "gpt-4o-mini", "messages": MSG, "stream": True}).decode(), env={})
    rid = next(line.split(b":", 1)[1].strip().decode() for line in raw.splitlines()
               if line.lower().startswith(b"x-request-id:"))
    row = call_row(reverse.db_url, rid)
    assert row.stream and row.complete and row.response_text == "Hello from the stand-in API."


# -- reverse mode to a host velvet does not capture ------------------------------------------------


def test_reverse_mode_to_an_unlisted_host_warns_once(standin, tmp_path, monkeypatch):
    """The target is the host velvet sees: unlisted, nothing is captured and velvet says how to fix it."""
    from velvet_core.addon import UNCAPTURED_FLOWS

    target = f"reverse:{standin.url}"  # host 127.0.0.1
    p = Proxy(f"sqlite:///{tmp_path / 'velvet.db'}", standin.url, tmp_path, mode=target).start()
    try:
        client = p.client(monkeypatch)
        for _ in range(UNCAPTURED_FLOWS + 3):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        wait_for(lambda: "none was captured" in p.output(), what="the warning")
    finally:
        p.stop()
    log = p.output()
    assert log.count("none was captured") == 1
    assert f"this proxy saw 127.0.0.1 ({UNCAPTURED_FLOWS})" in log
    assert "--set velvet_hosts=api.openai.com --set velvet_hosts=127.0.0.1" in log
    with bound(p.db_url):
        assert models.Call.select().count() == 0

    (tmp_path / "again").mkdir()
    fixed = Proxy(f"sqlite:///{tmp_path / 'velvet.db'}", standin.url, tmp_path / "again", mode=target,
                  extra=["--set", "velvet_hosts=api.openai.com", "--set", "velvet_hosts=127.0.0.1"]).start()
    try:
        r = fixed.client(monkeypatch).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
        row = call_row(fixed.db_url, r.headers["x-request-id"])
    finally:
        fixed.stop()
    assert row.host == "127.0.0.1" and row.output_tokens == 5 and "none was captured" not in fixed.output()

