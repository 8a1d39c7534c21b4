"""The cache key: a hash of the scope, method, host, path and the request body **canonicalised** (pure; no I/O).

Canonical form: object keys sorted, whitespace ignored (the body is re-serialised), a number written the same way
whatever its spelling (``1``, ``1.0``, ``1e0``), parameters left at their documented default treated as absent
(:data:`DEFAULTS`), ``stream`` and ``stream_options`` left out (a stream is served from a stored plain answer and
the other way round). Every other field is in, whatever its name: a parameter the API adds later can never be
ignored by mistake (LiteLLM's cache missed ``max_tokens``, ``response_format``, ``top_k``... over time because
its key listed the fields it kept). ``velvet-cache-seed`` joins the key as a separate namespace; the scope (the
API key's fingerprint, the project, or nothing) keeps one key from ever getting another's answers.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import orjson

try:  # CPython's own SHA-256 (HACL*): the same digest as OpenSSL's, and cheaper in the proxy (see _heads)
    from _sha2 import sha256 as _sha256  # type: ignore[import-not-found]  # (no stub: a private module)
except ImportError:  # (another Python)
    _sha256 = hashlib.sha256

# The endpoints whose POST answers are cached (classify's route kinds), with their create action.
CACHEABLE_KINDS = frozenset({"chat.completions", "responses", "completions", "embeddings", "moderations"})

SCOPES = ("key", "project", "global")

# Parameters at their documented default: the same request as leaving them out. Numbers compare numerically
# (never a boolean: ``true == 1`` in Python). Only top-level fields; nothing outside this table is dropped.
_COMMON = {"temperature": 1, "top_p": 1, "n": 1, "presence_penalty": 0, "frequency_penalty": 0,
           "logprobs": False, "parallel_tool_calls": True, "store": False}
DEFAULTS: dict[str, dict[str, Any]] = {
    "chat.completions": dict(_COMMON),
    "completions": {"temperature": 1, "top_p": 1, "n": 1, "presence_penalty": 0, "frequency_penalty": 0,
                    "best_of": 1, "echo": False, "suffix": None},
    "responses": {"temperature": 1, "top_p": 1, "parallel_tool_calls": True, "background": False,
                  "truncation": "disabled"},
    "embeddings": {"encoding_format": "float"},
    "moderations": {},
}
# Never part of the key: how the answer travels, not what it is.
TRANSPORT = frozenset({"stream", "stream_options"})


class NotCacheable(ValueError):
    """A request the cache leaves alone; the message says why."""


def side_effects(kind: str, body: dict[str, Any]) -> str | None:
    """Why a request has effects beyond its answer that the cache would skip (None: none).

    - chat completions with ``store: true`` (stored completions, for distillation and evals);
    - responses unless ``store: false`` (the Responses API stores each response by default, for
      ``previous_response_id`` and retrieval: an answer from the cache would name a response the API never
      stored again), and any response with ``background: true`` (a job to poll) or a ``conversation``
      (appended to a server-side conversation).
    """
    if kind == "chat.completions" and body.get("store") is True:
        return "store: true (a stored completion)"
    if kind == "responses":
        if body.get("store") is not False:
            return "the Responses API stores the response (send store: false to cache it)"
        if body.get("background") is True:
            return "background: true"
        if body.get("conversation") is not None:
            return "conversation (appended to a server-side conversation)"
    return None


def _same(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or default is None:
        return value is default
    if isinstance(value, bool) or not isinstance(value, int | float):
        return isinstance(value, str) and value == default
    return value == default


def _norm(v: Any) -> Any:
    """Numbers spelled one way (an integral float as an int), recursively; NaN and infinities are refused by
    orjson's parser anyway. (Exact type tests: this walks every request body on the event loop.)"""
    t = type(v)
    if t is str or t is int or t is bool or v is None:
        return v
    if t is dict:
        return {k: _norm(x) for k, x in v.items()}
    if t is list:
        return [_norm(x) for x in v]
    if t is float and math.isfinite(v) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    return v


# "." as a byte's value: ``b"." in out`` first reads b"." as an int, raising and clearing a TypeError (CPython
# 3.12), 0.69 us against 0.07 for this memchr (tests/test_layout.py).
_POINT = ord(".")
# An integral float as orjson writes it (``N.0``, then what ends a value in compact JSON): the only spelling the
# walk changes. A "." in the text of a prompt, or a float such as 0.7, does not match (a string holding ".0," may:
# then the walk runs for nothing). 0.15 us for a 250-byte body and 1.9 for a 4.8 KB one, against 2 and 6.7 us for
# the walk, which every body holding a sentence took before.
_INTEGRAL = re.compile(rb"\.0[,\]}]")
# What canonical() may take out of a body of each kind: a body holding none of these (most) is serialised as it is.
_DROP = {kind: frozenset(d) | TRANSPORT for kind, d in DEFAULTS.items()}


def canonical(kind: str, body: dict[str, Any]) -> bytes:
    """The body as canonical JSON bytes: sorted keys, no whitespace, defaults and transport fields out, numbers
    spelled one way.

    orjson writes an integral float under 2**53 always as ``N.0``: bytes without a "." (one ``memchr``), or without
    ``.0`` before a ``,``, ``]`` or ``}`` (:data:`_INTEGRAL`), hold no float to respell, and a body is walked only
    when they do."""
    if _DROP.get(kind, TRANSPORT).isdisjoint(body):
        kept = body
    else:
        defaults = DEFAULTS.get(kind, {})
        kept = {k: v for k, v in body.items()
                if k not in TRANSPORT and not (k in defaults and _same(v, defaults[k]))}
    out = orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)
    if _POINT in out and _INTEGRAL.search(out):
        out = orjson.dumps(_norm(kept), option=orjson.OPT_SORT_KEYS)
    return out


def scope_value(scope: str, key_fingerprint: str | None, project: str | None) -> str:
    """What the scope puts into the key: the API key's fingerprint (``key``), the project (``project``), or
    nothing (``global``)."""
    if scope == "key":
        return "key:" + (key_fingerprint or "")
    if scope == "project":
        return "project:" + (project or "")
    if scope == "global":
        return "global"
    raise ValueError(f"unknown cache scope {scope!r}: use {', '.join(SCOPES)}")


def cache_key(scope: str, method: str, host: str, path: str, canonical_body: bytes, seed: str = "") -> str:
    """The entry's key: sha256 hex of the parts, each length-prefixed (no two lists of parts hash alike)."""
    head = _heads.get((scope, method, host, path, seed))
    h = (head or _head(scope, method, host, path, seed)).copy()
    h.update(len(canonical_body).to_bytes(8, "big") + canonical_body)
    return h.hexdigest()


# A hash of the parts before the body (length-prefixed) by (scope, method, host, path, seed), copied for each key:
# a proxy sees few of them. Joining them and making a hash afresh (OpenSSL looks the digest up by name each time)
# was about a quarter of the key's time (0.9 of 3.8 us in a tight loop).
#
# The hash is CPython's own SHA-256, not OpenSSL's (hashlib's). In a tight loop OpenSSL's is faster (1.7 against
# 2.5 us); in the running proxy, for every cacheable call, it cost 9.5 us against 7.3, and about two points of the
# proxy's throughput against none measurable (session 17, the bench's proxies, tunnels kept open, three blocks of
# 12,000 calls: a proxy computing every key with OpenSSL served 0.985, 0.980 and 0.997 of the cache off's calls per
# second, with _sha2 1.005, 1.002 and 1.029, and 75-110 us less CPU per call). OpenSSL 3's digest copy and its
# provider layers are much more code than the hash itself.
_heads: dict[tuple[str, str, str, str, str], Any] = {}


def _head(scope: str, method: str, host: str, path: str, seed: str) -> Any:
    parts = [p.encode("utf-8", "surrogateescape")  # (a header's bytes that are not UTF-8 come back as they were)
             for p in (scope, method.upper(), host.lower(), path, seed)]
    head = _sha256(b"".join(len(p).to_bytes(8, "big") + p for p in parts))
    if len(_heads) >= 4096:  # (bounded: a key per API key fingerprint, say)
        _heads.clear()
    _heads[(scope, method, host, path, seed)] = head
    return head


def request_key(kind: str, body: bytes | dict[str, Any], *, scope: str, method: str, host: str, path: str,
                seed: str = "") -> str:
    """The key of a request (its body as bytes, or parsed); raises :class:`NotCacheable` saying why
    not."""
    if kind not in CACHEABLE_KINDS:
        raise NotCacheable(f"{kind} is not cached")
    if method.upper() != "POST":
        raise NotCacheable(f"{method} is not cached")
    if isinstance(body, bytes | bytearray | memoryview):
        try:
            body = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise NotCacheable("the body is not JSON") from None
    if not isinstance(body, dict):
        raise NotCacheable("the body is not a JSON object")
    return key_of(kind, body, scope, method, host, path, seed)


def key_of(kind: str, body: dict[str, Any], scope: str, method: str, host: str, path: str, seed: str = "") -> str:
    """:func:`request_key` of a parsed body of a cacheable kind, POSTed (the proxy's hook has checked both);
    raises :class:`NotCacheable` for a request with side effects (only a response, or a body with ``store``, can
    have any: the others are not asked)."""
    if (kind == "responses" or "store" in body) and (why := side_effects(kind, body)):
        raise NotCacheable(why)
    return cache_key(scope, method, host, path, canonical(kind, body), seed)


def wants_usage(body: dict[str, Any]) -> bool:
    so = body.get("stream_options")
    return isinstance(so, dict) and so.get("include_usage") is True


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_TTL = 365 * 86400


def parse_ttl(text: str | int | float) -> float:
    """A TTL in seconds from ``3600``, ``90s``, ``30m``, ``2h``, ``7d`` or ``1w``; refuses 0, negatives, and more
    than 365 days (ValueError saying why)."""
    t = str(text).strip().lower()
    unit = _UNITS.get(t[-1:], 0)
    try:
        v = float(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (use seconds, or e.g. 30m, 2h, 7d)") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{text!r}: must be more than 0 seconds")
    if v > MAX_TTL:
        raise ValueError(f"{text!r}: at most 365 days")
    return v
