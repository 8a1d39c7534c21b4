"""End to end: the official openai SDK -> mitmdump -s addon/velvet.py -> the stand-in API."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import orjson
import psycopg
import pytest
from peewee import Cast
from support.rig import API_KEY, bound, call_row, wait_for
from velvet_core.parsing.extract import key_fingerprint
from velvet_core.storage import models

FP = key_fingerprint({"authorization": f"Bearer {API_KEY}"})
MSG = [{"role": "user", "content": "Say hello to the proxy"}]


def test_chat_plain(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    r = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSG,
        extra_headers={"velvet-metadata-team": "search", "velvet-metadata-run": "42"})
    c = r.parse()
    assert c.choices[0].message.content == "Hello from the stand-in API."
    row = call_row(proxy.db_url, r.headers["x-request-id"])
    assert row.endpoint == "chat.completions" and row.action == "create"
    assert row.method == "POST" and row.path == "/v1/chat/completions" and row.host == "api.openai.com"
    assert row.model_requested == "gpt-4o-mini" and row.model == "gpt-4o-mini-2024-07-18"
    assert row.status_code == 200 and not row.stream and row.complete
    assert row.input_tokens == c.usage.prompt_tokens and row.output_tokens == c.usage.completion_tokens
    assert row.total_tokens == c.usage.total_tokens and row.cached_tokens == 0
    assert row.cost_usd is not None and row.cost_usd > 0
    assert row.finish_reason == "stop" and row.service_tier == "default"
    assert row.processing_ms == 12 and row.organization == "org-standin" and row.project == "proj_standin"
    assert row.rl_remaining_requests == 9999 and row.rl_reset_tokens == "2ms"
    assert row.key_fingerprint == FP
    assert orjson.loads(row.tags) == {"team": "search", "run": "42"}
    assert orjson.loads(row.request_body)["messages"] == MSG
    assert orjson.loads(row.response_body)["id"] == c.id
    assert row.latency_ms > 0 and row.first_byte_at >= row.started_at and row.ended_at >= row.first_byte_at
    assert "velvet-metadata" not in row.request_headers  # tags never go upstream or into headers
    assert row.problem is None


def test_chat_gzip_response(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    r = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSG, extra_headers={"x-standin-gzip": "1"})
    row = call_row(proxy.db_url, r.headers["x-request-id"])
    assert orjson.loads(row.response_headers)["content-encoding"] == "gzip"
    answer = r.parse().choices[0].message.content
    assert orjson.loads(row.response_body)["choices"][0]["message"]["content"] == answer
    assert row.output_tokens == 5


@pytest.mark.parametrize("gzip", [False, True])
def test_chat_stream(proxy, monkeypatch, gzip):
    client = proxy.client(monkeypatch)
    headers = {"x-standin-delay": "0.3", "x-standin-gzip": "1" if gzip else "0"}
    t0 = time.monotonic()
    arrivals, parts, usage = [], [], []
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MSG, stream=True, stream_options={"include_usage": True},
            extra_headers=headers) as r:
        request_id = r.headers["x-request-id"]
        for chunk in r.parse():
            arrivals.append(time.monotonic() - t0)
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage.append(chunk.usage)
    # unbuffered: the first chunk arrives long before the stand-in ends the stream (9 events x 0.3 s)
    assert arrivals[0] < arrivals[-1] - 1.5
    row = call_row(proxy.db_url, request_id)
    assert row.stream and row.complete and row.problem is None
    assert row.response_text == "".join(parts) == "Hello from the stand-in API."
    assert row.finish_reason == "stop" and row.output_tokens == usage[0].completion_tokens == 5
    assert row.input_tokens == usage[0].prompt_tokens
    assert row.cost_usd > 0
    assert row.ttft_ms is not None and 200 < row.ttft_ms < row.latency_ms - 1000
    assert orjson.loads(row.response_body)["choices"][0]["message"]["content"] == row.response_text


def test_responses_plain_and_stream(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    r = client.responses.with_raw_response.create(model="gpt-4.1-mini", input="Write one line")
    row = call_row(proxy.db_url, r.headers["x-request-id"])
    assert row.endpoint == "responses" and row.model == "gpt-4.1-mini" and row.finish_reason == "completed"
    assert row.input_tokens == 3 and row.output_tokens == 5 and row.reasoning_tokens == 0
    assert row.cost_usd > 0

    with client.responses.with_streaming_response.create(
            model="gpt-4.1-mini", input="Write one line", stream=True) as s:
        rid = s.headers["x-request-id"]
        text = "".join(e.delta for e in s.parse() if e.type == "response.output_text.delta")
    row = call_row(proxy.db_url, rid)
    assert row.stream and row.complete and row.response_text == text
    assert row.input_tokens == 3 and row.output_tokens == 5 and row.ttft_ms is not None
    assert orjson.loads(row.response_body)["status"] == "completed"


def test_embeddings(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    r = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a b c", "d e"])
    row = call_row(proxy.db_url, r.headers["x-request-id"])
    assert row.endpoint == "embeddings" and row.input_tokens == 5 and row.output_tokens is None
    assert row.total_tokens == 5 and row.cost_usd > 0


@pytest.mark.parametrize(("scenario", "status", "exc", "code"), [
    ("429", 429, openai.RateLimitError, "rate_limit_exceeded"),
    ("500", 500, openai.InternalServerError, None),
])
def test_errors(proxy, monkeypatch, scenario, status, exc, code):
    client = proxy.client(monkeypatch)
    with pytest.raises(exc) as ei:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                       extra_headers={"x-standin-scenario": scenario})
    row = call_row(proxy.db_url, ei.value.response.headers["x-request-id"])
    assert row.status_code == status and row.error_code == code
    assert row.error_message and row.error_type in ("requests", "server_error")
    assert row.cost_usd is None and row.input_tokens is None


def test_unauthorized_key_never_stored(proxy, monkeypatch):
    bad = "sk-bad-" + "z" * 40
    client = proxy.client(monkeypatch, api_key=bad)
    with pytest.raises(openai.AuthenticationError) as ei:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    row = call_row(proxy.db_url, ei.value.response.headers["x-request-id"])
    assert row.status_code == 401 and row.error_code == "invalid_api_key"
    assert row.key_fingerprint == key_fingerprint({"authorization": f"Bearer {bad}"})
    assert_nowhere(proxy, [bad, API_KEY])


def test_dropped_stream(proxy, monkeypatch):
    client = proxy.client(monkeypatch)
    marker = f"drop-{time.time()}"
    with pytest.raises(Exception):  # noqa: B017 - httpx raises a transport error
        for _ in client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": marker}], stream=True,
                extra_headers={"x-standin-scenario": "drop"}):
            pass

    def row():
        with bound(proxy.db_url):
            return models.Call.get_or_none(Cast(models.Call.request_body, "text").contains(marker))

    r = wait_for(row, what="dropped stream row")
    assert r.stream and not r.complete
    assert "truncated" in r.problem or "connection" in r.problem
    assert r.response_text  # what arrived before the cut is kept


def assert_nowhere(proxy, secrets_: list[str]) -> None:
    """No secret in any column of any table, nor in mitmdump's output."""
    with bound(proxy.db_url):
        for model in models.MODELS:
            for row in model.select().dicts():
                blob = orjson.dumps(row, default=str).decode()
                for s in secrets_:
                    assert s not in blob, f"API key stored in {model._meta.table_name}"
    out = proxy.output()
    for s in secrets_:
        assert s not in out


def test_pg_or_sqlite_file_has_no_key(proxy, monkeypatch):
    """A raw scan of the storage itself, beyond the ORM."""
    r = proxy.client(monkeypatch).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG)
    call_row(proxy.db_url, r.headers["x-request-id"])
    url = proxy.db_url
    if url.startswith("sqlite"):
        from velvet_core.storage.database import sqlite_path
        for suffix in ("", "-wal"):
            try:
                data = Path(sqlite_path(url) + suffix).read_bytes()
            except FileNotFoundError:
                continue
            assert API_KEY.encode() not in data
    else:
        with psycopg.connect(url.split("?")[0]) as conn:
            dump = conn.execute("SELECT string_agg(c::text, '') FROM (SELECT * FROM "
                                + _schema(url) + ".calls) c").fetchone()[0]
            assert dump and API_KEY not in dump


def _schema(url: str) -> str:
    return url.rsplit("%3D", 1)[1]


def test_nothing_lost_at_shutdown(standin, tmp_path, monkeypatch):
    """Rows still queued when mitmdump is told to stop are written before it exits."""
    from concurrent.futures import ThreadPoolExecutor

    from support.rig import Proxy

    url = f"sqlite:///{tmp_path / 'shutdown.db'}"
    p = Proxy(url, standin.url, tmp_path).start()
    client = p.client(monkeypatch)
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: client.embeddings.create(model="text-embedding-3-small", input=f"w {i}"),
                    range(40)))
    assert p.stop() == 0  # SIGINT right after the last answer
    with bound(url):
        assert models.Call.select().where(models.Call.endpoint == "embeddings").count() == 40
    assert "(writer process)" in p.output()  # mitmdump on two cores: the writer runs in its own process
    assert not list((tmp_path / "spool" / "journal").glob("journal-*"))  # all written: the journal is gone
    # (mitmproxy itself may print CancelledError tracebacks for keep-alive connections at exit)
    ours = [line for line in p.output().splitlines() if line.strip().startswith("File") and "velvet_core" in line]
    assert not ours, "\n".join(ours)  # no traceback through velvet's code


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_both_writer_modes_write_everything(standin, tmp_path, monkeypatch, mode):
    from support.rig import Proxy

    url = f"sqlite:///{tmp_path / 'modes.db'}"
    p = Proxy(url, standin.url, tmp_path, extra=["--set", f"velvet_writer={mode}"]).start()
    client = p.client(monkeypatch)
    ids = [client.chat.completions.create(model="gpt-4o-mini", messages=MSG).id for _ in range(20)]
    assert p.stop() == 0
    assert f"(writer {mode})" in p.output()
    with bound(url):
        rows = list(models.Call.select().where(models.Call.endpoint == "chat.completions"))
    assert len(rows) == 20 and all(r.input_tokens for r in rows) and len(ids) == 20


def test_an_option_given_twice_takes_its_last_value_and_says_so(standin, tmp_path, monkeypatch):
    """mitmproxy refuses a script's option given twice and the script would never start (capturing nothing,
    silently): velvet keeps the last value, as a wrapper script appending options expects, and warns."""
    from support.rig import Proxy

    first, last = f"sqlite:///{tmp_path / 'first.db'}", f"sqlite:///{tmp_path / 'last.db'}"
    p = Proxy(first, standin.url, tmp_path,
              extra=["--set", f"velvet_db={last}", "--set", "velvet_writer=thread",
                     "--set", "velvet_writer=process", "--set", "velvet_hosts=api.openai.com",
                     "--set", "velvet_hosts=example.com"]).start()
    client = p.client(monkeypatch)
    client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert p.stop() == 0
    out = p.output()
    assert "velvet_db was given more than once; using the last value" in out
    assert "velvet_writer was given more than once" in out and "(writer process)" in out
    assert "velvet_hosts was given" not in out  # several hosts are several values, by design
    assert "api.openai.com, example.com" in out
    with bound(last):
        assert models.Call.select().count() == 1
    assert not (tmp_path / "first.db").exists()
