"""Pull the interesting fields out of OpenAI request/response JSON and headers."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, overload

import orjson

from velvet_core import clock
from velvet_core.secret_names import secret_name

RATELIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "rl_limit_requests",
    "x-ratelimit-limit-tokens": "rl_limit_tokens",
    "x-ratelimit-remaining-requests": "rl_remaining_requests",
    "x-ratelimit-remaining-tokens": "rl_remaining_tokens",
    "x-ratelimit-reset-requests": "rl_reset_requests",
    "x-ratelimit-reset-tokens": "rl_reset_tokens",
}
# the usual secret headers; any name that ends like one is secret too (:mod:`velvet_core.secret_names`)
SECRET_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization", "cookie", "set-cookie",
                            "proxy-authenticate", "www-authenticate", "x-goog-api-key",
                            "ocp-apim-subscription-key"})
KEY_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key", "ocp-apim-subscription-key")
TAG_PREFIX = "velvet-metadata-"


@dataclass(slots=True)
class Tokens:
    """Token counts in common columns, whatever the endpoint's usage shape."""

    input: int | None = None
    output: int | None = None
    cached: int | None = None
    reasoning: int | None = None
    total: int | None = None
    image: int | None = None  # of ``input``, the image tokens (image edits): priced apart, not a column

    def as_dict(self) -> dict[str, int | None]:
        return {
            "input_tokens": self.input, "output_tokens": self.output, "cached_tokens": self.cached,
            "reasoning_tokens": self.reasoning, "total_tokens": self.total,
        }

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> Tokens:
        """The counts of a row built with :meth:`as_dict`."""
        return cls(row.get("input_tokens"), row.get("output_tokens"), row.get("cached_tokens"),
                   row.get("reasoning_tokens"), row.get("total_tokens"))


TOKENS_MAX = 1 << 40  # no request has a trillion tokens: a bigger count is not one


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < TOKENS_MAX else None


def bad_counts(usage: Any) -> list[str]:
    """The usage fields that hold something other than a plausible token count (left out, not priced)."""
    out = []
    stack: list[tuple[str, Any]] = [("usage", usage)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            stack += [(f"{path}.{k}", x) for k, x in v.items() if k.endswith("tokens") or isinstance(x, dict)]
        elif v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < TOKENS_MAX):
            leaf = path.rsplit(".", 1)[-1]
            out.append(f"{_COLUMN.get(leaf, leaf)} ({path})")
    return sorted(out)


_COLUMN = {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"}  # the usage field's column


def _sub(d: Any, key: str, sub: str) -> int | None:
    inner = d.get(key) if isinstance(d, dict) else None
    return _int(inner.get(sub)) if isinstance(inner, dict) else None


def tokens_from_usage(usage: Any) -> Tokens:
    """Normalise chat (prompt/completion), responses (input/output) and embeddings usage."""
    if not isinstance(usage, dict):
        return Tokens()
    if "input_tokens" in usage or "output_tokens" in usage:  # responses, images, batch.usage
        t = Tokens(
            _int(usage.get("input_tokens")), _int(usage.get("output_tokens")),
            _sub(usage, "input_tokens_details", "cached_tokens"),
            _sub(usage, "output_tokens_details", "reasoning_tokens"),
            _int(usage.get("total_tokens")),
            _sub(usage, "input_tokens_details", "image_tokens"),
        )
    else:  # chat completions, completions, embeddings
        t = Tokens(
            _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")),
            _sub(usage, "prompt_tokens_details", "cached_tokens"),
            _sub(usage, "completion_tokens_details", "reasoning_tokens"),
            _int(usage.get("total_tokens")),
        )
    if t.total is None and (t.input is not None or t.output is not None):
        t.total = (t.input or 0) + (t.output or 0)
    return t


@dataclass(frozen=True, slots=True)
class Video:
    """What a video job bills by: its length and its resolution."""

    seconds: Decimal
    size: str | None


@dataclass(frozen=True, slots=True)
class Images:
    """The images an ImagesResponse holds, with their size and quality (as the API or the request gave them)."""

    count: int
    size: str
    quality: str


def images_of(body: Any, request: Any = None) -> Images | None:
    """The images of an ImagesResponse (``data``), sized from the response, else the request, else the API's
    default 1024x1024; None when it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    asked = request if isinstance(request, dict) else {}

    def pick(key: str, default: str) -> str:
        for v in (body.get(key), asked.get(key)):
            if isinstance(v, str) and v and v != "auto":
                return v
        return default

    return Images(len(body["data"]), pick("size", "1024x1024"), pick("quality", "standard"))


def video_of(body: Any) -> Video | None:
    """The seconds and size of a video job object (``POST /v1/videos``; ``seconds`` is a string in the spec)."""
    if not isinstance(body, dict) or body.get("object") != "video":
        return None
    raw = body.get("seconds")
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        return None
    try:
        seconds = Decimal(str(raw))
    except ArithmeticError:
        return None
    if not seconds.is_finite() or not 0 <= seconds < 86_400:  # a clip of more than a day is not one
        return None
    size = body.get("size")
    return Video(seconds, size if isinstance(size, str) else None)


def find_usage(body: Any) -> Any:
    """The usage object of a response body (responses nest it under ``response`` in events)."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("usage"), dict):
        return body["usage"]
    inner = body.get("response")
    if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
        return inner["usage"]
    return None


@dataclass(slots=True)
class ApiError:
    type: str | None = None
    code: str | None = None
    message: str | None = None


def api_error(body: Any) -> ApiError:
    """The ``error`` object of an OpenAI error body (or a bare one), as strings."""
    err = body.get("error") if isinstance(body, dict) and "error" in body else body
    if isinstance(err, dict):
        def s(v: Any) -> str | None:
            return None if v is None else str(v)
        return ApiError(s(err.get("type")), s(err.get("code")), s(err.get("message")))
    if isinstance(err, str):
        return ApiError(message=err)
    return ApiError()


def key_fingerprint(headers: dict[str, str]) -> str | None:
    """First 12 hex digits of sha256 of the API key (``Authorization: Bearer``, Azure ``api-key``, Google's
    ``x-goog-api-key``...)."""
    for h in KEY_HEADERS:  # (a loop, not a generator: a sixth of the time, on the event loop for every call)
        if raw := headers.get(h):
            return _fingerprint(raw)
    return None


@functools.lru_cache(maxsize=256)  # (a proxy sees a few keys, once per call: on the event loop)
def _fingerprint(raw: str) -> str:
    key = raw.split(None, 1)[1] if raw.lower().startswith("bearer ") and " " in raw.strip() else raw
    return hashlib.sha256(key.strip().encode()).hexdigest()[:12]


def safe_headers(headers: dict[str, str]) -> dict[str, str]:
    """Headers minus anything secret."""
    return {k: v for k, v in headers.items() if k not in SECRET_HEADERS and not secret_name(k)}


def json_text(obj: Any) -> str:
    """``obj`` as JSON text. Header values may hold lone surrogates (bytes that were not UTF-8, as mitmproxy
    decodes them), which orjson refuses: the standard library escapes them instead."""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:  # (a JSON \\udcxx escape would do for SQLite, but PostgreSQL's jsonb refuses it)
        return orjson.dumps(_escape_surrogates(obj)).decode()


def _escape_surrogates(v: Any) -> Any:
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(v, dict):
        return {_escape_surrogates(k): _escape_surrogates(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_escape_surrogates(x) for x in v]
    return v


def ratelimits(headers: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for h, col in RATELIMIT_HEADERS.items():
        v = headers.get(h)
        if v is None:
            continue
        if "reset" in col:
            out[col] = v
        else:
            try:
                out[col] = int(v)
            except ValueError:
                out[col] = None
    return out


def to_int(v: str | None) -> int | None:
    try:
        return int(float(v)) if v is not None else None
    except ValueError:
        return None


@overload
def utc(ts: float) -> datetime: ...
@overload
def utc(ts: float | None) -> datetime | None: ...
def utc(ts: float | None) -> datetime | None:
    """A Unix timestamp as naive UTC, as stored."""
    return clock.from_epoch(ts)


def ts(v: Any) -> datetime | None:
    """A Unix-seconds API timestamp as naive UTC (tolerates ISO strings of old API versions)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        if not 0 <= v < clock.FAR:  # before 1970 or after 9999: not a time the API meant
            return None
        return clock.from_epoch(v)
    if isinstance(v, str):
        try:
            return clock.parse(v)
        except ValueError:
            return None
    return None
