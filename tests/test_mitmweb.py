"""mitmweb for real: a batch through ``mitmweb -s addon/velvet.py``, checked through mitmweb's JSON API."""

from __future__ import annotations

import io
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from mitmproxy.utils import emoji
from support.rig import Proxy, free_port, wait_for
from velvet_core.processing import markers

MITMWEB = Path(sys.executable).with_name("mitmweb")
PASSWORD = "velvet-test-pw"
E = emoji.emoji  # mitmweb sends the emoji for a marker name


class WebAPI:
    """mitmweb's REST API with the password as a bearer token (stdlib only, no proxy)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, **params: Any) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {PASSWORD}"})
        with self.opener.open(req, timeout=30) as r:
            return orjson.loads(r.read())


@pytest.fixture(scope="module")
def web(standin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mitmweb")
    port = free_port()
    proxy = Proxy(f"sqlite:///{tmp / 'velvet.db'}", standin.url, tmp, program=MITMWEB, extra=[
        "--web-host", "127.0.0.1", "--web-port", str(port), "--no-web-open-browser",
        "--set", f"web_password={PASSWORD}", "--set", "web_columns=path", "--set", "web_columns=comment"])
    proxy.start()
    api = WebAPI(port)
    wait_for(lambda: api.get("/flows") is not None, what="mitmweb's API")
    yield proxy, api
    proxy.stop()


def test_comments_markers_and_view_in_mitmweb(web, monkeypatch):
    proxy, api = web
    client = proxy.client(monkeypatch)
    data = b"".join(orjson.dumps({"custom_id": f"w-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": "bad-model" if i == 3 else "gpt-4o-mini",
                                           "messages": [{"role": "user", "content": f"web {i}"}]}}) + b"\n"
                    for i in range(1, 31))
    f = client.files.create(file=("web.jsonl", io.BytesIO(data)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status != "completed":
        b = client.batches.retrieve(b.id)
    client.files.content(b.output_file_id).read()
    c = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])

    def flows_with_comments():
        flows = api.get("/flows")
        return flows if len(flows) >= 7 and all(fl["comment"] for fl in flows) else None

    flows = wait_for(flows_with_comments, what="comments on every flow")
    by_path = {}
    for fl in flows:
        by_path.setdefault((fl["request"]["method"], fl["request"]["path"]), []).append(fl)
    [upload] = by_path[("POST", "/v1/files")]
    assert upload["comment"] == f"batch input · 30 lines · {f.id}" and upload["marked"] == E[markers.UPLOAD]
    polls = by_path[("GET", f"/v1/batches/{b.id}")]
    assert [p["comment"] for p in polls][-1].startswith(f"batch {b.id}: finalizing → completed (29/30 done")
    assert polls[-1]["marked"] == E[markers.DONE] and polls[0]["marked"] == E[markers.POLL]
    assert any("validating → in_progress" in p["comment"] for p in polls)
    [download] = by_path[("GET", f"/v1/files/{b.output_file_id}/content")]
    assert download["comment"] == f"batch output · 29 lines · {b.output_file_id}"
    assert download["marked"] == E[markers.DOWNLOAD]
    [chat] = by_path[("POST", "/v1/chat/completions")]
    assert chat["comment"].startswith(f"chat {c.model} · {c.usage.total_tokens} tok · $") and chat["marked"] == ""
    assert "🔴" not in {fl["marked"] for fl in flows}  # every marker is a name mitmweb knows

    view = api.get(f"/flows/{download['id']}/response/content/auto.json", lines=5000)
    assert view["view_name"] == "Batch JSONL"
    text = "\n".join(line[1] if isinstance(line, list) else str(line) for line in view["text"]) \
        if isinstance(view["text"], list) else view["text"]
    assert "Batch file content · 29 lines" in text and "the first 10 shown" in text
    assert text.count("# line ") == 10 and "… 19 more lines" in text
    up = api.get(f"/flows/{upload['id']}/request/content/auto.json", lines=40)
    assert up["view_name"] == "Batch JSONL" and "File upload web.jsonl · 30 lines" in str(up["text"])

    assert "velvet.summary" in api.get("/commands")  # in mitmweb's command bar


def test_compressed_download_is_viewable_in_mitmweb(web, monkeypatch):
    """A gzip-compressed output file (as the API sends the SDKs') stays in the flow: no "content missing"."""
    proxy, api = web
    client = proxy.client(monkeypatch)
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    data = b"".join(orjson.dumps({"custom_id": f"gz-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": ask}) + b"\n" for i in range(1, 13))
    f = client.files.create(file=("gz.jsonl", io.BytesIO(data)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status != "completed":
        b = client.batches.retrieve(b.id)
    r = client.files.with_raw_response.content(b.output_file_id, extra_headers={"x-standin-gzip": "1"})
    assert r.headers["content-encoding"] == "gzip" and len(r.content.splitlines()) == 12
    path = f"/v1/files/{b.output_file_id}/content"

    def download_flow():
        return next((fl for fl in api.get("/flows") if fl["request"]["path"] == path and fl["comment"]), None)

    fl = wait_for(download_flow, what="the download's flow with its comment")
    assert fl["comment"] == f"batch output · 12 lines · {b.output_file_id}"
    view = api.get(f"/flows/{fl['id']}/response/content/auto.json", lines=100)
    assert view["view_name"] == "Batch JSONL" and "Batch file content · 12 lines" in str(view["text"])
