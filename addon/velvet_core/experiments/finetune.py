"""``velvet export --format finetune``: successful chat answers as OpenAI chat fine-tuning lines,
``{"messages": [... the request's turns ..., {"role": "assistant", ...}], "tools"?, "parallel_tool_calls"?}``.

Chat completions keep their messages (``developer`` becomes ``system``, the roles fine-tuning takes are
system, user, assistant, tool and function) and the answer's content or tool calls; Responses API calls
become messages when their input and output are text. Anything else is skipped and counted."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from velvet_core.experiments.select import Logged

_KEEP = {"system": ("role", "content", "name"), "user": ("role", "content", "name"),
         "assistant": ("role", "content", "name", "tool_calls", "function_call", "refusal", "weight"),
         "tool": ("role", "content", "tool_call_id"), "function": ("role", "content", "name")}


class Skip(Exception):
    """A record that makes no fine-tuning example; the message says why."""


def example(item: Logged) -> dict[str, Any]:
    """One fine-tuning line, or :class:`Skip`."""
    if not item.ok or not isinstance(item.response, dict):
        raise Skip("no successful answer")
    if item.url.endswith("/chat/completions"):
        return _chat(item.body, item.response)
    if item.url.endswith("/responses"):
        return _responses(item.body, item.response)
    raise Skip("not a chat endpoint")


def _message(m: Any) -> dict[str, Any]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise Skip("a message without a role")
    role = "system" if m["role"] == "developer" else m["role"]
    if role not in _KEEP:
        raise Skip(f"a {role!r} message")
    out = {k: m[k] for k in _KEEP[role] if m.get(k) is not None}
    out["role"] = role
    if role != "assistant" and "content" not in out:
        raise Skip(f"a {role} message without content")
    return out


def _answer(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise Skip("no answer message")
    out: dict[str, Any] = {"role": "assistant"}
    if isinstance(msg.get("content"), str):
        out["content"] = msg["content"]
    calls = [c for c in msg.get("tool_calls") or [] if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    if calls:
        out["tool_calls"] = [{"id": c.get("id"), "type": c.get("type", "function"),
                              "function": {"name": c["function"].get("name"),
                                           "arguments": c["function"].get("arguments")}} for c in calls]
    if "content" not in out and not out.get("tool_calls"):
        raise Skip("an answer with neither content nor tool calls (a refusal?)")
    return out


def _chat(request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Skip("no messages")
    choices = response.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    line: dict[str, Any] = {"messages": [_message(m) for m in messages] + [_answer(first.get("message"))]}
    tools = request.get("tools")
    if isinstance(tools, list) and tools:
        fns = [t for t in tools if isinstance(t, dict) and t.get("type") == "function"]
        if len(fns) != len(tools):
            raise Skip("tools other than functions")
        line["tools"] = fns
    if isinstance(request.get("parallel_tool_calls"), bool):
        line["parallel_tool_calls"] = request["parallel_tool_calls"]
    return line


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text"):
                raise Skip("input that is not text")
            parts.append(str(p.get("text") or ""))
        return "".join(parts)
    raise Skip("input that is not text")


def _responses(request: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if isinstance(request.get("instructions"), str):
        messages.append({"role": "system", "content": request["instructions"]})
    given = request.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for item in given:
            if not isinstance(item, dict) or item.get("type", "message") != "message":
                raise Skip("input items other than messages")
            role = "system" if item.get("role") == "developer" else item.get("role")
            if role not in ("system", "user", "assistant"):
                raise Skip(f"a {role!r} input message")
            messages.append({"role": role, "content": _text(item.get("content"))})
    else:
        raise Skip("no input")
    if response.get("status") != "completed":
        raise Skip("an incomplete response")
    texts = []
    for item in response.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            texts.append(_text(item.get("content")))
        elif isinstance(item, dict) and item.get("type") != "reasoning":
            raise Skip(f"a {item.get('type')!r} output item")
    if not texts:
        raise Skip("no output text")
    return {"messages": [*messages, {"role": "assistant", "content": "".join(texts)}]}


def examples(items: Iterator[Logged], skipped: Counter[str]) -> Iterator[dict[str, Any] | None]:
    """A fine-tuning line per record (None for a skipped one, counted by reason in ``skipped``)."""
    for item in items:
        try:
            yield example(item)
        except Skip as e:
            skipped[str(e)] += 1
            yield None
