"""``velvet compare``: two runs of the same requests side by side. A run is a batch or an experiment (or an
experiment's source); lines pair by the original they stand for, else by custom_id; each metric gives a
value per line and a summary ``{"a", "b", "delta"}`` (delta = b - a)."""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from peewee import Database

from velvet_core import clock
from velvet_core.experiments.metrics import DEFAULT_METRICS, METRICS
from velvet_core.parsing import answers
from velvet_core.storage.models import Comparison, use
from velvet_core.storage.sql import has_table, iso, json_value, percentile, rows, stream_rows, to_dt

_VALUED = ("contains", "regex", "judge")


class CompareError(ValueError):
    """An unknown run or metric: a one-line usage error."""


@dataclass(frozen=True)
class Metric:
    name: str
    value: str | None = None  # contains' text, regex's pattern, judge's rubric, an eval's name
    rule: Any = None  # eval=NAME: the [[eval]] (velvet_evals) whose check scores each line


def parse_metrics(texts: Iterable[str] | None) -> list[Metric]:
    """``--metric NAME`` or ``NAME=VALUE`` (contains, regex, judge; ``judge=@FILE`` reads the rubric)."""
    if not texts:
        return [Metric(n) for n in DEFAULT_METRICS]
    out: dict[str, Metric] = {}
    for text in texts:
        head, given, rest = text.partition("=")  # a value (the last name's) may hold commas
        names = [n.strip() for n in head.split(",")]
        for i, name in enumerate(names):
            sep, value = (given, rest) if i == len(names) - 1 else ("", "")
            if name == "eval":  # eval=NAME: a model-free [[eval]] of the rules file (see attach_evals)
                if not (sep and value):
                    raise CompareError("--metric eval needs a value: eval=NAME (an [[eval]] of --rules)")
                if f"eval:{value}" in out:
                    raise CompareError(f"--metric eval={value} given twice")
                out[f"eval:{value}"] = Metric(f"eval:{value}", value)
                continue
            if name not in METRICS:
                raise CompareError(f"unknown metric {name!r}: use {', '.join(METRICS)}")
            if name in out:
                raise CompareError(f"--metric {name} given twice")
            if name in _VALUED and not (sep and value):
                raise CompareError(f"--metric {name} needs a value: {name}=" +
                                   {"contains": "TEXT", "regex": "PATTERN", "judge": "RUBRIC (or @FILE)"}[name])
            if name not in _VALUED and sep:
                raise CompareError(f"--metric {name} takes no value")
            if name == "regex":
                try:
                    re.compile(value)
                except re.error as e:
                    raise CompareError(f"--metric regex={value}: {e}") from None
            if name == "judge" and value.startswith("@"):
                try:
                    value = Path(value[1:]).expanduser().read_text()
                except OSError as e:
                    raise CompareError(f"--metric judge={value}: {e.strerror or e}") from None
            out[name] = Metric(name, value if sep else None)
    return list(out.values())


# -- the two sides ---------------------------------------------------------------------------------

@dataclass(slots=True)
class Answer:
    """One line of a run, reduced to what the metrics read."""

    id: str  # custom_id, or call-<id>
    key: tuple[Any, ...]  # the original request it stands for
    custom_id: str | None
    status_code: int | None
    ok: bool
    said: answers.Said
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    prompt: str = ""  # the last user turn, for a judge


@dataclass
class Side:
    label: str
    answers: list[Answer] = field(default_factory=list)
    turnaround_s: float | None = None


def _experiment(db: Database, ref: str) -> dict[str, Any] | None:
    if not has_table(db, "experiments"):
        return None
    found = rows(db, "SELECT * FROM experiments WHERE name = ?", (ref,)) or \
        rows(db, "SELECT * FROM experiments WHERE batch_id = ?", (ref,))
    return found[0] if found else None


def resolve(db: Database, ref: str, prompts: bool = False) -> Side:
    """An experiment (by name or batch id) or a batch."""
    exp = _experiment(db, ref)
    if exp is not None:
        return experiment_side(db, exp, prompts)
    if rows(db, "SELECT id FROM batches WHERE id = ? UNION SELECT batch_id FROM batch_requests "
                         "WHERE batch_id = ?", (ref, ref)):
        return batch_side(db, ref, prompts)
    raise CompareError(f"{ref!r} is neither an experiment nor a batch in this database")


def experiment(db: Database, name: str) -> dict[str, Any]:
    exp = _experiment(db, name)
    if exp is None:
        raise CompareError(f"no experiment {name!r} in this database")
    return exp


_BATCH_COLS = ("r.custom_id AS line_custom_id, r.body AS request_body, x.status_code, x.failed, "
               "x.body AS response_body, x.input_tokens, x.output_tokens, x.cost_usd")
_CALL_COLS = ("c.id AS call_id, c.request_body, c.status_code, c.complete, c.response_body, c.input_tokens, "
              "c.output_tokens, c.cost_usd, c.latency_ms, c.started_at, c.ended_at")
_MAP_COLS = "e.custom_id, e.source_batch_id, e.source_custom_id, e.source_call_id"


def _answer(r: dict[str, Any], ident: str, key: tuple[Any, ...], custom_id: str | None,
            prompts: bool) -> Answer:
    live = "complete" in r
    status = r.get("status_code")
    ok = status == 200 and (bool(r.get("complete")) if live else not r.get("failed"))
    said = answers.read(json_value(r.get("response_body"))) if ok else answers.Said()
    return Answer(ident, key, custom_id, status, ok, said, r.get("input_tokens"), r.get("output_tokens"),
                  r.get("cost_usd"), r.get("latency_ms"), to_dt(r.get("started_at")),
                  to_dt(r.get("ended_at")),
                  answers.prompt(json_value(r.get("request_body"))) if prompts else "")


def _source_key(r: dict[str, Any]) -> tuple[Any, ...]:
    if r["source_batch_id"] is not None:
        return ("batch", r["source_batch_id"], r["source_custom_id"])
    if r["source_call_id"] is not None:
        return ("call", int(r["source_call_id"]))
    if r["source_custom_id"] is not None:
        return ("custom_id", r["source_custom_id"])
    return ("line", r["custom_id"])


def batch_side(db: Database, batch_id: str, prompts: bool = False) -> Side:
    side = Side(batch_id, turnaround_s=_turnaround(db, batch_id))
    for r in stream_rows(db, f"SELECT {_BATCH_COLS} FROM batch_requests r LEFT JOIN batch_results x "
                                     "ON x.request_row_id = r.id WHERE r.batch_id = ? AND r.problem IS NULL "
                                     "ORDER BY r.line_no", (batch_id,)):
        cid = r["line_custom_id"]
        side.answers.append(_answer(r, cid, ("batch", batch_id, cid), cid, prompts))
    return side


def experiment_side(db: Database, exp: dict[str, Any], prompts: bool = False) -> Side:
    name = exp["name"]
    if exp["mode"] == "batch":
        side = Side(name, turnaround_s=_turnaround(db, exp["batch_id"]) if exp["batch_id"] else None)
        sql = (f"SELECT {_MAP_COLS}, {_BATCH_COLS} FROM experiment_lines e LEFT JOIN batch_requests r "
               "ON r.batch_id = ? AND r.custom_id = e.custom_id LEFT JOIN batch_results x "
               "ON x.request_row_id = r.id WHERE e.experiment = ? ORDER BY e.line_no")
        params: tuple[Any, ...] = (exp["batch_id"] or "", name)
    else:
        side = Side(name)
        sql = (f"SELECT {_MAP_COLS}, {_CALL_COLS} FROM experiment_lines e LEFT JOIN calls c "
               "ON c.request_id = e.request_id WHERE e.experiment = ? ORDER BY e.line_no")
        params = (name,)
    seen: set[str] = set()
    for r in stream_rows(db, sql, params):
        if r["custom_id"] in seen:  # one answer per line
            continue
        seen.add(r["custom_id"])
        side.answers.append(_answer(r, r["custom_id"], _source_key(r), r["source_custom_id"] or r["custom_id"],
                                    prompts))
    if exp["mode"] != "batch":
        starts = [a.started_at for a in side.answers if a.started_at]
        ends = [a.ended_at for a in side.answers if a.ended_at]
        if starts and ends:
            side.turnaround_s = (max(ends) - min(starts)).total_seconds()
    return side


def source_side(db: Database, exp: dict[str, Any], prompts: bool = False) -> Side:
    """The logged originals an experiment replayed."""
    name = exp["name"]
    side = Side(f"{name}:source")
    batches: set[str] = set()
    for r in stream_rows(
            db, f"SELECT {_MAP_COLS}, {_BATCH_COLS} FROM experiment_lines e JOIN batch_requests r "
                "ON r.batch_id = e.source_batch_id AND r.custom_id = e.source_custom_id LEFT JOIN batch_results x "
                "ON x.request_row_id = r.id WHERE e.experiment = ? ORDER BY e.line_no", (name,)):
        batches.add(r["source_batch_id"])
        side.answers.append(_answer(r, r["source_custom_id"], _source_key(r), r["source_custom_id"], prompts))
    for r in stream_rows(
            db, f"SELECT {_MAP_COLS}, {_CALL_COLS} FROM experiment_lines e JOIN calls c "
                "ON c.id = e.source_call_id WHERE e.experiment = ? AND e.source_batch_id IS NULL "
                "ORDER BY e.line_no", (name,)):
        side.answers.append(_answer(r, f"call-{r['call_id']}", _source_key(r), None, prompts))
    if not side.answers:
        raise CompareError(f"experiment {name!r} replayed requests that were never logged (--file, or --sql "
                           "without ids): compare it with another experiment or batch")
    if len(batches) == 1 and len(side.answers) == len({a.key for a in side.answers}):
        side.label = next(iter(batches))
        side.turnaround_s = _turnaround(db, side.label)
    return side


def _turnaround(db: Database, batch_id: str) -> float | None:
    found = rows(db, "SELECT turnaround_s FROM batches WHERE id = ?", (batch_id,))
    return found[0]["turnaround_s"] if found else None


def pair(a: Side, b: Side) -> tuple[list[tuple[Answer, Answer]], int]:
    """Pairs by the original each line stands for, else (unrelated runs) by custom_id; and the unpaired
    line count (both sides)."""
    def by(key: Callable[[Answer], Any], side: Side) -> dict[Any, Answer]:
        out: dict[Any, Answer] = {}
        for x in side.answers:
            out.setdefault(key(x), x)
        return out

    key: Callable[[Answer], Any] = lambda x: x.key  # noqa: E731
    bk = by(key, b)
    if not any(x.key in bk for x in a.answers):
        key = lambda x: ("custom_id", x.custom_id)  # noqa: E731
        bk = by(key, b)
    pairs = [(x, bk[key(x)]) for x in by(key, a).values() if key(x) in bk]
    return pairs, len(a.answers) + len(b.answers) - 2 * len(pairs)


# -- metrics ---------------------------------------------------------------------------------------


def _json_doc(text: str | None) -> Any:
    """An answer's JSON object or array, else None."""
    if text is None:
        return None
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict | list) else None


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _words(text: str) -> list[str]:
    return text.lower().split()


def similarity(x: answers.Said, y: answers.Said) -> float | None:
    """Normalised text similarity in 0..1: difflib's ratio over the lower-cased words; for embeddings, the
    cosine of the two vectors."""
    if x.vector is not None and y.vector is not None:
        dot = sum(p * q for p, q in zip(x.vector, y.vector, strict=False))
        norm = math.sqrt(sum(p * p for p in x.vector)) * math.sqrt(sum(q * q for q in y.vector))
        return round(dot / norm, 6) if norm else None
    if x.text is None or y.text is None:
        return None
    a, b = _words(x.text), _words(y.text)
    if not a and not b:
        return 1.0
    return round(difflib.SequenceMatcher(None, a, b, autojunk=False).ratio(), 6)


def _same(x: answers.Said, y: answers.Said) -> bool | None:
    if x.vector is not None and y.vector is not None:
        return x.vector == y.vector
    if x.text is None or y.text is None:
        return None
    return x.text == y.text


def _fields(x: answers.Said, y: answers.Said) -> list[str] | None:
    dx, dy = _json_doc(x.text), _json_doc(y.text)
    if not isinstance(dx, dict) or not isinstance(dy, dict):
        return None
    fx, fy = _flat(dx), _flat(dy)
    return sorted(k for k in fx.keys() | fy.keys() if fx.get(k, _MISSING) != fy.get(k, _MISSING))


_MISSING = object()


def side_value(m: Metric, x: Answer, scores: dict[str, float | None] | None = None) -> Any:
    """A per-side metric's value for one line."""
    if m.name in ("cost_usd", "input_tokens", "output_tokens"):
        return getattr(x, m.name)
    if m.name == "latency":
        return x.latency_ms
    if m.name == "finish_reason":
        return x.said.finish_reason
    if not x.ok:
        return None
    if m.name == "json_valid":
        return None if x.said.text is None else _json_doc(x.said.text) is not None
    if m.name == "contains":
        return None if x.said.text is None else (m.value or "") in x.said.text
    if m.name == "regex":
        return None if x.said.text is None else re.search(m.value or "", x.said.text) is not None
    if m.name == "judge":
        return (scores or {}).get(judge_key(x))
    if m.rule is not None:
        return eval_score(m.rule, x)
    return None


def attach_evals(metrics: list[Metric], rules_file: str | Path) -> list[Metric]:
    """The metrics, each ``eval=NAME`` with its rule from the rules file (a model-free check: a judge scores
    through ``velvet evals run``, or ``--metric judge``)."""
    if not any(m.name.startswith("eval:") for m in metrics):
        return metrics
    from velvet_core.evals.rules import EvalsError, load_evals

    try:
        rules = load_evals(rules_file)
        out = [replace(m, rule=rules.named(m.value or "")) if m.name.startswith("eval:") else m for m in metrics]
    except EvalsError as e:
        raise CompareError(str(e)) from None
    if judged := next((m for m in out if m.rule is not None and m.rule.check == "judge"), None):
        raise CompareError(f"--metric eval={judged.value}: a judge; use --metric judge=RUBRIC to compare with a "
                           "judge, or velvet evals run to score the lines")
    return out


def eval_score(rule: Any, x: Answer) -> float | None:
    """A model-free eval's score of one line (None when it does not apply: a failed line, not text)."""
    from velvet_core.evals import checks
    from velvet_core.evals.answer import Answer as Scored

    a = Scored(x.id, "batch", None, "chat.completions", None, None, None,
               streamed_text=x.said.text if x.said.text is not None else None,
               streamed_finish=x.said.finish_reason if isinstance(x.said.finish_reason, str) else None)
    if x.said.text is None and x.said.finish_reason is None:
        return None
    return checks.run(rule, a).score


def judge_key(x: Answer) -> str:
    return orjson.dumps([x.prompt, x.said.text]).decode()


def _delta(a: Any, b: Any) -> Any:
    if isinstance(a, bool) and isinstance(b, bool):
        return int(b) - int(a)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return _round(b - a)
    if isinstance(a, str) or isinstance(b, str):
        return None if a is None or b is None else a != b  # finish_reason: did it change
    return None


def _round(v: float) -> float:
    return round(v, 10) if isinstance(v, float) else v


def line_values(m: Metric, x: Answer, y: Answer, scores: dict[str, float | None] | None) -> dict[str, Any]:
    if m.name == "exact_match":
        return {"a": None, "b": None, "delta": _same(x.said, y.said)}
    if m.name == "similarity":
        return {"a": None, "b": None, "delta": similarity(x.said, y.said)}
    if m.name == "json_fields":
        return {"a": None, "b": None, "delta": _fields(x.said, y.said)}
    va, vb = side_value(m, x, scores), side_value(m, y, scores)
    return {"a": va, "b": vb, "delta": _delta(va, vb)}


def _share(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(bool(v) for v in known) / len(known), 6) if known else None


def _mean(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 6) if known else None


def _total(values: list[Any]) -> float | int | None:
    known = [v for v in values if v is not None]
    return _round(sum(known)) if known else None


def summary(m: Metric, lines: list[dict[str, Any]], a: Side, b: Side) -> dict[str, Any]:
    vals = [ln["metrics"][m.name] for ln in lines] if m.name != "turnaround" else []
    col = lambda k: [v[k] for v in vals]  # noqa: E731
    if m.name == "turnaround":
        sa, sb = a.turnaround_s, b.turnaround_s
    elif m.name in ("cost_usd", "input_tokens", "output_tokens"):
        sa, sb = _total(col("a")), _total(col("b"))
    elif m.name == "latency":
        sa, sb = (percentile([v for v in col(k) if v is not None], 50) for k in ("a", "b"))
    elif m.name in ("json_valid", "contains", "regex"):
        sa, sb = _share(col("a")), _share(col("b"))
    elif m.name == "judge" or m.name.startswith("eval:"):
        sa, sb = _mean(col("a")), _mean(col("b"))
    elif m.name == "finish_reason":
        ca, cb = Counter(v for v in col("a") if v), Counter(v for v in col("b") if v)
        return {"a": dict(ca), "b": dict(cb), "delta": {k: cb[k] - ca[k] for k in sorted(ca.keys() | cb.keys())}}
    elif m.name == "exact_match":
        return {"a": None, "b": None, "delta": _share(col("delta"))}
    elif m.name == "similarity":
        return {"a": None, "b": None, "delta": _mean(col("delta"))}
    else:  # json_fields: how many pairs differ in each field
        differ = Counter(k for v in col("delta") if v for k in v)
        return {"a": None, "b": None, "delta": dict(sorted(differ.items()))}
    return {"a": sa, "b": sb, "delta": None if sa is None or sb is None else _round(sb - sa)}


def compare(a: Side, b: Side, metrics: list[Metric],
            scores: dict[str, float | None] | None = None) -> dict[str, Any]:
    """The ``--json`` document: ``{"a", "b", "pairs", "unpaired", "metrics", "lines"}``."""
    pairs, unpaired = pair(a, b)
    lines = []
    per_line = [m for m in metrics if m.name != "turnaround"]  # a run's figure, not a line's
    for x, y in pairs:
        lines.append({"a": x.id, "b": y.id, "status": {"a": x.status_code, "b": y.status_code},
                      "metrics": {m.name: line_values(m, x, y, scores) for m in per_line}})
    return {"a": a.label, "b": b.label, "pairs": len(pairs), "unpaired": unpaired,
            "metrics": {m.name: summary(m, lines, a, b) for m in metrics}, "lines": lines}


# -- the record ------------------------------------------------------------------------------------

def record(db: Database, result: dict[str, Any], judge_batch_id: str | None = None) -> None:
    """Keep the summary (not the lines) for ``velvet report``."""
    with use(db):
        Comparison.insert(a=result["a"], b=result["b"], created_at=clock.now(),
                          pairs=result["pairs"], unpaired=result["unpaired"], judge_batch_id=judge_batch_id,
                          metrics=orjson.dumps(result["metrics"]).decode()).execute()


def latest_comparisons(db: Database, limit: int = 5) -> list[dict[str, Any]]:
    """The latest recorded comparison of each (a, b), newest first, at most ``limit``: ``{"a", "b",
    "created_at", "pairs", "unpaired", "metrics", "judge_batch_id"}`` (``metrics`` as ``velvet compare
    --json`` prints them). Empty when nothing was compared (or the schema predates comparisons)."""
    if not has_table(db, "comparisons"):
        return []
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for r in rows(db, "SELECT * FROM comparisons ORDER BY created_at DESC, id DESC LIMIT 1000"):
        if (r["a"], r["b"]) in seen:
            continue
        seen.add((r["a"], r["b"]))
        out.append({"a": r["a"], "b": r["b"], "created_at": iso(r["created_at"]), "pairs": r["pairs"],
                    "unpaired": r["unpaired"], "metrics": json_value(r["metrics"]),
                    "judge_batch_id": r["judge_batch_id"]})
        if len(out) >= limit:
            break
    return out
