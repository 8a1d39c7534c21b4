"""Which API endpoint a request is: kind (chat.completions, batches, …), action and object id."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

_AZURE_DEPLOYMENT = re.compile(r"^/deployments/([^/]+)")


@dataclass(frozen=True, slots=True)
class Route:
    """A classified request. ``path`` is normalised: no ``/v1``, ``/openai`` or Azure deployment."""

    kind: str
    action: str
    path: str
    object_id: str | None = None
    deployment: str | None = None

    def __reduce__(self) -> tuple[type[Route], tuple[str, str, str, str | None, str | None]]:
        # the dataclass default goes through copyreg: several times slower, and routes are journaled per flow
        return Route, (self.kind, self.action, self.path, self.object_id, self.deployment)

    @property
    def batch_body(self) -> Literal["request", "response"] | None:
        """Which side of the flow carries a batch file's bytes: an upload or upload part (the request), a
        file download (the response). The one place this rule is stated."""
        return _BATCH_BODIES.get((self.kind, self.action))


_BATCH_BODIES: dict[tuple[str, str], Literal["request", "response"]] = {
    ("files", "upload"): "request", ("uploads", "part"): "request", ("files", "content"): "response"}


# the endpoints the Batch API takes (CreateBatchRequest.endpoint), normalised: a line for another is kept whole,
# with a problem that names it
BATCH_ENDPOINTS = frozenset({"/responses", "/chat/completions", "/embeddings", "/completions", "/moderations",
                             "/images/generations", "/images/edits", "/videos"})


def normalise(path: str) -> tuple[str, str | None]:
    """`/v1/files?x=1` -> `/files`; Azure `/openai/deployments/d/chat/completions` -> `/chat/completions`."""
    p = path.split("?", 1)[0].split("#", 1)[0].rstrip("/") or "/"
    deployment = None
    if p.startswith("/openai/") or p == "/openai":
        p = p[len("/openai"):] or "/"
        if m := _AZURE_DEPLOYMENT.match(p):
            deployment = m.group(1)
            p = p[m.end():] or "/"
    if p.startswith("/v1/") or p == "/v1":
        p = p[3:] or "/"
    return p, deployment


def classify(method: str, path: str) -> Route:
    """Classify an OpenAI (or Azure OpenAI) request by method and path (routes are immutable: the usual short
    paths are remembered, as every live call of a kind asks the same question)."""
    return _remembered(method, path) if len(path) <= 256 else _classify(method, path)


def _classify(method: str, path: str) -> Route:
    p, dep = normalise(path)
    parts = [s for s in p.split("/") if s]
    method = method.upper()
    head = parts[0] if parts else ""
    n = len(parts)

    def r(kind: str, action: str = "call", oid: str | None = None) -> Route:
        return Route(kind, action, p, oid, dep)

    if head == "chat" and n >= 2 and parts[1] == "completions":
        return r("chat.completions", "create" if n == 2 and method == "POST" else "other")
    if head == "responses":
        return r("responses", "create" if n == 1 and method == "POST" else "other")
    if head in ("embeddings", "completions", "moderations"):
        return r(head, "create" if n == 1 and method == "POST" else "other")
    if head in ("images", "audio"):
        return r(head, "create" if method == "POST" else "other")
    if head == "videos":  # a job: created (and billed) once, then polled and its content downloaded
        if n == 1:
            return r("videos", "create" if method == "POST" else "list")
        if n == 3 and parts[2] == "content" and method == "GET":
            return r("videos", "content", parts[1])
        return r("videos", "retrieve" if n == 2 and method == "GET" else "other", parts[1])
    if head == "files":
        if n == 1:
            return r("files", "upload" if method == "POST" else "list")
        if n == 2:
            return r("files", {"GET": "retrieve", "DELETE": "delete"}.get(method, "other"), parts[1])
        if n == 3 and parts[2] == "content" and method == "GET":
            return r("files", "content", parts[1])
        return r("files", "other", parts[1])
    if head == "uploads":
        if n == 1:
            return r("uploads", "create" if method == "POST" else "other")
        if n == 3 and method == "POST" and parts[2] in ("parts", "complete", "cancel"):
            return r("uploads", {"parts": "part"}.get(parts[2], parts[2]), parts[1])
        return r("uploads", "retrieve" if n == 2 and method == "GET" else "other", parts[1])
    if head == "batches":
        if n == 1:
            return r("batches", "create" if method == "POST" else "list")
        if n == 2:
            return r("batches", "retrieve" if method == "GET" else "other", parts[1])
        if n == 3 and parts[2] == "cancel" and method == "POST":
            return r("batches", "cancel", parts[1])
        return r("batches", "other", parts[1])
    return r("other", "other")


_remembered = functools.lru_cache(maxsize=1024)(_classify)
