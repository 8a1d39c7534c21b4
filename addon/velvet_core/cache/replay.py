"""A stored answer served again: as it was stored, or as a stream rebuilt in the API's event format (pure)."""

from __future__ import annotations

from typing import Any

import orjson

STREAMABLE = frozenset({"chat.completions", "completions"})


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def as_stream(kind: str, answer: dict[str, Any], include_usage: bool) -> bytes:
    """The SSE body of ``answer`` (a chat.completion or text_completion object): the whole text of each choice
    in one chunk, its finish reason in the next, the usage chunk when ``include_usage`` asked for it, then
    ``[DONE]``. Raises ValueError for an answer it cannot rebuild."""
    choices = answer.get("choices")
    if kind not in STREAMABLE or not isinstance(choices, list):
        raise ValueError(f"cannot rebuild a {kind} stream")
    meta: dict[str, Any] = {k: answer[k] for k in ("id", "created", "model", "system_fingerprint", "service_tier")
                            if k in answer}
    chat = kind == "chat.completions"
    meta["object"] = "chat.completion.chunk" if chat else "text_completion"
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    out: list[bytes] = []
    for c in choices:
        if not isinstance(c, dict):
            raise ValueError("a choice is not an object")
        i = c.get("index", 0)
        if chat:
            msg = c.get("message") or {}
            delta: dict[str, Any] = {"role": msg.get("role", "assistant"), "content": msg.get("content")}
            if msg.get("refusal") is not None:
                delta["refusal"] = msg["refusal"]
            if msg.get("tool_calls"):
                delta["tool_calls"] = [{"index": j, **tc} for j, tc in enumerate(msg["tool_calls"])]
            first = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
            last = {"index": i, "delta": {}, "logprobs": None, "finish_reason": c.get("finish_reason")}
        else:
            first = {"index": i, "text": c.get("text", ""), "logprobs": None, "finish_reason": None}
            last = {"index": i, "text": "", "logprobs": None, "finish_reason": c.get("finish_reason")}
        out.append(_event({**meta, "choices": [first], **extra}))
        out.append(_event({**meta, "choices": [last], **extra}))
    if include_usage:
        out.append(_event({**meta, "choices": [], "usage": answer.get("usage")}))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)
