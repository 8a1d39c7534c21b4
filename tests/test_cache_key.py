"""The cache's canonical key (velvet_core.cache.key): what makes two requests the same, and what never does."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from velvet_core.cache.key import (
    CACHEABLE_KINDS,
    DEFAULTS,
    NotCacheable,
    canonical,
    request_key,
    scope_value,
    side_effects,
)

BASE = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def key(body, kind="chat.completions", scope="key:abc", method="POST", host="api.openai.com",
        path="/v1/chat/completions", seed=""):
    return request_key(kind, body, scope=scope, method=method, host=host, path=path, seed=seed)


def test_key_order_and_whitespace_do_not_matter():
    a = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
    b = b'{ "max_tokens" : 5,\n  "messages": [ {"content": "hi", "role": "user"} ],\t"model": "gpt-4o-mini" }'
    assert key(a) == key(b) == key(BASE)


def test_whitespace_inside_strings_matters():
    assert key({**BASE, "messages": [{"role": "user", "content": "hi "}]}) != key(BASE)


def test_number_spelling_does_not_matter_but_value_does():
    assert key({**BASE, "max_tokens": 5.0}) == key(BASE)
    spelled = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":5e0}'
    assert key(spelled) == key(BASE)
    assert key({**BASE, "max_tokens": 6}) != key(BASE)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet="ab1.eE -{}\"\\é", max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text("ab1.e", max_size=4), inner, max_size=4),
    max_leaves=12)


def _spelled(v, rnd) -> str:
    """``v`` as JSON, its numbers spelled one of several ways (an integral number as 5, 5.0 or 5e0)."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, int | float):
        if float(v).is_integer() and abs(v) < 2**53:
            return rnd.choice([str(int(v)), f"{int(v)}.0", f"{int(v)}e0", f"{int(v)}.00E+0"])
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + " , ".join(_spelled(x, rnd) for x in v) + "]"
    return "{ " + ",".join(f"{json.dumps(k)} :{_spelled(x, rnd)}" for k, x in v.items()) + "}"


@settings(max_examples=2000, deadline=None)
@given(v=st.floats(-2.0**53, 2.0**53, allow_nan=False) | st.integers(-2**53 + 1, 2**53 - 1).map(float))
def test_orjson_spells_every_float_with_a_point_or_an_exponent(v):
    """What canonical() rests on to skip the walk: a body whose canonical bytes hold no "." holds no float that is
    integral under 2**53 (orjson writes those as ``N.0``)."""
    out = orjson.dumps(v)
    assert b"." in out or b"e" in out
    if v.is_integer() and abs(v) < 2**53:
        assert out.endswith(b".0") and b"e" not in out


@settings(max_examples=3000, deadline=None)
@given(body=st.dictionaries(st.text("ab1.e,]}", max_size=4), _json | st.integers(-2**53, 2**53).map(float),
                            max_size=6),
       kind=st.sampled_from(sorted(CACHEABLE_KINDS)))
def test_canonical_bytes_skip_the_walk_only_when_it_changes_nothing(body, kind):
    """canonical() walks a body only when its bytes hold ``.0`` before ``,``, ``]`` or ``}``: whatever the body
    (integral floats anywhere, "." and ".0," in strings and keys), the bytes are those of the walked body."""
    from velvet_core.cache.key import _DROP, _norm

    kept = {k: v for k, v in body.items() if k not in _DROP[kind]}  # (no defaulted fields: none to drop)
    assert canonical(kind, kept) == orjson.dumps(_norm(kept), option=orjson.OPT_SORT_KEYS)


@settings(max_examples=300, deadline=None)
@given(extra=st.dictionaries(st.text("xyz1.e", min_size=1, max_size=5), _json, max_size=5), seed=st.integers())
def test_the_key_of_the_bytes_is_the_key_of_the_parsed_body(extra, seed):
    """The key from a body's bytes is the key of the parsed body, however its numbers are spelled: a float in a
    string, a "." or an "e" in a string or a key, or none at all."""
    import random

    body = {**BASE, **extra}
    raw = _spelled(body, random.Random(seed)).encode()
    assert key(raw) == key(orjson.loads(raw)) == key(body)


@pytest.mark.parametrize("field,value", [
    ("temperature", 1), ("temperature", 1.0), ("top_p", 1), ("n", 1), ("presence_penalty", 0),
    ("frequency_penalty", 0.0), ("logprobs", False), ("parallel_tool_calls", True), ("store", False)])
def test_documented_defaults_are_the_same_as_absent(field, value):
    assert key({**BASE, field: value}) == key(BASE)


@pytest.mark.parametrize("field,value", [
    ("temperature", 0), ("temperature", 0.7), ("top_p", 0.9), ("n", 2), ("presence_penalty", 0.5),
    ("logprobs", True), ("parallel_tool_calls", False), ("temperature", True), ("n", True), ("temperature", "1"),
    ("temperature", None)])
def test_other_values_of_defaulted_fields_are_in(field, value):
    assert key({**BASE, field: value}) != key(BASE)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 6), ("max_completion_tokens", 5), ("response_format", {"type": "json_object"}),
    ("top_k", 40), ("seed", 1), ("tools", []), ("user", "u1"), ("reasoning_effort", "low"),
    ("a_parameter_from_next_year", {"x": 1}), ("metadata", {"a": "b"})])
def test_every_other_field_is_in_whatever_its_name(field, value):
    assert key({**BASE, field: value}) != key(BASE)


def test_removing_a_field_is_a_different_request():
    assert key({k: v for k, v in BASE.items() if k != "max_tokens"}) != key(BASE)


def test_stream_fields_are_left_out():
    assert key({**BASE, "stream": True}) == key(BASE)
    assert key({**BASE, "stream": True, "stream_options": {"include_usage": True}}) == key(BASE)
    assert key({**BASE, "stream": False}) == key(BASE)


def test_defaults_only_at_the_top_level():
    nested = {**BASE, "messages": [{"role": "user", "content": "hi", "n": 1}]}
    assert key(nested) != key(BASE)


def test_scope_separates_keys_and_projects():
    assert key(BASE, scope=scope_value("key", "aaa", None)) != key(BASE, scope=scope_value("key", "bbb", None))
    assert key(BASE, scope=scope_value("key", "aaa", "p")) == key(BASE, scope=scope_value("key", "aaa", "q"))
    assert key(BASE, scope=scope_value("project", "a", "p")) == key(BASE, scope=scope_value("project", "b", "p"))
    assert key(BASE, scope=scope_value("project", "a", "p")) != key(BASE, scope=scope_value("project", "a", "q"))
    assert key(BASE, scope=scope_value("global", "a", "p")) == key(BASE, scope=scope_value("global", "b", "q"))
    # a key's fingerprint never collides with a project of the same name
    assert scope_value("key", "x", None) != scope_value("project", None, "x")
    with pytest.raises(ValueError, match="unknown cache scope"):
        scope_value("team", "a", None)


def test_a_project_that_is_not_utf8_has_its_own_key():
    """An ``OpenAI-Project`` header's bytes that are not UTF-8 (decoded with surrogateescape) make a scope."""
    odd = key(BASE, scope=scope_value("project", None, b"p\xff".decode("utf-8", "surrogateescape")))
    assert odd != key(BASE, scope=scope_value("project", None, b"p\xfe".decode("utf-8", "surrogateescape")))
    assert odd != key(BASE, scope=scope_value("project", None, "p"))


def test_seed_method_host_and_path_are_in():
    k = key(BASE)
    assert key(BASE, seed="s1") != k != key(BASE, seed="s2") != key(BASE, seed="s1")
    assert key(BASE, host="example.openai.azure.com") != k
    assert key(BASE, path="/v1/chat/completions?api-version=2024-10-21") != k
    assert key(BASE, host="API.OPENAI.COM") == k


def test_parts_cannot_run_into_each_other():
    assert key(BASE, seed="ab", path="/v1/x") != key(BASE, seed="b", path="/v1/xa")


@pytest.mark.parametrize("kind", sorted(CACHEABLE_KINDS))
def test_every_cacheable_kind_has_a_defaults_table(kind):
    assert kind in DEFAULTS


def test_not_cacheable():
    with pytest.raises(NotCacheable, match="not JSON"):
        key(b"model=gpt")
    with pytest.raises(NotCacheable, match="not a JSON object"):
        key(b"[1, 2]")
    with pytest.raises(NotCacheable):
        key(BASE, kind="files")
    with pytest.raises(NotCacheable):
        key(BASE, method="GET")
    with pytest.raises(NotCacheable, match="store"):
        key({**BASE, "store": True})


@given(st.sampled_from(sorted(CACHEABLE_KINDS)),
       st.dictionaries(st.sampled_from(["store", "background", "conversation", "model", "input"]),
                       st.sampled_from([True, False, None, 0, 1, "x", {}])))
def test_a_request_is_refused_exactly_when_it_has_side_effects(kind, extra):
    """key_of asks side_effects only of the requests that can have any: it refuses exactly those it says."""
    body = {**BASE, **extra}
    why = side_effects(kind, body)
    try:
        key(body, kind=kind)
    except NotCacheable as e:
        assert why and str(e) == why
    else:
        assert why is None


def test_responses_only_with_store_false_and_no_background_or_conversation():
    body = {"model": "gpt-4o-mini", "input": "hi"}
    assert side_effects("responses", body)
    assert side_effects("responses", {**body, "store": True})
    assert side_effects("responses", {**body, "store": False}) is None
    assert side_effects("responses", {**body, "store": False, "background": True})
    assert side_effects("responses", {**body, "store": False, "conversation": "conv_1"})
    k = key({**body, "store": False}, kind="responses", path="/v1/responses")
    assert k == key({**body, "store": False, "temperature": 1, "stream": True}, kind="responses",
                    path="/v1/responses")


def test_embeddings_default_encoding_format():
    body = {"model": "text-embedding-3-small", "input": "hi"}
    p = "/v1/embeddings"
    plain = key(body, kind="embeddings", path=p)
    assert plain == key({**body, "encoding_format": "float"}, kind="embeddings", path=p)
    assert plain != key({**body, "encoding_format": "base64"}, kind="embeddings", path=p)


def test_canonical_is_sorted_compact_json():
    c = canonical("chat.completions", {"b": 1, "a": [1.0, {"d": 2, "c": 3}], "temperature": 1, "stream": True})
    assert c == b'{"a":[1,{"c":3,"d":2}],"b":1}'
    assert orjson.loads(c) == {"a": [1, {"c": 3, "d": 2}], "b": 1}


def test_unicode_is_kept_exactly():
    assert key({**BASE, "messages": [{"role": "user", "content": "é"}]}) != key(
        {**BASE, "messages": [{"role": "user", "content": "e\u0301"}]})
    raw = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\\u00e9"}],"max_tokens":5}'
    assert key(raw) == key({**BASE, "messages": [{"role": "user", "content": "é"}]})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=300))
def test_the_key_is_the_sha256_of_its_length_prefixed_parts(scope, seed, content):
    """The key is SHA-256 whichever implementation computes it (CPython's own in the proxy): keys stored by an
    earlier velvet, or by another proxy on the same database, stay the same."""
    import hashlib

    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    heads = (scope, "POST", "api.openai.com", "/v1/chat/completions", seed)
    parts = [p.encode("utf-8", "surrogateescape") for p in heads] + [canonical("chat.completions", body)]
    want = hashlib.sha256(b"".join(len(p).to_bytes(8, "big") + p for p in parts)).hexdigest()
    assert key(body, scope=scope, seed=seed) == want
    assert key(orjson.dumps(body), scope=scope, seed=seed) == want


def test_the_key_is_hashed_by_cpythons_own_sha256():
    """Not OpenSSL's: in the running proxy its digest copy cost about two points of throughput (docs/benchmarks.md,
    session 17), though it is the faster in a tight loop, which is what a later change would measure."""
    import _sha2

    from velvet_core.cache import key as k

    assert k._sha256 is _sha2.sha256
