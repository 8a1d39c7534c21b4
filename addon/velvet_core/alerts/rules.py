"""The alert rules file (TOML): parse it, check every key, and say which rule and key is wrong.

::

    [[rule]]
    name = "chat errors"
    kind = "error_rate"
    threshold = 0.2
    window = "5m"

    [notify]
    webhook = "https://hooks.example/..."
"""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

KINDS = ("error_rate", "latency_p95_ms", "ttft_p95_ms", "spend_usd", "spend_spike", "batch_overdue",
         "batch_failed", "batch_unread", "velvet_stalled", "eval_fail_rate", "eval_score")
BELOW_KINDS = ("eval_score",)  # these fire below their threshold (and warn below warning, which is above it)
BATCH_KINDS = ("batch_overdue", "batch_failed", "batch_unread")
NO_DATA = ("ok", "keep", "alert")
SOURCES = ("live", "batch", "both")

_COMMON = {"name", "kind", "window", "for", "no_data", "renotify"}
_FILTERS = {"model", "endpoint", "key", "tags"}
# the keys each kind takes besides _COMMON
_KEYS: dict[str, set[str]] = {
    "error_rate": _FILTERS | {"threshold", "warning", "min_calls", "status"},
    "latency_p95_ms": _FILTERS | {"threshold", "warning", "min_calls"},
    "ttft_p95_ms": _FILTERS | {"threshold", "warning", "min_calls"},
    "spend_usd": _FILTERS | {"threshold", "warning", "source"},
    "spend_spike": _FILTERS | {"factor", "warning", "source", "baseline", "min_usd"},
    "batch_overdue": _FILTERS | {"hours", "warning", "finalizing_hours"},
    "batch_failed": _FILTERS | {"threshold", "warning"},
    "batch_unread": _FILTERS | {"hours", "warning"},
    "velvet_stalled": set(),
    "eval_fail_rate": {"eval", "threshold", "warning", "min_calls"},
    "eval_score": {"eval", "threshold", "warning", "min_calls"},
}
_DEFAULT_WINDOW = {"error_rate": "5m", "latency_p95_ms": "5m", "ttft_p95_ms": "5m", "spend_usd": "1d",
                   "spend_spike": "1h", "batch_overdue": "7d", "batch_failed": "1d", "batch_unread": "7d",
                   "velvet_stalled": "2m", "eval_fail_rate": "1h", "eval_score": "1h"}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class RulesError(ValueError):
    """The rules file cannot be used; the message names the file, the rule and the key."""


def parse_duration(text: Any) -> float:
    """``30s``, ``5m``, ``2h``, ``1d``, ``1w`` (decimals allowed, e.g. ``1.5h``) in seconds."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if not m or float(m[1]) <= 0:
        raise ValueError(f"a duration such as 30s, 5m, 2h or 1d, got {text!r}")
    return float(m[1]) * _UNITS[m[2]]


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]``. Durations are in seconds; ``*_text`` keep what the file said."""

    name: str
    kind: str
    window: float
    window_text: str
    threshold: float | None = None  # the value the rule fires above (hours for batch_overdue/unread,
    warning: float | None = None  # the factor for spend_spike)
    for_: float = 0.0
    no_data: str = "ok"
    renotify: float | None = None
    min_calls: int = 1
    models: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    status: str | None = None  # error_rate: "429", "4xx" or "5xx"; None: any status >= 400
    source: str = "both"  # spend: live calls, batches or both
    baseline: float = 7 * 86400  # spend_spike: the trailing period averaged
    min_usd: float = 0.0
    finalizing_hours: float = 2.0
    eval: str | None = None  # eval_fail_rate / eval_score: the [[eval]] it reads (None: every eval)


@dataclass(frozen=True)
class Notify:
    """``[notify]``: where state changes are sent besides the log and the ``alerts`` table."""

    webhooks: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    secret: str | None = field(default=None, repr=False)
    timeout: float = 10.0
    retries: int = 5


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    notify: Notify
    path: str = ""


def read_toml(path: str | Path, what: str, error: type[RulesError] = RulesError) -> tuple[Path, dict[str, Any]]:
    """A rules file's path and tables (alert rules, eval rules: one file may hold both); ``error`` says why not."""
    p = Path(path).expanduser()
    try:
        return p, tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{p}: not valid TOML: {e}") from None


def load_rules(path: str | Path) -> RuleSet:
    """Read and check a rules file; :class:`RulesError` names the rule and key at fault."""
    p, data = read_toml(path, "alert rules")
    return parse_rules(data, str(p))


def parse_rules(data: dict[str, Any], where: str = "rules") -> RuleSet:
    if extra := sorted(set(data) - {"rule", "notify", "eval"}):  # ([[eval]]: answer checks, velvet_evals)
        raise RulesError(f"{where}: unknown table or key {extra[0]!r} (use [[rule]] and [notify])")
    raw_rules = data.get("rule")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RulesError(f"{where}: no [[rule]] defined")
    rules: list[Rule] = []
    for i, raw in enumerate(raw_rules, 1):
        rule = _rule(raw, i, where)
        if any(r.name == rule.name for r in rules):
            raise RulesError(f"{where}: rule {rule.name!r}: name: used by two rules (names must be unique)")
        rules.append(rule)
    return RuleSet(tuple(rules), _notify(data.get("notify", {}), where), where)


class _Checker:
    """Reads one table's keys, raising :class:`RulesError` with the rule's name and the key."""

    def __init__(self, table: dict[str, Any], label: str) -> None:
        self.table = table
        self.label = label

    def fail(self, key: str, why: str) -> RulesError:
        return RulesError(f"{self.label}: {key}: {why}")

    def number(self, key: str, default: float | None = None, *, low: float | None = 0.0,
               high: float | None = None, strict: bool = False) -> float | None:
        if key not in self.table:
            return default
        v = self.table[key]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail(key, f"must be a number, got {v!r}")
        if low is not None and (v < low or (strict and v == low)):
            raise self.fail(key, f"must be {'above' if strict else 'at least'} {low:g}, got {v!r}")
        if high is not None and v > high:
            raise self.fail(key, f"must be at most {high:g}, got {v!r}")
        return float(v)

    def duration(self, key: str, default: str | None) -> tuple[float | None, str | None]:
        v = self.table.get(key, default)
        if v is None:
            return None, None
        try:
            return parse_duration(v), v
        except ValueError as e:
            raise self.fail(key, f"must be {e}") from None

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        v = self.table.get(key, default)
        if v not in choices:
            raise self.fail(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {v!r}")
        return v

    def strings(self, key: str) -> tuple[str, ...]:
        v = self.table.get(key)
        if v is None:
            return ()
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
            raise self.fail(key, f"must be a string or a list of strings, got {v!r}")
        return tuple(items)


def _rule(raw: Any, index: int, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: rule #{index}: must be a table ([[rule]])")
    name = raw.get("name")
    label = f"{where}: rule {name!r}" if isinstance(name, str) and name.strip() else f"{where}: rule #{index}"
    c = _Checker(raw, label)
    if not isinstance(name, str) or not name.strip():
        raise c.fail("name", "is required (a non-empty string shown in every message)")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise c.fail("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    allowed = _COMMON | _KEYS[kind]
    if extra := sorted(set(raw) - allowed):
        raise c.fail(extra[0], f"not a key of kind {kind} (it takes {', '.join(sorted(allowed))})")
    window, window_text = c.duration("window", _DEFAULT_WINDOW[kind])
    assert window is not None and window_text is not None
    for_, _ = c.duration("for", "0s") if "for" in raw else (0.0, None)
    renotify, _ = c.duration("renotify", None)
    kw: dict[str, Any] = {
        "name": name, "kind": kind, "window": window, "window_text": window_text, "for_": for_ or 0.0,
        "no_data": c.choice("no_data", NO_DATA, "ok"), "renotify": renotify,
        "models": c.strings("model"), "keys": c.strings("key"),
        "endpoints": tuple(_endpoint(e) for e in c.strings("endpoint")),
    }
    tags = raw.get("tags", {})
    if not isinstance(tags, dict) or not all(isinstance(v, str | int) and not isinstance(v, bool)
                                             for v in tags.values()):
        raise c.fail("tags", f'must be a table of strings, e.g. tags = {{team = "search"}}, got {tags!r}')
    kw["tags"] = tuple(sorted((str(k), str(v)) for k, v in tags.items()))

    if kind in ("eval_fail_rate", "eval_score"):
        kw["threshold"] = c.number("threshold", high=1.0)
        ev = raw.get("eval")
        if ev is not None and (not isinstance(ev, str) or not ev):
            raise c.fail("eval", f"must be the name of an [[eval]], got {ev!r}")
        kw["eval"] = ev
    if kind == "error_rate":
        kw["threshold"] = c.number("threshold", high=1.0)
        kw["status"] = _status(c)
    elif kind in ("latency_p95_ms", "ttft_p95_ms", "spend_usd"):
        kw["threshold"] = c.number("threshold")
    elif kind == "spend_spike":
        kw["threshold"] = c.number("factor", 2.0, low=1.0, strict=True)
        baseline, _ = c.duration("baseline", "7d")
        kw["baseline"] = baseline
        kw["min_usd"] = c.number("min_usd", 0.0)
    elif kind == "batch_overdue":
        kw["threshold"] = c.number("hours", 20.0, low=0.0, strict=True)
        kw["finalizing_hours"] = c.number("finalizing_hours", 2.0, low=0.0, strict=True)
    elif kind == "batch_unread":
        kw["threshold"] = c.number("hours", 1.0, low=0.0, strict=True)
    elif kind == "batch_failed":
        kw["threshold"] = c.number("threshold", None, high=1.0)
    if kind in ("error_rate", "latency_p95_ms", "ttft_p95_ms", "spend_usd", "eval_fail_rate",
                "eval_score") and kw["threshold"] is None:
        raise c.fail("threshold", f"is required for kind {kind} (the value it fires above)")
    if kind in ("spend_usd", "spend_spike"):
        kw["source"] = c.choice("source", SOURCES, "both")
    if "min_calls" in raw:
        n = raw["min_calls"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise c.fail("min_calls", f"must be a whole number of at least 1, got {n!r}")
        kw["min_calls"] = n
    if "warning" in raw:
        limit_key = {"spend_spike": "factor", "batch_overdue": "hours", "batch_unread": "hours"}.get(kind,
                                                                                                     "threshold")
        if kw["threshold"] is None:
            raise c.fail("warning", f"needs {limit_key} (warning is a lower level than {limit_key})")
        kw["warning"] = c.number("warning", high=None)
        if kind in BELOW_KINDS:
            if kw["warning"] <= kw["threshold"]:
                raise c.fail("warning", f"must be above threshold ({kw['threshold']:g}) for kind {kind}, which "
                                        f"fires below it, got {kw['warning']:g}")
        elif kw["warning"] >= kw["threshold"]:
            raise c.fail("warning", f"must be below {limit_key} ({kw['threshold']:g}), got {kw['warning']:g}")
    return Rule(**kw)


def _endpoint(text: str) -> str:
    """``/v1/chat/completions`` or ``chat.completions``: both name the endpoint kind ``chat.completions``."""
    t = text.strip()
    if t.startswith("/"):
        t = t.removeprefix("/v1").strip("/").replace("/", ".")
    return t


def _status(c: _Checker) -> str | None:
    v = c.table.get("status")
    if v is None:
        return None
    s = str(v).strip().lower()
    if isinstance(v, bool) or not (re.fullmatch(r"[1-5]\d\d", s) or re.fullmatch(r"[1-5]xx", s)):
        raise c.fail("status", f"must be a status code such as 429 or a class such as \"5xx\", got {v!r}")
    return s


def _notify(raw: Any, where: str) -> Notify:
    c = _Checker(raw if isinstance(raw, dict) else {}, f"{where}: [notify]")
    if not isinstance(raw, dict):
        raise c.fail("notify", "must be a table")
    if extra := sorted(set(raw) - {"webhook", "command", "secret", "timeout", "retries"}):
        raise c.fail(extra[0], "unknown key (it takes webhook, command, secret, timeout, retries)")
    hooks = c.strings("webhook")
    for h in hooks:
        u = urlsplit(h)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise c.fail("webhook", "must be an http:// or https:// URL")  # (the URL may hold a token: not shown)
    command: tuple[str, ...] = ()
    if "command" in raw:
        cmd = raw["command"]
        try:
            command = tuple(shlex.split(cmd)) if isinstance(cmd, str) else tuple(c.strings("command"))
        except ValueError as e:
            raise c.fail("command", f"cannot be split into words: {e}") from None
        if not command:
            raise c.fail("command", "must name a program")
    secret = raw.get("secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise c.fail("secret", "must be a non-empty string")
    timeout = c.number("timeout", 10.0, low=0.0, strict=True)
    retries = raw.get("retries", 5)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
        raise c.fail("retries", f"must be a whole number from 0 to 20, got {retries!r}")
    assert timeout is not None
    return Notify(hooks, command, secret, timeout, retries)
