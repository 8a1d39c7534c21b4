"""The ``[[eval]]`` tables of a rules file (TOML): parse them, check every key, say which eval and key is wrong.

::

    [[eval]]
    name = "answers are JSON"
    check = "json_valid"
    model = "gpt-4o*"
    sample = 0.05

The same file may hold alert rules (``[[rule]]``, ``[notify]``): each reader takes its own tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velvet_core.alerts.rules import RulesError, _endpoint, read_toml
from velvet_core.alerts.rules import _Checker as _AlertChecker

MODEL_FREE = ("json_valid", "json_schema", "regex", "not_regex", "contains", "not_contains", "max_chars",
              "min_chars", "finished", "tool_args_valid")
CHECKS = (*MODEL_FREE, "judge")
SOURCES = ("live", "batch", "both")
VIAS = ("batch", "live")
PLACEHOLDERS = ("input", "output", "custom_id", "model")

_COMMON = {"name", "check", "model", "endpoint", "key", "tags", "source", "sample"}
_KEYS: dict[str, set[str]] = {
    "json_valid": set(), "finished": set(), "tool_args_valid": set(),
    "json_schema": {"schema", "schema_file"},
    "regex": {"pattern"}, "not_regex": {"pattern"},
    "contains": {"text", "ignore_case"}, "not_contains": {"text", "ignore_case"},
    "max_chars": {"chars"}, "min_chars": {"chars"},
    "judge": {"judge_model", "prompt", "via", "pass_at", "max_usd_per_day"},
}


class EvalsError(RulesError):
    """A rules file's ``[[eval]]`` at fault: the message names the file, the eval and the key."""


class _Checker(_AlertChecker):
    def fail(self, key: str, why: str) -> EvalsError:
        return EvalsError(f"{self.label}: {key}: {why}")


@dataclass(frozen=True)
class Eval:
    """One ``[[eval]]``: a check, the answers it applies to (the alert rules' filters) and its share."""

    name: str
    check: str
    models: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    source: str = "live"
    sample: float = 1.0
    schema: dict[str, Any] | None = field(default=None, compare=False)
    pattern: str | None = None
    text: str | None = None
    ignore_case: bool = False
    chars: int | None = None
    judge_model: str | None = None
    prompt: str | None = None
    via: str = "batch"
    pass_at: float = 0.5
    max_usd_per_day: float | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return ("live", "batch") if self.source == "both" else (self.source,)


@dataclass(frozen=True)
class EvalSet:
    evals: tuple[Eval, ...]
    path: str = ""

    def named(self, name: str) -> Eval:
        for e in self.evals:
            if e.name == name:
                return e
        raise EvalsError(f"{self.path}: no eval named {name!r} (it has {', '.join(e.name for e in self.evals)})")


def load_evals(path: str | Path) -> EvalSet:
    """Read and check the ``[[eval]]`` tables of a file."""
    p, data = read_toml(path, "eval rules", EvalsError)
    return parse_evals(data, str(p), base=p.parent)


def parse_evals(data: dict[str, Any], where: str = "evals", base: Path | None = None) -> EvalSet:
    if extra := sorted(set(data) - {"eval", "rule", "notify"}):
        raise EvalsError(f"{where}: unknown table or key {extra[0]!r} (use [[eval]])")
    raw = data.get("eval")
    if not isinstance(raw, list) or not raw:
        raise EvalsError(f"{where}: no [[eval]] defined")
    evals: list[Eval] = []
    for i, table in enumerate(raw, 1):
        e = _eval(table, i, where, base or Path.cwd())
        if any(x.name == e.name for x in evals):
            raise EvalsError(f"{where}: eval {e.name!r}: name: used by two evals (names must be unique)")
        evals.append(e)
    return EvalSet(tuple(evals), where)


def _eval(raw: Any, index: int, where: str, base: Path) -> Eval:
    if not isinstance(raw, dict):
        raise EvalsError(f"{where}: eval #{index}: must be a table ([[eval]])")
    name = raw.get("name")
    label = f"{where}: eval {name!r}" if isinstance(name, str) and name.strip() else f"{where}: eval #{index}"
    c = _Checker(raw, label)
    if not isinstance(name, str) or not name.strip():
        raise EvalsError(f"{label}: name: is required (a non-empty string shown everywhere)")
    check = raw.get("check")
    if check not in CHECKS:
        raise EvalsError(f"{label}: check: must be one of {', '.join(CHECKS)}, got {check!r}")
    allowed = _COMMON | _KEYS[check]
    if extra := sorted(set(raw) - allowed):
        raise EvalsError(f"{label}: {extra[0]}: not a key of check {check} "
                         f"(it takes {', '.join(sorted(allowed))})")
    tags = raw.get("tags", {})
    if not isinstance(tags, dict) or not all(isinstance(v, str | int) and not isinstance(v, bool)
                                             for v in tags.values()):
        raise EvalsError(f'{label}: tags: must be a table of strings, e.g. tags = {{feature = "search"}}')
    sample = c.number("sample", 1.0, low=0.001, high=1.0)
    kw: dict[str, Any] = {
        "name": name, "check": check, "models": c.strings("model"), "keys": c.strings("key"),
        "endpoints": tuple(_endpoint(e) for e in c.strings("endpoint")),
        "tags": tuple(sorted((str(k), str(v)) for k, v in tags.items())),
        "source": c.choice("source", SOURCES, "live"), "sample": sample,
    }
    if check in ("regex", "not_regex"):
        kw["pattern"] = _pattern(c)
    elif check in ("contains", "not_contains"):
        text = raw.get("text")
        if not isinstance(text, str) or not text:
            raise c.fail("text", "is required (a non-empty string)")
        ignore = raw.get("ignore_case", False)
        if not isinstance(ignore, bool):
            raise c.fail("ignore_case", f"must be true or false, got {ignore!r}")
        kw.update(text=text, ignore_case=ignore)
    elif check in ("max_chars", "min_chars"):
        n = raw.get("chars")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise c.fail("chars", f"is required: a whole number of characters >= 0, got {n!r}")
        kw["chars"] = n
    elif check == "json_schema":
        kw["schema"] = _schema(c, base)
    elif check == "judge":
        kw.update(_judge(c))
    return Eval(**kw)


def _pattern(c: _Checker) -> str:
    import regex

    pattern = c.table.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise c.fail("pattern", "is required (a regular expression)")
    try:
        regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError) as e:
        raise c.fail("pattern", f"not a valid regular expression: {e}") from None
    return pattern


def _schema(c: _Checker, base: Path) -> dict[str, Any]:
    import jsonschema
    import orjson

    inline, path = c.table.get("schema"), c.table.get("schema_file")
    if (inline is None) == (path is None):
        raise c.fail("schema", "give exactly one of schema = {…} or schema_file = \"…\"")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise c.fail("schema_file", "must be a file name")
        p = (base / path).expanduser()
        try:
            inline = orjson.loads(p.read_bytes())
        except OSError as e:
            raise c.fail("schema_file", f"cannot read {p}: {e.strerror or e}") from None
        except orjson.JSONDecodeError as e:
            raise c.fail("schema_file", f"{p} is not JSON: {e}") from None
    if not isinstance(inline, dict | bool):
        raise c.fail("schema_file" if path else "schema", "must be a JSON Schema (an object)")
    try:
        jsonschema.Draft202012Validator.check_schema(inline)
    except jsonschema.SchemaError as e:
        raise c.fail("schema_file" if path else "schema",
                     f"not a valid JSON Schema (2020-12): {e.message}") from None
    return inline if isinstance(inline, dict) else {"not": {}} if inline is False else {}


def _judge(c: _Checker) -> dict[str, Any]:
    import string

    model = c.table.get("judge_model")
    if not isinstance(model, str) or not model:
        raise c.fail("judge_model", "is required (the model that judges, e.g. \"gpt-4.1-mini\")")
    prompt = c.table.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise c.fail("prompt", "is required (the judge's instructions, with {output})")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None}
    except ValueError as e:
        raise c.fail("prompt", f"{e} (write {{{{ and }}}} for literal braces)") from None
    if "output" not in fields:
        raise c.fail("prompt", "must contain {output} (the answer the judge scores)")
    if bad := sorted(f for f in fields if f not in PLACEHOLDERS and not f.startswith("tags.")):
        raise c.fail("prompt", f"unknown placeholder {{{bad[0]}}} (use {{input}}, {{output}}, {{custom_id}}, "
                               "{model} or {tags.NAME})")
    return {"judge_model": model, "prompt": prompt, "via": c.choice("via", VIAS, "batch"),
            "pass_at": c.number("pass_at", 0.5, low=0.0, high=1.0),
            "max_usd_per_day": c.number("max_usd_per_day", None, low=0.0)}
