"""The checks that need no model: each scores one answer 1 or 0, skips an answer that is not text, and records
an error (never hangs) when an answer is too much for it: a regular expression has a time limit on each match,
and an answer too large to validate against a schema is not parsed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from velvet_core.evals.answer import Answer
from velvet_core.evals.rules import Eval

REGEX_SECONDS = 1.0  # the time limit of one match
MAX_SCHEMA_CHARS = 5_000_000  # answers longer than this are not validated against a schema (an error)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a check made of one answer: ``status`` is scored, error or skipped."""

    status: str
    score: float | None = None
    passed: bool | None = None
    reason: str | None = None


def scored(ok: bool, why_not: str) -> Outcome:
    return Outcome("scored", 1.0 if ok else 0.0, ok, None if ok else why_not)


def skipped(why: str) -> Outcome:
    return Outcome("skipped", reason=why)


def error(why: str) -> Outcome:
    return Outcome("error", reason=why)


def run(rule: Eval, answer: Answer) -> Outcome:
    """Score ``answer`` with ``rule``'s model-free check."""
    if answer.failed:
        return skipped("the call failed: no answer to check")
    fn = _CHECKS[rule.check]
    if rule.check not in ("finished", "tool_args_valid") and answer.text is None:
        return skipped("the answer is not text" if not answer.is_text_endpoint else "the answer has no text")
    try:
        return fn(rule, answer)
    except TimeoutError:
        return error(f"the pattern took over {REGEX_SECONDS:g} s on this answer: stopped")
    except (RecursionError, MemoryError, OverflowError) as e:
        return error(f"the check could not run on this answer: {type(e).__name__}")


def _json_valid(rule: Eval, a: Answer) -> Outcome:
    try:
        orjson.loads(a.text or "")
    except orjson.JSONDecodeError as e:
        return scored(False, f"not JSON: {str(e)[:120]}")
    return scored(True, "")


_validators: dict[str, Any] = {}  # by eval name: a rule's schema is checked once, when the rules are read


def _validator(name: str, schema: dict[str, Any]) -> Any:
    import jsonschema

    v = _validators.get(name)
    if v is None or v.schema is not schema:
        v = _validators[name] = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    return v


def _tool_validator(schema: Any) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(schema)


def _json_schema(rule: Eval, a: Answer) -> Outcome:
    text = a.text or ""
    if len(text) > MAX_SCHEMA_CHARS:
        return error(f"the answer is too large to validate ({len(text):,} characters)")
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        return scored(False, f"not JSON: {str(e)[:120]}")
    assert rule.schema is not None
    err = next(iter(_validator(rule.name, rule.schema).iter_errors(doc)), None)
    if err is None:
        return scored(True, "")
    where = "/".join(str(p) for p in err.absolute_path) or "(root)"
    return scored(False, f"{where}: {err.message[:200]}")


def _search(rule: Eval, a: Answer) -> bool:
    import regex

    assert rule.pattern is not None
    return regex.search(rule.pattern, a.text or "", timeout=REGEX_SECONDS) is not None


def _regex(rule: Eval, a: Answer) -> Outcome:
    return scored(_search(rule, a), f"no match for /{rule.pattern}/")


def _not_regex(rule: Eval, a: Answer) -> Outcome:
    return scored(not _search(rule, a), f"matches /{rule.pattern}/")


def _has(rule: Eval, a: Answer) -> bool:
    assert rule.text is not None
    text = a.text or ""
    return rule.text.casefold() in text.casefold() if rule.ignore_case else rule.text in text


def _contains(rule: Eval, a: Answer) -> Outcome:
    return scored(_has(rule, a), f"does not contain {rule.text!r}")


def _not_contains(rule: Eval, a: Answer) -> Outcome:
    return scored(not _has(rule, a), f"contains {rule.text!r}")


def _max_chars(rule: Eval, a: Answer) -> Outcome:
    n = len(a.text or "")
    return scored(n <= (rule.chars or 0), f"{n:,} characters, over {rule.chars:,}")


def _min_chars(rule: Eval, a: Answer) -> Outcome:
    n = len(a.text or "")
    return scored(n >= (rule.chars or 0), f"{n:,} characters, under {rule.chars:,}")


def _finished(rule: Eval, a: Answer) -> Outcome:
    if not a.is_text_endpoint:
        return skipped("the answer is not text")
    if a.refusal:
        return scored(False, "the model refused")
    if a.finish_reason in ("length", "content_filter", "max_output_tokens"):
        return scored(False, f"finish_reason {a.finish_reason}")
    return scored(True, "")


def _tool_args_valid(rule: Eval, a: Answer) -> Outcome:
    calls = a.tool_calls
    if not calls:
        return skipped("no tool calls")
    schemas = a.tool_schemas
    for name, arguments in calls:
        try:
            args = orjson.loads(arguments) if isinstance(arguments, str) else arguments
        except orjson.JSONDecodeError as e:
            return scored(False, f"{name}: arguments are not JSON: {str(e)[:120]}")
        schema = schemas.get(name) if name else None
        if schema is None:
            continue
        try:
            err = next(iter(_tool_validator(schema).iter_errors(args)), None)
        except Exception:  # (a request's own schema that is not valid JSON Schema: nothing to hold it to)
            continue
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path) or "(root)"
            return scored(False, f"{name}: {where}: {err.message[:200]}")
    return scored(True, "")


_CHECKS: dict[str, Callable[[Eval, Answer], Outcome]] = {
    "json_valid": _json_valid, "json_schema": _json_schema, "regex": _regex, "not_regex": _not_regex,
    "contains": _contains, "not_contains": _not_contains, "max_chars": _max_chars, "min_chars": _min_chars,
    "finished": _finished, "tool_args_valid": _tool_args_valid,
}
