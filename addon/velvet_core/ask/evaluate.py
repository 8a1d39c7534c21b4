"""``velvet ask --eval``: execution accuracy on a question set. Each question is asked afresh; its result set is
compared with the gold query's on the same database: as multisets unless the gold SQL has ``ORDER BY`` (then in
order), numbers equal within 1e-6, column names ignored."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from velvet_core.ask.context import dialect
from velvet_core.ask.copilot import Copilot, DBError, run_sql

TOLERANCE = 1e-6
_ORDER = re.compile(r"\border\s+by\b", re.I)


def _norm(v: Any) -> Any:
    """A value as compared: numbers as floats rounded to the tolerance, booleans as 0/1, times as ISO text."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float | Decimal):
        f = float(v)
        return f if not math.isfinite(f) else round(f / TOLERANCE) * TOLERANCE
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, bytes | memoryview):
        return bytes(v).decode("utf-8", "replace")
    if isinstance(v, dict | list):
        import orjson

        return orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
    if isinstance(v, str):
        try:  # SQLite gives timestamps as text, PostgreSQL as datetimes; numbers may come back as text
            return _norm(datetime.fromisoformat(v)) if len(v) >= 19 and v[4] == "-" and v[10] in " T" else v
        except ValueError:
            return v
    return v


def _row(r: list[Any]) -> tuple[Any, ...]:
    return tuple(_norm(v) for v in r)


def same(gold: list[list[Any]], got: list[list[Any]], ordered: bool) -> bool:
    """Whether two result sets are equal (see the module's docstring)."""
    a, b = [_row(r) for r in gold], [_row(r) for r in got]
    if ordered:
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if Counter(a) == Counter(b):
        return True
    return len(a) == len(b) and all(_close(x, y) for x, y in zip(sorted(a, key=repr), sorted(b, key=repr),
                                                                    strict=True))


def _close(x: tuple[Any, ...], y: tuple[Any, ...]) -> bool:
    if len(x) != len(y):
        return False
    for u, v in zip(x, y, strict=True):
        if isinstance(u, float) and isinstance(v, float):
            if not (u == v or abs(u - v) <= TOLERANCE * max(1.0, abs(u), abs(v))):
                return False
        elif u != v:
            return False
    return True


@dataclass
class Outcome:
    question: str
    category: str
    correct: bool
    attempts: int
    gold_sql: str
    sql: str | None
    error: str | None


@dataclass
class Report:
    model: str
    outcomes: list[Outcome] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        n = len(self.outcomes)
        cats: dict[str, list[Outcome]] = {}
        for o in self.outcomes:
            cats.setdefault(o.category, []).append(o)
        return {
            "model": self.model, "questions": n, "correct": sum(o.correct for o in self.outcomes),
            "accuracy": _ratio(sum(o.correct for o in self.outcomes), n),
            "attempts": sum(o.attempts for o in self.outcomes),
            "by_category": {c: {"questions": len(v), "correct": sum(o.correct for o in v),
                                "accuracy": _ratio(sum(o.correct for o in v), len(v))}
                            for c, v in sorted(cats.items())},
            "misses": [{"question": o.question, "category": o.category, "attempts": o.attempts,
                        "gold_sql": o.gold_sql, "sql": o.sql, "error": o.error}
                       for o in self.outcomes if not o.correct],
        }


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def evaluate(copilot: Copilot, questions: list[dict[str, Any]]) -> Report:
    """Ask each question afresh and compare its result with the gold SQL's (for this database's dialect)."""
    kind = dialect(copilot.db)
    report = Report(copilot.model)
    for q in questions:
        gold_sql = q.get(kind)
        if not isinstance(gold_sql, str):
            raise ValueError(f"question {q['question']!r} has no {kind} gold SQL")
        gold = run_sql(copilot.db, gold_sql, max_rows=100_000, timeout=copilot.timeout,
                       allow_powerful_role=copilot.allow_powerful_role)
        answer = copilot.ask(q["question"], fresh=True)
        ok = answer.result is not None and same(gold.rows, answer.result.rows, bool(_ORDER.search(gold_sql)))
        report.outcomes.append(Outcome(q["question"], str(q.get("category") or "-"), ok, answer.attempts,
                                       gold_sql, answer.sql, answer.error))
    return report


__all__ = ["DBError", "Report", "evaluate", "same"]
