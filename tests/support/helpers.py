"""Small helpers the test files share: a snapshot factory, the CLI run in-process, JSONL and multipart bodies."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from velvet_core.cli import main
from velvet_core.cost.prices import Pricer
from velvet_core.parsing.classify import classify
from velvet_core.processing.processor import Processor
from velvet_core.storage import models
from velvet_core.storage.snapshot import CallSnapshot
from velvet_core.writer.writer import Writer

from support.rig import bound


def snapshot(path: str = "/v1/chat/completions", method: str = "POST", **fields: Any) -> CallSnapshot:
    """A finished flow's snapshot: ``path`` classified, the rest of the fields empty unless given."""
    base: dict[str, Any] = {"flow_id": "f1", "method": method, "host": "api.openai.com", "path": path,
                            "route": classify(method, path), "key_fingerprint": None, "tags": {},
                            "request_headers": {}, "request_body": None, "request_encoding": None,
                            "started_at": 1.0}
    return CallSnapshot(**{**base, **fields})


def run(capsys: Any, *args: str) -> tuple[int, str, str]:
    """``velvet ARGS`` in this process: exit status, standard output, standard error."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def js(capsys: Any, *args: str) -> Any:
    """``velvet ARGS --json``, which must succeed, parsed."""
    code, out, err = run(capsys, *args, "--json")
    assert code == 0, err
    return orjson.loads(out)


def jsonl(objs: list[Any]) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def multipart_body(boundary: str, parts: list[tuple[str, str | None, bytes]], content_type: bool = True) -> bytes:
    """A multipart/form-data body of ``(name, filename or None, value)`` parts."""
    out = b""
    for name, filename, value in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename and content_type:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


class Refused:
    """A value no database driver can bind."""


# -- the writer, with chat calls -----------------------------------------------------------------

def chat(i: int, model: str = "gpt-4o-mini", extra: bytes = b"") -> CallSnapshot:
    """A finished, answered chat completions call (flow ``flow-<i>``)."""
    path = "/v1/chat/completions"
    body = b'{"model":"%s","messages":[{"role":"user","content":"hi %d"}]%s}' % (model.encode(), i, extra)
    resp = (b'{"id":"chatcmpl-%d","object":"chat.completion","model":"gpt-4o-mini-2024-07-18",'
            b'"choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],'
            b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}' % i)
    now = time.time()
    return snapshot(path, flow_id=f"flow-{i}", key_fingerprint="fp",
                    request_headers={"content-type": "application/json"}, request_body=body, started_at=now,
                    ended_at=now + 0.01, status_code=200,
                    response_headers={"content-type": "application/json"}, response_body=resp)


def headers_with(s: CallSnapshot, headers: dict[str, str]) -> CallSnapshot:
    s.request_headers = {**s.request_headers, **headers}
    return s


def start_writer(url: str, spool: Path, snaps: list[CallSnapshot], **kw: Any) -> Writer:
    """A writer thread given ``snaps``, stopped once they are written."""
    w = Writer(url, Processor(Pricer()).operations, spool_dir=spool, **kw)
    w.start()
    for s in snaps:
        w.submit(s)
    assert w.stop(60)
    return w


def calls(url: str) -> dict[str, models.Call]:
    """The stored calls by flow id."""
    with bound(url):
        return {c.flow_id: c for c in models.Call.select()}


def q(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of ``sql`` on a read-only connection to ``url``."""
    from velvet_core.storage.database import open_readonly
    from velvet_core.storage.sql import rows

    db = open_readonly(url)
    try:
        return rows(db, sql, params)
    finally:
        db.close()
