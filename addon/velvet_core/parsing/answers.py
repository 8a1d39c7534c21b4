"""What an answer says, whatever the endpoint: its text (or tool calls), finish reason, embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(slots=True)
class Said:
    text: str | None = None
    finish_reason: str | None = None
    vector: list[float] | None = None  # embeddings


def _calls(calls: list[Any]) -> str:
    """Tool calls as comparable text: names and arguments, not the ids that differ every run."""
    out = []
    for c in calls:
        if isinstance(c, dict):
            fn: dict[str, Any] = c["function"] if isinstance(c.get("function"), dict) else c
            out.append({"name": fn.get("name"), "arguments": fn.get("arguments")})
    return orjson.dumps(out).decode()


def read(body: Any) -> Said:
    """Chat completions, completions, responses, embeddings and moderations answers."""
    if not isinstance(body, dict):
        return Said()
    choices = body.get("choices")
    if isinstance(choices, list):
        c = choices[0] if choices and isinstance(choices[0], dict) else {}
        msg = c.get("message")
        if isinstance(msg, dict):
            text = msg.get("content")
            if text is None and msg.get("tool_calls"):
                text = _calls(msg["tool_calls"])
            if text is None:
                text = msg.get("refusal")
        else:
            text = c.get("text")
        return Said(text if isinstance(text, str) else None, c.get("finish_reason"))
    if body.get("object") == "response" or isinstance(body.get("output"), list):
        texts, calls = [], []
        for item in body.get("output") or []:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                texts += [p.get("text") or "" for p in item.get("content") or []
                          if isinstance(p, dict) and p.get("type") == "output_text"]
            elif item.get("type") == "function_call":
                calls.append(item)
        status = body.get("status")
        if status == "incomplete":
            status = (body.get("incomplete_details") or {}).get("reason") or status
        return Said("".join(texts) if texts else _calls(calls) if calls else None, status)
    data = body.get("data")
    first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    if isinstance(first.get("embedding"), list):
        return Said(vector=first["embedding"])
    if isinstance(body.get("results"), list):  # moderations
        return Said(orjson.dumps(body["results"]).decode())
    return Said()


def prompt(request: Any) -> str:
    """The request's last user turn as text (what a judge is shown)."""
    if not isinstance(request, dict):
        return ""
    if isinstance(request.get("messages"), list):
        for m in reversed(request["messages"]):
            if isinstance(m, dict) and m.get("role") == "user":
                return _content(m.get("content"))
        return ""
    given = request.get("input", request.get("prompt"))
    if isinstance(given, list):
        for m in reversed(given):
            if isinstance(m, dict) and m.get("role") == "user":
                return _content(m.get("content"))
        return " ".join(x for x in given if isinstance(x, str))
    return given if isinstance(given, str) else ""


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text")) for p in content if isinstance(p, dict) and p.get("text") is not None)
    return ""
