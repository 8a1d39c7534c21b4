"""An LLM judge: its request for one answer (the rule's prompt filled, a JSON-schema reply asked for), its
reply read as ``{"score": 0..1, "reason": "…"}``, and its cost, estimated before sending and known after."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import orjson

from velvet_core.cost.prices import Pricer
from velvet_core.evals.answer import Answer
from velvet_core.evals.rules import Eval
from velvet_core.parsing.extract import Tokens, tokens_from_usage

TAG = "velvet-eval"  # the tag on judge traffic (and the batch metadata key): never itself judged
SUBMISSION = "velvet_eval_submission"  # a judge batch's metadata: the token that finds it again after a crash
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "judgement", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["score", "reason"],
    "properties": {"score": {"type": "number"}, "reason": {"type": "string"}}}}}
MAX_FIELD_CHARS = 100_000  # an input or output longer than this is cut (said so) in the judge's prompt
REPLY_TOKENS = 60  # the output a judge's reply is estimated at


def fill(rule: Eval, a: Answer) -> str:
    """The rule's prompt with its placeholders filled (``{{``/``}}`` are literal braces)."""
    assert rule.prompt is not None
    values = {"input": a.input_text, "output": a.text if a.text is not None else a.said.text or "",
              "custom_id": a.custom_id or "", "model": a.model or ""}
    out: list[str] = []
    for literal, name, _spec, _conv in string.Formatter().parse(rule.prompt):
        out.append(literal)
        if name is None:
            continue
        value = a.tags.get(name[5:], "") if name.startswith("tags.") else values.get(name, "")
        if len(value) > MAX_FIELD_CHARS:
            value = value[:MAX_FIELD_CHARS] + f"\n[… {len(value) - MAX_FIELD_CHARS:,} more characters cut]"
        out.append(value)
    # (a lone surrogate, from a JSON escape in a stored body, cannot be sent as UTF-8: replaced)
    return "".join(out).encode("utf-8", "replace").decode("utf-8")


def request(rule: Eval, a: Answer) -> dict[str, Any]:
    """The chat completions request body that judges ``a``."""
    return {"model": rule.judge_model, "messages": [{"role": "user", "content": fill(rule, a)}],
            "response_format": RESPONSE_FORMAT}


@dataclass(frozen=True, slots=True)
class Verdict:
    score: float | None
    reason: str
    cost_usd: float | None


def read(rule: Eval, body: Any, pricer: Pricer, *, batch: bool) -> Verdict:
    """A judge's answer (a chat completion) as a score; a reply not the JSON asked for scores None, saying why."""
    cost = None
    if isinstance(body, dict):
        cost = pricer.cost(rule.judge_model, tokens_from_usage(body.get("usage")), batch=batch)
    content = None
    choices = body.get("choices") if isinstance(body, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        msg = choices[0].get("message")
        content = msg.get("content") if isinstance(msg, dict) else None
    if not isinstance(content, str):
        return Verdict(None, "the judge gave no text", cost)
    try:
        got = orjson.loads(content)
    except orjson.JSONDecodeError:
        return Verdict(None, f"the judge's reply is not JSON: {content[:120]!r}", cost)
    score = got.get("score") if isinstance(got, dict) else None
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
        return Verdict(None, f"the judge's reply has no score from 0 to 1: {content[:120]!r}", cost)
    reason = got.get("reason")
    return Verdict(float(score), reason[:500] if isinstance(reason, str) else "", cost)


def estimate(rule: Eval, body: dict[str, Any], pricer: Pricer, *, batch: bool) -> float | None:
    """What judging with ``body`` should cost: its prompt at about 4 characters a token, and a short reply."""
    chars = sum(len(m["content"]) for m in body["messages"])
    tokens = Tokens(input=chars // 4 + 80, output=REPLY_TOKENS)
    return pricer.cost(rule.judge_model, tokens, batch=batch)
