"""A stored answer served again: as it was stored, or as a stream rebuilt in the API's event format (pure)."""

from __future__ import annotations

from typing import Any

import orjson

STREAMABLE = frozenset({"chat.completions", "completions", "responses"})


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def as_stream(kind: str, answer: dict[str, Any], include_usage: bool) -> bytes:
    """The SSE body of ``answer`` (a chat.completion or text_completion object): the whole text of each choice
    in one chunk, its finish reason in the next, the usage chunk when ``include_usage`` asked for it, then
    ``[DONE]``. Raises ValueError for an answer it cannot rebuild."""
    if kind == "responses":
        return _responses_stream(answer)
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


def _responses_stream(answer: dict[str, Any]) -> bytes:
    """A Responses API answer as its stream: ``response.created`` and ``in_progress`` (the response without its
    output), each output item added, its text or arguments in one delta and done, the item done, then
    ``response.completed`` with the whole response (its usage too), each event numbered as the API numbers them."""
    output = answer.get("output")
    if answer.get("object") != "response" or not isinstance(output, list):
        raise ValueError("cannot rebuild a responses stream: not a response object")
    out: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        body = {"type": kind, "sequence_number": len(out), **fields}
        out.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n")

    start = {**answer, "status": "in_progress", "output": [], "usage": None}
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for i, item in enumerate(output):
        if not isinstance(item, dict):
            raise ValueError("an output item is not an object")
        ident = item.get("id")
        kind = item.get("type")
        if kind == "message":
            emit("response.output_item.added", output_index=i,
                 item={**item, "status": "in_progress", "content": []})
            for j, part in enumerate(item.get("content") or []):
                if not isinstance(part, dict):
                    raise ValueError("a content part is not an object")
                where = {"item_id": ident, "output_index": i, "content_index": j}
                text_kind = part.get("type") == "output_text"
                emit("response.content_part.added", **where,
                     part={**part, "text": ""} if text_kind else {**part, "refusal": ""})
                if text_kind:
                    emit("response.output_text.delta", **where, delta=part.get("text", ""), logprobs=[])
                    emit("response.output_text.done", **where, text=part.get("text", ""), logprobs=[])
                elif part.get("type") == "refusal":
                    emit("response.refusal.delta", **where, delta=part.get("refusal", ""))
                    emit("response.refusal.done", **where, refusal=part.get("refusal", ""))
                emit("response.content_part.done", **where, part=part)
        elif kind == "function_call":
            emit("response.output_item.added", output_index=i, item={**item, "status": "in_progress",
                                                                      "arguments": ""})
            emit("response.function_call_arguments.delta", item_id=ident, output_index=i,
                 delta=item.get("arguments", ""))
            emit("response.function_call_arguments.done", item_id=ident, output_index=i,
                 arguments=item.get("arguments", ""))
        else:
            emit("response.output_item.added", output_index=i, item=item)
        emit("response.output_item.done", output_index=i, item=item)
    final = {"incomplete": "response.incomplete", "failed": "response.failed"}.get(answer.get("status") or "",
                                                                                   "response.completed")
    emit(final, response=answer)
    return b"".join(out)
