"""A small OpenAI API client for replays and judges, configured from the environment as the official SDK is.

``OPENAI_API_KEY`` (required), ``OPENAI_BASE_URL`` (default ``https://api.openai.com/v1``),
``OPENAI_ORG_ID`` and ``OPENAI_PROJECT_ID``; ``HTTPS_PROXY``/``NO_PROXY`` and ``SSL_CERT_FILE``/``SSL_CERT_DIR``
through httpx2's ``trust_env``, the same HTTP client and settings the SDK uses. Point ``HTTPS_PROXY`` at
velvet and the replay is logged like any other traffic. The key is only ever put in the ``Authorization``
header: never printed, logged or stored.
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import httpx2
import orjson

from velvet_core import __version__
from velvet_core.parsing.extract import TAG_PREFIX, key_fingerprint

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 120.0  # seconds; as the SDK, a server asking for longer is not waited for


class APIError(Exception):
    """A request that failed for good; ``status`` is None for connection errors."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class MissingKey(ValueError):
    """No ``OPENAI_API_KEY``: a usage error."""


@dataclass(slots=True)
class Reply:
    status: int
    body: Any
    request_id: str | None
    attempts: int


def retry_after(headers: httpx2.Headers) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, else ``retry-after`` (seconds or a date)."""
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay = float(value) / divisor
        except ValueError:
            parsed = email.utils.parsedate_tz(value) if name == "retry-after" else None
            if parsed is None:
                continue
            delay = email.utils.mktime_tz(parsed) - time.time()
        return delay if math.isfinite(delay) else None
    return None


def backoff(attempt: int, headers: httpx2.Headers | None = None) -> float:
    """The wait before retry number ``attempt`` (1, 2, ...): the server's word when it gives a sensible one,
    else exponential from 0.5 s up to 8 s with up to 25 % jitter, as the SDK does."""
    asked = retry_after(headers) if headers is not None else None
    if asked is not None and 0 < asked <= MAX_RETRY_AFTER:
        return asked
    return min(0.5 * 2 ** (attempt - 1), 8.0) * (1 - 0.25 * random.random())


class Client:
    def __init__(self, api_key: str | None, base_url: str | None = None, max_retries: int = 5,
                 timeout: float = 600.0, sleep: Callable[[float], None] = time.sleep, *,
                 proxy: str | None = None, ca_file: str | None = None, tags: dict[str, str] | None = None) -> None:
        """``api_key`` None: no ``Authorization`` header (a local server: Ollama, vLLM, llama.cpp). ``proxy`` and
        ``ca_file`` (a proxy and the CA it signs with) take the place of the environment's; ``tags`` go on every
        request as ``velvet-metadata-*`` headers (a velvet proxy tags the calls with them)."""
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.max_retries = max_retries
        self.sleep = sleep
        # what velvet stores of the key
        self.key_fingerprint = key_fingerprint({"authorization": f"Bearer {api_key}"}) if api_key else None
        headers = {"User-Agent": f"velvet/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if org := os.environ.get("OPENAI_ORG_ID"):
            headers["OpenAI-Organization"] = org
        if project := os.environ.get("OPENAI_PROJECT_ID"):
            headers["OpenAI-Project"] = project
        headers.update({TAG_PREFIX + k: v for k, v in (tags or {}).items()})
        kw: dict[str, Any] = {}
        if proxy:
            import ssl

            kw["proxy"] = proxy
            kw["verify"] = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self.http = httpx2.Client(headers=headers, timeout=httpx2.Timeout(timeout, connect=5.0),
                                  follow_redirects=True, trust_env=not proxy, **kw)

    @classmethod
    def from_env(cls, **kw: Any) -> Client:
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise MissingKey("OPENAI_API_KEY is not set: the replay needs an API key")
        return cls(key, **kw)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        """``/v1/chat/completions`` or ``/chat/completions`` under the base URL (which usually ends in /v1)."""
        if path.startswith("/v1/") and self.base_url.endswith("/v1"):
            path = path[3:]
        return self.base_url + path

    # -- requests --------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None = None,
                files: dict[str, Any] | None = None, data: dict[str, str] | None = None,
                rewind: IO[bytes] | None = None) -> Reply:
        """Send with retries (408, 409, 429, 5xx, connection errors); a final error answer is returned, not
        raised; a connection that never succeeds raises :class:`APIError`."""
        attempt = 0
        while True:
            attempt += 1
            if rewind is not None:
                rewind.seek(0)
            try:
                content = orjson.dumps(json) if json is not None else None
                hdrs = {**(headers or {}), **({"Content-Type": "application/json"} if content is not None else {})}
                r = self.http.request(method, self.url(path), content=content, headers=hdrs, files=files,
                                      data=data)
            except httpx2.TransportError as e:
                if attempt > self.max_retries:
                    raise APIError(f"{method} {path}: {type(e).__name__}: {e}") from None
                self.sleep(backoff(attempt))
                continue
            if r.status_code in RETRY_STATUSES and attempt <= self.max_retries:
                asked = retry_after(r.headers)
                if asked is None or asked <= MAX_RETRY_AFTER:
                    self.sleep(backoff(attempt, r.headers))
                    continue
            try:
                body = r.json() if r.content else None
            except ValueError:
                body = r.text
            return Reply(r.status_code, body, r.headers.get("x-request-id"), attempt)

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        """The body of a 2xx answer, else :class:`APIError` with the API's message."""
        reply = self.request(method, path, **kw)
        if reply.status >= 300:
            err = reply.body.get("error") if isinstance(reply.body, dict) else None
            err = err if isinstance(err, dict) else {}
            raise APIError(f"{method} {path}: {reply.status} {err.get('message') or reply.body!r}",
                              reply.status, err.get("code"))
        return reply.body

    def upload(self, data: IO[bytes], filename: str, purpose: str = "batch") -> dict[str, Any]:
        """``POST /files`` (multipart), as the SDK's ``files.create`` sends it."""
        return self.ok("POST", "/files", files={"file": (filename, data, "application/jsonl")},
                       data={"purpose": purpose}, rewind=data)

    def create_batch(self, input_file_id: str, endpoint: str, metadata: dict[str, str]) -> dict[str, Any]:
        return self.ok("POST", "/batches", json={"input_file_id": input_file_id, "endpoint": endpoint,
                                                  "completion_window": "24h", "metadata": metadata})

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.ok("GET", f"/batches/{batch_id}")

    def download(self, file_id: str) -> Iterator[bytes]:
        """``GET /files/{id}/content`` in chunks (constant memory), retried as a whole on errors."""
        attempt, started = 0, False
        while True:
            attempt += 1
            try:
                with self.http.stream("GET", self.url(f"/files/{file_id}/content")) as r:
                    if r.status_code in RETRY_STATUSES and attempt <= self.max_retries:
                        self.sleep(backoff(attempt, r.headers))
                        continue
                    if r.status_code >= 300:
                        r.read()
                        raise APIError(f"GET /files/{file_id}/content: {r.status_code} {r.text[:200]}",
                                          r.status_code)
                    for chunk in r.iter_bytes():
                        started = True
                        yield chunk
                    return
            except httpx2.TransportError as e:
                if started or attempt > self.max_retries:  # bytes already handed out cannot be taken back
                    raise APIError(f"GET /files/{file_id}/content: {type(e).__name__}: {e}") from None
                self.sleep(backoff(attempt))
