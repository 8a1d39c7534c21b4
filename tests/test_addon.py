"""The addon's hooks with mitmproxy's test helpers, writing to a real SQLite database."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils
from support.helpers import snapshot
from support.rig import bound
from velvet_core.addon import Velvet
from velvet_core.capture.take import StreamRecorder
from velvet_core.cost.prices import Pricer
from velvet_core.parsing.classify import classify
from velvet_core.processing.calls import parse_call
from velvet_core.storage import models
from velvet_core.storage.snapshot import CallSnapshot

KEY = "sk-unit-" + "q" * 30


def flow(path="/v1/chat/completions", body=b'{"model":"gpt-4o-mini","messages":[]}', host="api.openai.com",
         resp_body=b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":3,"completion_tokens":2}}',
         status=200, req_headers=(), resp_headers=()) -> http.HTTPFlow:
    rh = {"host": host, "authorization": f"Bearer {KEY}", "content-type": "application/json", **dict(req_headers)}
    req = tutils.treq(host=host, port=443, scheme=b"https", method=b"POST", path=path.encode(),
                      content=body, headers=http.Headers(**rh))
    sh = {"content-type": "application/json", "x-request-id": "req_1", **dict(resp_headers)}
    resp = tutils.tresp(status_code=status, content=resp_body, headers=http.Headers(**sh))
    return tflow.tflow(req=req, resp=resp)


@pytest.fixture
def addon(sqlite_url, tmp_path):
    """The addon with its writer in a thread (these tests reach into the processor)."""
    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_writer="thread",
                       velvet_db=sqlite_url, velvet_spool_dir=str(tmp_path / "spool"))
        v.running()
        yield v
        v.done()


class _Junk:
    pass


@pytest.mark.parametrize("cache", ["off", "on"])
def test_running_freezes_the_start_up_heap(sqlite_url, tmp_path, cache):
    """What is alive once the proxy has started (with the cache on, peewee too) is moved out of the collector's
    reach: a full collection walked it all while every flow waited (about 2.5 % of the proxy's CPU). Start-up's
    garbage is collected first: none of it is kept for good."""
    import gc
    import weakref

    gc.unfreeze()
    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_writer="thread", velvet_cache=cache,
                       velvet_db=sqlite_url, velvet_spool_dir=str(tmp_path / "spool"))
        junk = _Junk()
        junk.me = junk  # a cycle: only a collection frees it
        gc.collect()  # (it survives, to the oldest generation, which only a full collection visits)
        left = weakref.ref(junk)
        del junk  # garbage now, in the oldest generation
        before = gc.get_freeze_count()
        assert left() is not None
        v.running()
        assert gc.get_freeze_count() > before + 10_000
        assert left() is None  # collected, not frozen
        if cache == "on":  # the look-up's database modules, imported at start, are frozen with the rest
            import peewee

            assert not any(o is peewee.Model for o in gc.get_objects())
        v.done()
    gc.unfreeze()


def rows(url):
    with bound(url):
        return list(models.Call.select().dicts())


async def test_hooks_store_a_call_and_strip_tags(addon, sqlite_url):
    f = flow(req_headers={"velvet-metadata-team": "ml", "Velvet-Metadata-Env": "prod"})
    addon.requestheaders(f)
    assert "velvet-metadata-team" not in f.request.headers  # removed before going upstream
    assert f.metadata["velvet"]["endpoint"] == "chat.completions"
    f.request.host = "127.0.0.1"  # as map_remote does after our requestheaders
    addon.responseheaders(f)
    addon.response(f)
    addon.done()
    (row,) = rows(sqlite_url)
    assert row["host"] == "api.openai.com" and row["input_tokens"] == 3 and row["output_tokens"] == 2
    assert orjson.loads(row["tags"]) == {"team": "ml", "env": "prod"}
    assert KEY not in orjson.dumps(row, default=str).decode()


async def test_other_hosts_are_ignored(addon, sqlite_url):
    f = flow(host="example.com")
    addon.requestheaders(f)
    addon.response(f)
    assert "velvet" not in f.metadata
    addon.done()
    assert rows(sqlite_url) == []


async def test_sse_gets_a_recorder(addon):
    f = flow(resp_headers={"content-type": "text/event-stream"})
    addon.requestheaders(f)
    addon.responseheaders(f)
    assert isinstance(f.response.stream, StreamRecorder)
    assert f.response.stream(b"data: x\n\n") == b"data: x\n\n"  # passes chunks on untouched


async def test_error_hook_stores_the_failed_call(addon, sqlite_url):
    f = tflow.tflow(req=flow().request, err=True)
    addon.requestheaders(f)
    addon.error(f)
    addon.done()
    (row,) = rows(sqlite_url)
    assert row["status_code"] is None and row["error_type"] == "connection_error" and not row["complete"]


async def test_our_bug_never_breaks_the_flow(addon, sqlite_url, monkeypatch, caplog):
    import velvet_core.addon as cap

    def boom(*a, **k):
        raise RuntimeError("synthetic")

    monkeypatch.setattr(cap, "begin", boom)
    f = flow()
    addon.requestheaders(f)  # must not raise
    addon.response(f)
    assert "synthetic" in caplog.text and "the flow continues" in caplog.text


class _Exploding(dict):
    """The addon's flow table failing at every touch: a bug of ours inside whichever hook touches it."""

    def get(self, *a, **k):
        raise RuntimeError("synthetic")

    pop = __setitem__ = get


@pytest.mark.parametrize("hook", ["requestheaders", "responseheaders", "response", "error"])
async def test_our_bug_in_any_hook_is_logged_and_the_flow_goes_on(addon, sqlite_url, hook, caplog):
    f = flow() if hook != "error" else tflow.tflow(req=flow().request, err=True)
    if hook != "requestheaders":
        addon.requestheaders(f)
    addon.snapshots = _Exploding(addon.snapshots)
    getattr(addon, hook)(f)  # must not raise
    assert f"velvet: {hook} failed for POST" in caplog.text and "synthetic" in caplog.text
    assert "sk-" not in caplog.text  # (the flow's context, never its key)


async def test_processing_error_keeps_a_row(addon, sqlite_url, monkeypatch):
    import velvet_core.processing.processor as processor

    monkeypatch.setattr(processor, "parse_call", lambda *a: 1 / 0)
    f = flow()
    addon.requestheaders(f)
    addon.response(f)
    addon.done()
    (row,) = rows(sqlite_url)
    assert "ZeroDivisionError" in row["problem"] and row["path"] == "/v1/chat/completions"


@pytest.mark.parametrize(("opt", "value", "msg"), [
    ("velvet_db", "mysql://nope/x", "velvet_db"),
    ("velvet_hosts", ["api.openai.com,other.com"], "velvet_hosts"),
    ("velvet_prices", "/nonexistent/prices.toml", "velvet_prices"),
    ("velvet_body_limit", -1, "velvet_body_limit"),
    ("velvet_retention", "rows=often", "velvet_retention"),
    ("velvet_retention", "rows=1d,bodies=30d", "velvet_retention"),
    ("velvet_cache", "sometimes", "velvet_cache"),
    ("velvet_cache_ttl", "0", "velvet_cache_ttl: '0': must be more than 0 seconds"),
    ("velvet_cache_ttl", "-5", "velvet_cache_ttl"),
    ("velvet_cache_ttl", "400d", "velvet_cache_ttl: '400d': at most 365 days"),
    ("velvet_cache_scope", "team", "velvet_cache_scope"),
    ("velvet_cache_bucket", 21, "velvet_cache_bucket: must be from 1 to 20, got 21"),
    ("velvet_cache_bucket", 0, "velvet_cache_bucket"),
])
def test_bad_options(opt, value, msg):
    v = Velvet()
    with taddons.context(v) as tctx, pytest.raises(exceptions.OptionsError, match=msg):
        tctx.configure(v, **{opt: value})


def test_extra_hosts():
    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_hosts=["api.openai.com", "myres.openai.azure.com"])
        assert v.hosts == {"api.openai.com", "myres.openai.azure.com"}


def snap(path="/v1/chat/completions", body=b"{}", resp=b"{}", status=200, enc=None, ct="application/json"):
    s = snapshot(path, flow_id="x", request_headers={"content-type": "application/json"}, request_body=body,
                 ended_at=2.0, status_code=status, response_headers={"content-type": ct}, response_body=resp,
                 response_encoding=enc)
    return parse_call(s, Pricer(), 1 << 20)[0]


def test_bad_inputs_are_recorded_not_fatal():
    assert "request body is not JSON" in snap(body=b"{not json")["problem"]
    assert "response body is not JSON" in snap(resp=b"<html>oops</html>")["problem"]
    assert "not UTF-8" in snap(resp=b"\xff\xfe bad", ct="text/plain")["problem"]
    assert "corrupt gzip" in snap(resp=b"garbage", enc="gzip")["problem"]
    assert "unknown endpoint" in snap(path="/v1/models")["problem"]
    ok = snap(resp=gzip.compress(b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":1}}'), enc="gzip")
    assert ok["problem"] is None and ok["input_tokens"] == 1


def test_body_limit():
    s = CallSnapshot(flow_id="x", method="POST", host="h", path="/v1/embeddings",
                     route=classify("POST", "/v1/embeddings"), key_fingerprint=None, tags={},
                     request_headers={}, request_body=b'{"input":"' + b"a" * 5000 + b'"}',
                     request_encoding=None, started_at=1.0)
    row = parse_call(s, Pricer(), 1000)[0]
    assert row["request_body"] is None and "not stored" in row["problem"] and row["request_bytes"] > 5000


async def test_response_headers_are_filtered_like_request_headers(addon, sqlite_url):
    f = flow(resp_headers={"set-cookie": "__cf_bm=secret-cookie", "www-authenticate": "Bearer realm=x"})
    addon.requestheaders(f)
    addon.response(f)
    addon.done()
    (row,) = rows(sqlite_url)
    stored = orjson.loads(row["response_headers"])
    assert "set-cookie" not in stored and "www-authenticate" not in stored and stored["x-request-id"] == "req_1"
    assert "secret-cookie" not in orjson.dumps(row, default=str).decode()


def test_the_hooks_keep_raw_header_fields_without_secrets_and_the_writer_decodes_them():
    """On the event loop the snapshot only takes references to the header fields (secrets and tags out, so
    they never reach the journal); ``settle`` on the writer's side decodes them as before: lower-case names,
    repeated headers joined, bytes that are not UTF-8 kept as surrogate escapes, the encodings read."""
    import pickle

    from velvet_core.capture.take import begin, finish
    from velvet_core.storage.snapshot import settle

    f = flow(req_headers={"velvet-metadata-team": "ml", "Content-Encoding": "gzip", "api-key": "azure-secret"},
             resp_headers={"content-encoding": "br", "set-cookie": "__cf_bm=c"})
    f.request.headers.add("X-Repeated", "a")
    f.request.headers.add("x-repeated", "b")
    f.request.headers.fields += ((b"X-Odd", b"caf\xe9"),)
    s = begin(f, classify("POST", "/v1/chat/completions"), "api.openai.com")
    finish(s, f)
    assert s.request_headers == {} and s.response_headers == {}  # (nothing decoded yet)
    frame = pickle.dumps(s)
    assert KEY.encode() not in frame and b"azure-secret" not in frame and b"velvet-metadata" not in frame
    assert s.key_fingerprint and s.tags == {"team": "ml"} and "velvet-metadata-team" not in f.request.headers
    settle(s)
    assert s.request_fields is None and s.response_fields is None
    assert s.request_headers["x-repeated"] == "a, b" and s.request_headers["x-odd"] == "caf\udce9"
    assert "authorization" not in s.request_headers and "api-key" not in s.request_headers
    assert s.request_encoding == "gzip" and s.response_encoding == "br"
    assert s.response_headers["x-request-id"] == "req_1"
    assert settle(s) == s  # (a second time changes nothing)


def test_a_request_whose_header_names_are_known_is_snapshotted_alike():
    """begin() keeps the names it knows to be plain in C and looks only at the others: the first flow (every name
    new), the second (its plain names known) and one in other letter cases give the same fields, secrets out."""
    from velvet_core.capture.take import begin, finish
    from velvet_core.storage.snapshot import settle

    def snap(case: Callable[[str], str]) -> Any:
        f = flow(req_headers={case("X-Stainless-Lang"): "python", case("api-key"): "azure-secret",
                              case("velvet-metadata-team"): "ml", case("X-New-Gateway-Token"): "tok-secret"})
        f.request.headers.add(case("X-Repeated"), "a")
        f.request.headers.add(case("X-Repeated"), "b")
        s = begin(f, classify("POST", "/v1/chat/completions"), "api.openai.com")
        kept = b"".join(k + v for k, v in s.request_fields)
        assert b"secret" not in kept and KEY.encode() not in kept and b"velvet-metadata" not in kept.lower()
        return settle(finish(s, f))

    first, second, upper = snap(str), snap(str), snap(str.upper)
    for s in (first, second, upper):
        assert s.request_headers == first.request_headers and s.key_fingerprint == first.key_fingerprint
        assert s.tags == {"team": "ml"}
    assert first.request_headers["x-repeated"] == "a, b" and first.request_headers["x-stainless-lang"] == "python"
    assert "x-new-gateway-token" not in first.request_headers and "api-key" not in first.request_headers


async def test_changing_the_database_never_waits_on_the_event_loop(tmp_path, sqlite_url):
    """The old writer (here stuck on a database that does not answer) is retired in the background."""
    from support.rig import free_port

    v = Velvet()
    nowhere = f"postgresql://velvet:pw@127.0.0.1:{free_port()}/x?connect_timeout=1"
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_writer="thread",
                       velvet_db=nowhere, velvet_spool_dir=str(tmp_path / "spool"), velvet_flush_timeout=3)
        v.running()
        f = flow()
        v.requestheaders(f)
        v.response(f)
        old = v.writer
        tctx.configure(v, velvet_db=sqlite_url)
        assert v.writer is not old and old is not None and old._thread is not None  # still retiring
        g = flow()
        v.requestheaders(g)
        v.response(g)
        v.done()
        for _ in range(100):
            if old._thread is None:
                break
            await asyncio.sleep(0.1)
    assert [r["flow_id"] for r in rows(sqlite_url)] == [g.id]
    assert list((tmp_path / "spool").glob("spool-*.pkl"))  # the first flow waits in the old database's spool


def test_bad_database_url_messages_hide_the_password():
    v = Velvet()
    with taddons.context(v) as tctx, pytest.raises(exceptions.OptionsError) as e:
        tctx.configure(v, velvet_db="mysql://user:hunter2@db/x")
    assert "hunter2" not in str(e.value)


def velvet_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "velvet" and r.levelname == "WARNING"]


async def test_warns_once_when_flows_pass_and_none_is_captured(addon, caplog):
    from velvet_core.addon import UNCAPTURED_FLOWS

    for i in range(UNCAPTURED_FLOWS - 1):
        addon.requestheaders(flow(host="llm.internal" if i else "example.org"))
    assert velvet_warnings(caplog) == []
    addon.requestheaders(flow(host="llm.internal"))
    [msg] = velvet_warnings(caplog)
    assert f"{UNCAPTURED_FLOWS} flows went through the proxy and none was captured" in msg
    assert "velvet_hosts (api.openai.com)" in msg and "llm.internal (4), example.org (1)" in msg
    assert "--set velvet_hosts=api.openai.com --set velvet_hosts=llm.internal" in msg
    for _ in range(3 * UNCAPTURED_FLOWS):
        addon.requestheaders(flow(host="llm.internal"))
    addon._warn_uncaptured()  # the timer firing late changes nothing
    assert len(velvet_warnings(caplog)) == 1  # once


async def test_no_warning_once_something_was_captured(addon, caplog):
    from velvet_core.addon import UNCAPTURED_FLOWS

    addon.requestheaders(flow())  # api.openai.com: captured
    for _ in range(2 * UNCAPTURED_FLOWS):
        addon.requestheaders(flow(host="example.org"))
    addon._warn_uncaptured()
    assert velvet_warnings(caplog) == [] and addon.passed == {}


async def test_the_timer_warns_about_a_single_uncaptured_flow(addon, caplog):
    addon.requestheaders(flow(host="example.org"))
    assert velvet_warnings(caplog) == []
    addon._warn_uncaptured()  # what the timer started by the first flow calls
    [msg] = velvet_warnings(caplog)
    assert "1 flow went through" in msg and "example.org (1)" in msg



def test_every_option_can_be_set_from_the_command_line():
    """mitmproxy's --set parses str, int, bool and sequences only (a float option fails at start)."""
    v = Velvet()
    with taddons.context(v) as tctx:
        for name, opt in tctx.options.items():
            if name.startswith("velvet_"):
                assert opt.typespec in (str, int, bool, Sequence[str]), name
                text = str(opt.default).lower() if opt.typespec is bool else opt.default
                tctx.options.set(f"{name}={text if opt.typespec is not Sequence[str] else 'api.openai.com'}")


@pytest.mark.parametrize("fields,want", [
    ([(b"Host", b"api.openai.com"), (b"Content-Type", b"application/json")], ("", None)),
    ([(b"Content-Encoding", b" GZip ")], ("gzip", None)),
    ([(b"CONTENT-ENCODING", b"identity"), (b"OpenAI-Project", b"proj_a")], ("identity", "proj_a")),
    ([(b"openai-project", b"proj_a"), (b"x", b"y"), (b"OPENAI-PROJECT", b"proj_\xff")],
     ("", "proj_a, proj_\udcff")),
    ([(b"X-Content-Encoding-Hint", b"gzip"), (b"x-openai-project-name", b"p")], ("", None)),  # (in other names)
    ([], ("", None)),
])
def test_the_encoding_and_the_project_are_found_in_any_case(fields, want):
    """The cache's look-up reads the request's content-encoding and OpenAI-Project headers (names in any case,
    several projects joined, bytes not UTF-8 kept); a header whose name holds one of them is neither."""
    from velvet_core.addon import _encoding_and_project

    assert _encoding_and_project(fields) == want
