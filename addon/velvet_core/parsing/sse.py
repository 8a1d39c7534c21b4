"""Server-sent events: an incremental parser and the reassembly of chat, completions and responses streams."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(slots=True)
class Event:
    event: str | None
    data: str
    end: int  # offset in the decoded stream just past this event


class SSEParser:
    """Feed decoded bytes; get complete events. Handles ``\\n``, ``\\r\\n`` and ``\\r`` line ends."""

    def __init__(self) -> None:
        self._buf = b""
        self._offset = 0  # stream offset of self._buf[0]
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        self._buf += chunk
        events: list[Event] = []
        buf, pos = self._buf, 0
        while True:
            nl = _line_end(buf, pos)
            if nl is None:
                break
            end, nxt = nl
            line = buf[pos:end].decode("utf-8", "replace")
            pos = nxt
            if not line:
                if self._data or self._event:
                    events.append(Event(self._event, "\n".join(self._data), self._offset + pos))
                self._event, self._data = None, []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
        self._buf = buf[pos:]
        self._offset += pos
        return events

    def close(self) -> list[Event]:
        """End of stream: a final lone ``\r`` ends its line."""
        if not self._buf.endswith(b"\r"):
            return []
        self._buf = self._buf[:-1] + b"\n"
        return self.feed(b"")

    @property
    def pending(self) -> bool:
        """True when bytes or an unterminated event are left (the stream was cut)."""
        return bool(self._buf.strip() or self._data)


def _line_end(buf: bytes, pos: int) -> tuple[int, int] | None:
    """(end of line, start of next line) or None if no full line is buffered."""
    n = buf.find(b"\n", pos)
    r = buf.find(b"\r", pos, n if n >= 0 else len(buf))
    if r >= 0:
        if r + 1 == len(buf):
            return None  # may be the first half of \r\n
        return (r, r + 2) if buf[r + 1 : r + 2] == b"\n" else (r, r + 1)
    return (n, n + 1) if n >= 0 else None


@dataclass
class StreamResult:
    """What a stream amounted to."""

    body: dict[str, Any] | None = None  # a non-streamed-shaped object rebuilt from the events
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    model: str | None = None
    service_tier: str | None = None
    complete: bool = False
    first_token_offset: int | None = None
    error: dict[str, Any] | None = None
    events: int = 0
    bad_events: int = 0
    problems: list[str] = field(default_factory=list)


def _text(v: Any) -> str | None:
    """A value the result types as text: a JSON string, else nothing (a fuzzed "model": true must not reach a
    text column, where PostgreSQL refuses to compare it, nor the pricer)."""
    return v if isinstance(v, str) else None


def reassemble(data: bytes, kind: str) -> StreamResult:
    """Rebuild a stream from its decoded SSE bytes: ``kind`` is ``responses``, ``completions`` (the
    legacy endpoint, whose chunks carry ``choices[].text``) or anything else for chat.completions."""
    parser = SSEParser()
    events = parser.feed(data) + parser.close()
    res = StreamResult()
    if kind == "responses":
        _responses(events, res)
    elif kind == "completions":
        _completions(events, res)
    else:
        _chat(events, res)
    if parser.pending:
        res.problems.append("stream ended inside an event")
    if not res.complete:
        res.problems.append("truncated stream: no end-of-stream event")
    return res


def _load(ev: Event, res: StreamResult) -> Any:
    try:
        return orjson.loads(ev.data)
    except orjson.JSONDecodeError:
        res.bad_events += 1
        return None


def _chunks(events: list[Event], res: StreamResult, meta: dict[str, Any],
            keys: tuple[str, ...]) -> Iterator[tuple[Event, dict[str, Any]]]:
    """The chunk objects of a chat or completions stream; ``[DONE]``, errors, ``keys`` (into ``meta``) and
    usage are taken care of here."""
    for ev in events:
        res.events += 1
        if ev.data.strip() == "[DONE]":
            res.complete = True
            continue
        obj = _load(ev, res)
        if not isinstance(obj, dict):
            continue
        if "error" in obj and not obj.get("choices"):
            res.error = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            continue
        for k in keys:
            if obj.get(k) is not None:
                meta[k] = obj[k]
        if isinstance(obj.get("usage"), dict):
            res.usage = obj["usage"]
        yield ev, obj


def _chat(events: list[Event], res: StreamResult) -> None:
    choices: dict[int, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    for ev, obj in _chunks(events, res, meta, ("id", "created", "model", "system_fingerprint", "service_tier")):
        for ch in obj.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            c = choices.setdefault(ch.get("index", 0), {"content": [], "tool_calls": {}, "role": None,
                                                        "finish_reason": None, "refusal": []})
            delta = ch.get("delta") or {}
            if delta.get("role"):
                c["role"] = delta["role"]
            got = False
            if isinstance(delta.get("content"), str) and delta["content"]:
                c["content"].append(delta["content"])
                got = True
            if isinstance(delta.get("refusal"), str) and delta["refusal"]:
                c["refusal"].append(delta["refusal"])
                got = True
            for tc in delta.get("tool_calls") or ():
                got = True
                slot = c["tool_calls"].setdefault(tc.get("index", 0), {"id": None, "type": "function",
                                                                      "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if got and res.first_token_offset is None:
                res.first_token_offset = ev.end
            if ch.get("finish_reason"):
                c["finish_reason"] = ch["finish_reason"]
    out_choices = []
    for idx in sorted(choices):
        c = choices[idx]
        msg: dict[str, Any] = {"role": c["role"] or "assistant", "content": "".join(c["content"]) or None}
        if c["refusal"]:
            msg["refusal"] = "".join(c["refusal"])
        if c["tool_calls"]:
            msg["tool_calls"] = [c["tool_calls"][i] for i in sorted(c["tool_calls"])]
        out_choices.append({"index": idx, "message": msg, "finish_reason": c["finish_reason"]})
    if out_choices:
        res.text = out_choices[0]["message"]["content"] or ""
        res.finish_reason = _text(out_choices[0]["finish_reason"])
    res.model = _text(meta.get("model"))
    res.service_tier = _text(meta.get("service_tier"))
    res.body = {"object": "chat.completion", **meta, "choices": out_choices, "usage": res.usage}


def _completions(events: list[Event], res: StreamResult) -> None:
    """Legacy ``/v1/completions``: each chunk is a ``text_completion`` whose choices carry ``text``."""
    choices: dict[int, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    for ev, obj in _chunks(events, res, meta, ("id", "created", "model", "system_fingerprint")):
        for ch in obj.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            c = choices.setdefault(ch.get("index", 0), {"text": [], "finish_reason": None, "logprobs": None})
            if isinstance(ch.get("text"), str) and ch["text"]:
                c["text"].append(ch["text"])
                if res.first_token_offset is None:
                    res.first_token_offset = ev.end
            if ch.get("finish_reason"):
                c["finish_reason"] = ch["finish_reason"]
            if isinstance(ch.get("logprobs"), dict):  # per-chunk token logprobs: keep them joined
                lp = c["logprobs"] = c["logprobs"] or {}
                for key, value in ch["logprobs"].items():
                    if isinstance(value, list):
                        lp.setdefault(key, []).extend(value)
    out = [{"index": i, "text": "".join(choices[i]["text"]), "finish_reason": choices[i]["finish_reason"],
            "logprobs": choices[i]["logprobs"]} for i in sorted(choices)]
    if out:
        res.text = out[0]["text"]
        res.finish_reason = _text(out[0]["finish_reason"])
    res.model = _text(meta.get("model"))
    res.body = {"object": "text_completion", **meta, "choices": out, "usage": res.usage}


def _responses(events: list[Event], res: StreamResult) -> None:
    text: list[str] = []
    final: dict[str, Any] | None = None
    for ev in events:
        res.events += 1
        obj = _load(ev, res)
        if not isinstance(obj, dict):
            continue
        typ = obj.get("type") or ev.event or ""
        if typ.endswith(".delta") and res.first_token_offset is None:
            res.first_token_offset = ev.end
        if typ == "response.output_text.delta" and isinstance(obj.get("delta"), str):
            text.append(obj["delta"])
        elif typ in ("response.created", "response.in_progress") and isinstance(obj.get("response"), dict):
            final = final or obj["response"]
        elif typ in ("response.completed", "response.incomplete", "response.failed"):
            if isinstance(obj.get("response"), dict):
                final = obj["response"]
            res.complete = True
        elif typ == "error":
            res.error = {k: obj.get(k) for k in ("type", "code", "message", "param") if k in obj}
            res.complete = True
    res.text = "".join(text)
    if final:
        res.model = _text(final.get("model"))
        res.service_tier = _text(final.get("service_tier"))
        res.usage = final.get("usage") if isinstance(final.get("usage"), dict) else None
        res.finish_reason = _text(final.get("status"))
        if isinstance(final.get("error"), dict) and res.error is None:
            res.error = final["error"]
        body = dict(final)
        if not res.complete:
            body["status"] = "incomplete"
            res.finish_reason = None
        res.body = body
