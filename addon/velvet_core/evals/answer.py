"""One answer to judge, whether a live call or a batch result line: its text, finish reason, refusal, tool calls,
and the request it answered (for a judge's ``{input}`` and the tools' parameter schemas)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from velvet_core.parsing import answers
from velvet_core.storage.sql import json_value

TEXT_ENDPOINTS = frozenset({"chat.completions", "completions", "responses"})


def endpoint_of_url(url: str | None) -> str | None:
    """A batch line's ``url`` (``/v1/chat/completions``) as the endpoint kind calls have (``chat.completions``)."""
    if not url:
        return None
    path = url.split("?", 1)[0].strip("/").removeprefix("v1/")
    return path.replace("/", ".")


@dataclass(slots=True)
class Answer:
    """``subject`` is unique per answer and stable across databases: a call's flow id, or ``batch/custom_id``."""

    subject: str
    source: str  # live | batch
    at: datetime | None
    endpoint: str | None
    model: str | None
    request: Any  # the request body (parsed), or None
    body: Any  # the answer body (parsed), or None
    streamed_text: str | None = None  # a streamed call's answer, as velvet rebuilt it
    streamed_finish: str | None = None
    failed: bool = False
    call_id: int | None = None
    result_id: int | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    _said: answers.Said | None = None
    _text: Any = ...  # the text, once worked out (Ellipsis: not yet)

    @property
    def is_text_endpoint(self) -> bool:
        return self.endpoint in TEXT_ENDPOINTS

    @property
    def said(self) -> answers.Said:
        if self._said is None:
            self._said = answers.read(self.body) if self.streamed_text is None else answers.Said(
                self.streamed_text, self.streamed_finish)
        return self._said

    @property
    def text(self) -> str | None:
        """The answer's text; None for tool calls only, or an answer that is not text."""
        if self._text is ...:
            text = self.said.text if self.is_text_endpoint else None
            if text is not None and text.startswith("[{") and self.tool_calls:  # (read gives tool calls as text)
                text = None
            self._text = text
        return self._text

    @property
    def finish_reason(self) -> str | None:
        return self.said.finish_reason if isinstance(self.said.finish_reason, str) else None

    @property
    def refusal(self) -> bool:
        b = self.body
        if not isinstance(b, dict):
            return False
        for c in b.get("choices") or ():
            if isinstance(c, dict) and isinstance(c.get("message"), dict) and c["message"].get("refusal"):
                return True
        return any(isinstance(p, dict) and p.get("type") == "refusal"
                   for item in b.get("output") or () if isinstance(item, dict)
                   for p in item.get("content") or () if isinstance(item.get("content"), list))

    @property
    def tool_calls(self) -> list[tuple[str | None, Any]]:
        """(name, arguments) of each tool call in the answer."""
        b = self.body
        out: list[tuple[str | None, Any]] = []
        if not isinstance(b, dict):
            return out
        for c in b.get("choices") or ():
            msg = c.get("message") if isinstance(c, dict) else None
            for tc in (msg.get("tool_calls") or ()) if isinstance(msg, dict) else ():
                fn = tc.get("function") if isinstance(tc, dict) else None
                if isinstance(fn, dict):
                    out.append((fn.get("name"), fn.get("arguments")))
        for item in b.get("output") or ():
            if isinstance(item, dict) and item.get("type") == "function_call":
                out.append((item.get("name"), item.get("arguments")))
        return out

    @property
    def tool_schemas(self) -> dict[str, Any]:
        """The parameters schema of each function tool the request offered, by name."""
        rq = self.request
        out: dict[str, Any] = {}
        for t in (rq.get("tools") or ()) if isinstance(rq, dict) else ():
            if not isinstance(t, dict):
                continue
            fn = t["function"] if isinstance(t.get("function"), dict) else t  # chat nests it, responses not
            if isinstance(fn.get("name"), str) and isinstance(fn.get("parameters"), dict):
                out[fn["name"]] = fn["parameters"]
        return out

    @property
    def input_text(self) -> str:
        """The request as text: each message's role and content (a judge's ``{input}``)."""
        rq = self.request
        if not isinstance(rq, dict):
            return ""
        given = rq.get("messages", rq.get("input", rq.get("prompt")))
        if isinstance(given, str):
            return given
        if not isinstance(given, list):
            return ""
        lines = []
        for m in given:
            if isinstance(m, str):
                lines.append(m)
            elif isinstance(m, dict):
                content = answers._content(m.get("content"))
                lines.append(f"{m.get('role') or m.get('type') or 'message'}: {content}")
        return "\n".join(lines)


def from_call(row: dict[str, Any]) -> Answer:
    """A ``calls`` row (id, flow_id, started_at, endpoint, model, status_code, request_body, response_body,
    response_text, stream, finish_reason, tags)."""
    tags = json_value(row.get("tags"))
    stream = bool(row.get("stream"))
    status = row.get("status_code")
    return Answer(
        subject=row["flow_id"], source="live", at=row.get("started_at"), endpoint=row.get("endpoint"),
        model=row.get("model") or row.get("model_requested"), request=json_value(row.get("request_body")),
        body=None if stream else json_value(row.get("response_body")),
        streamed_text=(row.get("response_text") or "") if stream else None,
        streamed_finish=row.get("finish_reason") if stream else None,
        failed=status is None or not 200 <= int(status) < 300, call_id=row["id"],
        tags={str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {})


def from_line(row: dict[str, Any]) -> Answer:
    """A ``batch_results`` row joined with its request (id, batch_id, custom_id, seen_at, model, status_code,
    failed, body, req_body, req_url, metadata)."""
    meta = json_value(row.get("metadata"))
    return Answer(
        subject=f"{row['batch_id']}/{row['custom_id']}", source="batch", at=row.get("seen_at"),
        endpoint=endpoint_of_url(row.get("req_url")), model=row.get("model") or row.get("req_model"),
        request=json_value(row.get("req_body")), body=json_value(row.get("body")),
        failed=bool(row.get("failed")) or not 200 <= int(row.get("status_code") or 0) < 300,
        result_id=row["id"], batch_id=row["batch_id"], custom_id=row["custom_id"],
        tags={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {})
