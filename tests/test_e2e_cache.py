"""End to end: the response cache through a real mitmdump, on SQLite and PostgreSQL (the stand-in API behind).

Each answer of the stand-in has a new id: a hit that gives the client the first answer's bytes was not asked
of the API again.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import httpx
import orjson
import pytest
from support.rig import API_KEY, WAIT, Proxy, bound, wait_for
from velvet_core.storage import models
from velvet_core.storage.sql import rows

URL = "https://api.openai.com/v1/chat/completions"
ON = {"velvet-cache": "on"}


def http(proxy: Proxy, key: str = API_KEY) -> httpx.Client:
    return httpx.Client(proxy=f"http://127.0.0.1:{proxy.port}", verify=ssl.create_default_context(cafile=proxy.ca),
                        timeout=30,
                        headers={"authorization": f"Bearer {key}"})


def post(c: httpx.Client, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None,
         url: str = URL) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return c.post(url, content=content, headers={"content-type": "application/json", **(headers or {})})


def entries(proxy: Proxy) -> list[dict[str, Any]]:
    with bound(proxy.db_url):
        return rows(models.db.obj, "SELECT * FROM cache_entries ORDER BY id")


def stored(proxy: Proxy, n: int) -> list[dict[str, Any]]:
    """Wait until the cache holds ``n`` entries (the writer stores a miss's answer about a second after it)."""
    return wait_for(lambda: (e := entries(proxy)) and len(e) >= n and e, what=f"{n} cache entries")


def settled(proxy: Proxy, answer: httpx.Response) -> None:
    """Wait until ``answer`` is in a cache entry, and in the proxy's index (which reads new ones every 0.25 s)."""
    wait_for(lambda: any(e["body"] == answer.text for e in entries(proxy)), what="the answer's entry")
    time.sleep(0.6)


def hit_rows(proxy: Proxy, n: int) -> list[dict[str, Any]]:
    def get() -> list[dict[str, Any]] | None:
        with bound(proxy.db_url):
            r = rows(models.db.obj, "SELECT * FROM calls WHERE cache_hit ORDER BY id")
        return r if len(r) >= n else None
    return wait_for(get, what=f"{n} hit rows")


def prompt(tag: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"cache test {tag}"}], **extra}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cproxy(request: pytest.FixtureRequest, standin, tmp_path_factory):
    """mitmdump with the cache at its default (header) and a 1-hour TTL."""
    from support.pg import fresh_pg_url

    tmp = tmp_path_factory.mktemp(f"cache-{request.param}")
    url = f"sqlite:///{tmp / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()
    p = Proxy(url, standin.url, tmp, extra=["--set", "velvet_cache_ttl=1h"]).start()
    yield p
    p.stop()
    assert "Traceback" not in p.output()


def test_miss_then_hit_same_bytes_and_logged(cproxy):
    with http(cproxy) as c:
        first = post(c, prompt("a", max_tokens=5), ON)
        assert first.status_code == 200 and first.headers["x-velvet-cache"] == "MISS"
        (e,) = stored(cproxy, 1)
        time.sleep(0.6)  # (the proxy's index reads new entries every 0.25 s)
        assert e["hits"] == 0 and e["endpoint"] == "chat.completions"
        # keys in another order, other spacing, a default-valued parameter, stream: false: the same request
        spaced = b'{ "max_tokens": 5, "temperature": 1, "stream": false,\n "messages": [{"content": ' \
                 b'"cache test a", "role": "user"}], "model": "gpt-4o-mini"}'
        t0 = time.perf_counter()
        second = post(c, spaced, ON)
        took = time.perf_counter() - t0
    assert second.status_code == 200 and second.headers["x-velvet-cache"] == "HIT"
    assert second.content == first.content  # the same answer, byte for byte (the stand-in's ids are new)
    assert second.headers["content-type"] == first.headers["content-type"]
    assert int(second.headers["age"]) >= 0 and "x-request-id" not in second.headers
    (hit,) = hit_rows(cproxy, 1)
    assert hit["cost_usd"] == 0 and hit["saved_usd"] == pytest.approx(e["cost_usd"]) and e["cost_usd"] > 0
    assert hit["input_tokens"] == e["input_tokens"] and hit["output_tokens"] == e["output_tokens"]
    assert hit["status_code"] == 200 and hit["latency_ms"] < took * 1000 + 1
    assert "velvet-cache" not in (hit["request_headers"] or "")
    wait_for(lambda: entries(cproxy)[0]["hits"] == 1, what="the entry's hit counted")


@pytest.mark.parametrize("change", [
    {"max_tokens": 6}, {"response_format": {"type": "json_object"}}, {"a_new_parameter": True},
    {"temperature": 0.5}, {"max_tokens": None}])
def test_any_other_field_is_a_miss(cproxy, change):
    tag = "b-" + "-".join(change)
    with http(cproxy) as c:
        settled(cproxy, post(c, prompt(tag, max_tokens=5), ON))
        body = {k: v for k, v in {**prompt(tag, max_tokens=5), **change}.items() if v is not None}
        other = post(c, body, ON)
        assert other.headers["x-velvet-cache"] == "MISS"
        settled(cproxy, other)
        assert post(c, body, ON).headers["x-velvet-cache"] == "HIT"  # (its own entry)


def test_another_key_never_gets_the_answer(cproxy):
    with http(cproxy) as c:
        first = post(c, prompt("c"), ON)
        settled(cproxy, first)
    with http(cproxy, key="sk-test-" + "z" * 40) as c:
        other = post(c, prompt("c"), ON)
        assert other.headers["x-velvet-cache"] == "MISS" and other.content != first.content
        settled(cproxy, other)
        again = post(c, prompt("c"), ON)
    assert again.headers["x-velvet-cache"] == "HIT" and again.content == other.content
    with http(cproxy) as c:
        assert post(c, prompt("c"), ON).content == first.content


def test_off_refresh_seed_and_no_header(cproxy):
    with http(cproxy) as c:
        first = post(c, prompt("d"), ON)
        settled(cproxy, first)
        plain = post(c, prompt("d"))  # velvet_cache=header: no header, no cache
        assert "x-velvet-cache" not in plain.headers and plain.content != first.content
        off = post(c, prompt("d"), {"velvet-cache": "off"})
        assert "x-velvet-cache" not in off.headers and off.content != first.content
        seeded = post(c, prompt("d"), {**ON, "velvet-cache-seed": "s1"})
        assert seeded.headers["x-velvet-cache"] == "MISS"
        refreshed = post(c, prompt("d"), {"velvet-cache": "refresh"})
        assert refreshed.headers["x-velvet-cache"] == "MISS" and refreshed.content != first.content
        hit = post(c, prompt("d"), ON)
        assert hit.headers["x-velvet-cache"] == "HIT" and hit.content == first.content  # bucket 1: the first


def test_errors_are_never_cached(cproxy):
    with http(cproxy) as c:
        bad = post(c, prompt("e"), {**ON, "x-standin-scenario": "500"})
        assert bad.status_code == 500
        time.sleep(1.5)
        good = post(c, prompt("e"), ON)
        assert good.status_code == 200 and good.headers["x-velvet-cache"] == "MISS"


def test_stream_from_a_plain_answer_and_back(cproxy, monkeypatch):
    client = cproxy.client(monkeypatch)
    msgs = [{"role": "user", "content": "cache test f"}]
    plain = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs,
                                                              extra_headers=ON)
    text = plain.parse().choices[0].message.content
    settled(cproxy, plain.http_response)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=msgs, stream=True,
                                            stream_options={"include_usage": True}, extra_headers=ON)
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == plain.parse().usage.total_tokens
    # the other way round: a stream first, then a plain request served from it
    msgs2 = [{"role": "user", "content": "cache test g"}]
    s2 = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="gpt-4o-mini", messages=msgs2, stream=True, extra_headers=ON) if ch.choices)
    wait_for(lambda: any(e["stream"] and "cache test g" not in e["body"] and s2 in e["body"]
                         for e in entries(cproxy)), what="the stream's entry")
    time.sleep(0.6)
    again = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=msgs2,
                                                              extra_headers=ON)
    assert again.headers["x-velvet-cache"] == "HIT" and again.parse().choices[0].message.content == s2
    client.close()


def test_responses_stream_from_a_plain_answer_and_back(cproxy, monkeypatch):
    client = cproxy.client(monkeypatch)
    plain = client.responses.with_raw_response.create(model="gpt-4o-mini", input="cache test r", store=False,
                                                      extra_headers=ON)
    text = plain.parse().output_text
    settled(cproxy, plain.http_response)
    events = list(client.responses.create(model="gpt-4o-mini", input="cache test r", store=False, stream=True,
                                          extra_headers=ON))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    done = events[-1].response
    assert done.output_text == text and done.usage.total_tokens == plain.parse().usage.total_tokens
    assert done.id == plain.parse().id  # the stored answer, not a new one from the API
    # the other way round: a stream first, then a plain request served from its answer
    s2 = [e for e in client.responses.create(model="gpt-4o-mini", input="cache test s", store=False, stream=True,
                                             extra_headers=ON)]
    first = s2[-1].response
    wait_for(lambda: any(e["stream"] and first.id in e["body"] for e in entries(cproxy)),
             what="the stream's entry")
    time.sleep(0.6)
    again = client.responses.with_raw_response.create(model="gpt-4o-mini", input="cache test s", store=False,
                                                      extra_headers=ON)
    assert again.headers["x-velvet-cache"] == "HIT" and again.parse().output_text == first.output_text
    assert again.parse().id == first.id
    client.close()


@pytest.mark.parametrize("option", ["velvet_cache_ttl=0", "velvet_cache_scope=team", "velvet_cache_bucket=21"])
def test_a_bad_cache_option_is_one_line_at_start(tmp_path, standin, option):
    import contextlib

    p = Proxy(f"sqlite:///{tmp_path / 'v.db'}", standin.url, tmp_path, extra=["--set", option])
    with contextlib.suppress(RuntimeError):  # mitmproxy reports the OptionsError and exits
        p.start()
    assert p.proc is not None and p.proc.wait(30) != 0
    name = option.split("=")[0]
    assert [line for line in p.output().splitlines() if line.startswith(f"{name}:") or f"] {name}:" in line
            or f"Error: {name}:" in line or f"OptionsError: {name}:" in line], p.output()
    p.log.close()


def start_proxy(standin, tmp, url, *opts: str) -> Proxy:
    return Proxy(url, standin.url, tmp, extra=[a for o in opts for a in ("--set", o)]).start()


@pytest.fixture(params=["sqlite", "postgres"])
def any_url(request, tmp_path):
    from support.pg import fresh_pg_url

    return f"sqlite:///{tmp_path / 'velvet.db'}" if request.param == "sqlite" else fresh_pg_url()


def test_ttl_expiry_bucket_rotation_off_and_a_corrupt_entry(standin, tmp_path, any_url, capsys):
    from support.helpers import js, run

    p = start_proxy(standin, tmp_path / "a", any_url, "velvet_cache=on", "velvet_cache_bucket=2")
    try:
        with http(p) as c:
            # TTL: an entry of 1 second is gone after it
            first = post(c, prompt("ttl"), {"velvet-cache-ttl": "1"})
            settled(p, first)
            time.sleep(1.2)
            assert post(c, prompt("ttl"), {"velvet-cache-ttl": "1"}).headers["x-velvet-cache"] == "MISS"
            # bucket 2: two misses fill it, then the two answers in turn
            a = post(c, prompt("bucket"))
            settled(p, a)
            b = post(c, prompt("bucket"))
            assert b.headers["x-velvet-cache"] == "MISS" and b.content != a.content
            settled(p, b)
            served = [post(c, prompt("bucket")) for _ in range(4)]
            assert all(r.headers["x-velvet-cache"] == "HIT" for r in served)
            assert [r.content for r in served] == [a.content, b.content, a.content, b.content]
            # velvet_cache=on: off bypasses, no header is needed
            assert "x-velvet-cache" not in post(c, prompt("bucket"), {"velvet-cache": "off"}).headers
            # a corrupt entry is a miss (logged once), never a broken answer (bucket 2: both answers stored first)
            z = [post(c, prompt("corrupt"))]
            settled(p, z[0])
            z.append(post(c, prompt("corrupt")))
            settled(p, z[1])
            with bound(p.db_url):
                for r in z:
                    models.db.obj.execute_sql(
                        "UPDATE cache_entries SET body = '{not json' WHERE body = "
                        + ("%s" if "postgres" in any_url else "?"), (r.text,))
            for _ in range(2):
                again = post(c, prompt("corrupt"))
                assert again.status_code == 200 and again.headers["x-velvet-cache"] == "MISS"
                assert orjson.loads(again.content)["choices"]
        s = js(capsys, "--db", p.db_url, "cache", "stats")
        assert s["hits"] == 4 and s["entries"] >= 6 and s["saved_usd"] > 0 and s["size_bytes"] > 0
        (g,) = s["by_model"]
        assert g["hits"] == 4 and 0 < g["hit_rate"] < 1
        t = js(capsys, "--db", p.db_url, "stats")["totals"]
        assert t["cache_hits"] == 4 and t["saved_usd"] == pytest.approx(s["saved_usd"])
        code, out, _ = run(capsys, "--db", p.db_url, "cache", "clear", "--key", "nobody")
        assert code == 0 and out.startswith("0 cache entries")
        assert js(capsys, "--db", p.db_url, "cache", "clear", "--model", "gpt-4o-mini", "--older-than",
                  "2020-01-01") == {"removed": 0, "older_than": "2020-01-01T00:00:00Z", "model": "gpt-4o-mini",
                                    "key": None}
        code, out, _ = run(capsys, "--db", p.db_url, "cache", "clear")
        assert code == 0 and f"{s['entries']} cache entries removed" in out
        with http(p) as c:
            assert post(c, prompt("bucket")).headers["x-velvet-cache"] == "MISS"
    finally:
        p.stop()
    out = p.output()
    assert out.count("is corrupt") == 2 and "Traceback" not in out  # once per entry


def test_cache_off_ignores_the_header(standin, tmp_path, any_url):
    p = start_proxy(standin, tmp_path / "off", any_url, "velvet_cache=off")
    try:
        with http(p) as c:
            first = post(c, prompt("off"), ON)
            time.sleep(1.5)
            second = post(c, prompt("off"), ON)
        assert first.status_code == second.status_code == 200
        assert "x-velvet-cache" not in first.headers and second.content != first.content
        assert entries(p) == []
        def heads() -> list[str] | None:
            with bound(p.db_url):
                r = [r["request_headers"] for r in rows(models.db.obj, "SELECT request_headers FROM calls")]
            return r if len(r) == 2 else None
        assert not any("velvet-cache" in h for h in wait_for(heads, what="2 calls"))
    finally:
        p.stop()


def test_two_proxies_on_one_postgresql_share_an_entry(standin, tmp_path):
    from support.pg import fresh_pg_url

    url = fresh_pg_url()
    p1 = start_proxy(standin, tmp_path / "p1", url, "velvet_cache=on")
    p2 = start_proxy(standin, tmp_path / "p2", url, "velvet_cache=on")
    try:
        with http(p1) as c:
            first = post(c, prompt("shared"))
        assert first.headers["x-velvet-cache"] == "MISS"
        settled(p1, first)
        with http(p2) as c:
            second = post(c, prompt("shared"))
        assert second.headers["x-velvet-cache"] == "HIT" and second.content == first.content
    finally:
        p1.stop()
        p2.stop()


def test_the_cache_outlives_a_postgresql_restart(standin, tmp_path, own_pg_url):
    """Every connection of a real mitmdump (its look-up's and its writer process's: the index's follower, the
    writer's) cut, as a server restart or a failover cuts them: an entry stored before is a hit at once, and a
    miss after it is stored, followed and then a hit. Before, the look-up and the index kept their dead
    connections until the proxy restarted."""
    from support.pg import cut_connections
    from velvet_core.storage.database import connect

    url = own_pg_url
    p = start_proxy(standin, tmp_path / "p", url, "velvet_cache=on")
    admin = connect(url)
    try:
        with http(p) as c:
            before = post(c, prompt("before the cut"))
            settled(p, before)
            assert post(c, prompt("before the cut")).headers["x-velvet-cache"] == "HIT"  # (its connection is open)
            assert cut_connections(admin) >= 3  # the look-up's, the follower's, the writer's
            again = post(c, prompt("before the cut"))
            assert again.headers["x-velvet-cache"] == "HIT" and again.content == before.content
            after = post(c, prompt("after the cut"))
            assert after.headers["x-velvet-cache"] == "MISS"
            settled(p, after)
            time.sleep(2.5)  # (the follower tries again 2 s after its connection failed)
            deadline = time.monotonic() + WAIT  # (the follower runs in the writer process: idle-class)
            while (hit := post(c, prompt("after the cut"))).headers["x-velvet-cache"] != "HIT":
                assert time.monotonic() < deadline, "an entry stored after the cut is never followed"
                time.sleep(0.5)
            assert hit.content == after.content
    finally:
        admin.close()
        p.stop()
    assert "Traceback" not in p.output()


def test_what_if_matches_what_the_cache_then_does(standin, tmp_path, any_url, capsys):
    from support.helpers import js

    # the same traffic twice: first with the cache off (what-if reads it), then with it on
    traffic = [("w1", {}), ("w1", {}), ("w2", {}), ("w1", {"max_tokens": 3}), ("w2", {}), ("w1", {}),
               ("w3", {"x-standin-scenario": "500"}), ("w3", {})]
    off = start_proxy(standin, tmp_path / "off", any_url, "velvet_cache=off")
    try:
        with http(off) as c:
            for tag, extra in traffic:
                body = prompt(tag, **{k: v for k, v in extra.items() if not k.startswith("x-")})
                post(c, body, {k: v for k, v in extra.items() if k.startswith("x-")})
                time.sleep(1.8)  # (the cache stores an answer about a second after it)
    finally:
        off.stop()
    predicted = js(capsys, "--db", any_url, "cache", "what-if", "--since", "1h")
    from support.pg import fresh_pg_url

    url2 = f"sqlite:///{tmp_path / 'on.db'}" if any_url.startswith("sqlite") else fresh_pg_url()
    on = start_proxy(standin, tmp_path / "on", url2, "velvet_cache=on")
    hits = 0
    try:
        with http(on) as c:
            for tag, extra in traffic:
                body = prompt(tag, **{k: v for k, v in extra.items() if not k.startswith("x-")})
                r = post(c, body, {k: v for k, v in extra.items() if k.startswith("x-")})
                hits += r.headers.get("x-velvet-cache") == "HIT"
                if r.status_code == 200 and r.headers.get("x-velvet-cache") == "MISS":
                    settled(on, r)  # (stored and followed before the next call: a slow writer is no miss)
    finally:
        on.stop()
    assert predicted["repeats"] == hits == 3
    actual = js(capsys, "--db", url2, "stats")["totals"]
    assert actual["cache_hits"] == 3 and actual["saved_usd"] == pytest.approx(predicted["saved_usd"])


def test_project_scope_shares_across_keys_and_a_compressed_body_is_left_alone(standin, tmp_path, any_url):
    """``velvet_cache_scope=project``: two API keys of one project share an entry, another project never gets it;
    a request whose body is compressed (``content-encoding``) goes to the API untouched."""
    import gzip

    p = start_proxy(standin, tmp_path / "project", any_url, "velvet_cache_scope=project")
    try:
        team = {**ON, "openai-project": "proj_team"}
        with http(p) as c:
            first = post(c, prompt("project"), team)
            assert first.headers["x-velvet-cache"] == "MISS"
            settled(p, first)
        with http(p, key="sk-test-" + "p" * 40) as c:  # another key, the same project: its answer
            shared = post(c, prompt("project"), team)
            assert shared.headers["x-velvet-cache"] == "HIT" and shared.content == first.content
            other = post(c, prompt("project"), {**ON, "openai-project": "proj_other"})
            assert other.headers["x-velvet-cache"] == "MISS" and other.content != first.content
            odd = {**ON, "openai-project": b"proj_\xff\xfe"}  # (not UTF-8: its bytes make the scope)
            oddly = post(c, prompt("project"), odd)
            assert oddly.headers["x-velvet-cache"] == "MISS"
            assert oddly.content not in (first.content, other.content)
            settled(p, oddly)
            again = post(c, prompt("project"), odd)
            assert again.headers["x-velvet-cache"] == "HIT" and again.content == oddly.content
            assert post(c, prompt("project"), {**ON, "openai-project": b"proj_\xff"}).headers["x-velvet-cache"] \
                == "MISS"
            squeezed = {**team, "content-encoding": "gzip"}
            for _ in range(2):
                zipped = post(c, gzip.compress(orjson.dumps(prompt("project"))), squeezed)
                assert "x-velvet-cache" not in zipped.headers  # (the stand-in reads no gzip: its 400 comes back)
                assert zipped.content != first.content
        time.sleep(1.5)
        assert len(entries(p)) == 4  # the four projects' answers; nothing of the compressed requests
    finally:
        p.stop()
