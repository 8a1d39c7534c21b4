"""What the model is told: the schema as it is in this database (tables, views, columns, types) with each column's
meaning (:mod:`velvet_core.storage.meanings`), the dialect and how it reads JSON, the current UTC time, and worked
examples from the question set. When the schema is large, only the tables the question seems to need."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from peewee import Database, PostgresqlDatabase

from velvet_core.storage.meanings import TABLES, meaning

MARK = "You are velvet's SQL copilot."
"""The first words of the system message (the test stand-in knows a copilot request by them)."""
QUESTIONS = Path(__file__).with_name("questions.jsonl")
SCHEMA_BUDGET = 24_000  # characters of schema text above which only the tables a question needs are shown
ALWAYS = ("calls", "batches", "batch_lines")  # shown when the schema is cut down, whatever the question

DIALECT = {
    "sqlite": """Dialect: SQLite.
- JSON columns are JSON text: read them with json_extract(col, '$.a.b'),
  json_extract(col, '$."key-with-dash"'), json_extract(col, '$.messages[0].content');
  json_each(col) to expand; a JSON string's text: json_extract(col, '$').
- Timestamps are text 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC: compare with datetime('now', '-7 days'),
  group by day with date(started_at), by hour with strftime('%Y-%m-%d %H:00', started_at);
  seconds between two: (julianday(b) - julianday(a)) * 86400.
- Booleans are 0/1. No percentile function: compute p95 with ORDER BY ... LIMIT 1 OFFSET (count*95/100).""",
    "postgres": """Dialect: PostgreSQL.
- JSON columns are jsonb: col->>'key' (text), col->'a'->>'b', col->'messages'->0->>'content', col ? 'key';
  cast for numbers: (col->'usage'->>'total_tokens')::bigint; text search needs col::text LIKE '%x%'.
- Timestamps are timestamp without time zone, in UTC: compare with
  now() AT TIME ZONE 'utc' - interval '7 days', group by day with date(started_at) or
  date_trunc('day', started_at); seconds between two: extract(epoch from b - a).
- Booleans are true/false. Percentiles: percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_ms).""",
}

RULES = """Answer with exactly one read-only SQL statement (SELECT or WITH ... SELECT) in a ```sql fenced block,
and nothing that writes. Use only the tables and columns listed. Name result columns plainly. If the question
cannot be answered from these tables, answer only: UNSUPPORTED: <why, in one line>."""


@dataclass(slots=True)
class Column:
    name: str
    type: str
    meaning: str | None


def dialect(db: Database) -> str:
    return "postgres" if isinstance(db, PostgresqlDatabase) else "sqlite"


def live_schema(db: Database) -> dict[str, tuple[str, list[Column]]]:
    """The tables and views people query, as they are in this database: name → (kind, columns)."""
    tables, views = set(db.get_tables()), {v.name for v in db.get_views()}
    out: dict[str, tuple[str, list[Column]]] = {}
    for name in TABLES:
        if name not in tables and name not in views:
            continue
        cols = [Column(c.name, str(c.data_type).lower(), meaning(name, c.name)) for c in db.get_columns(name)]
        out[name] = ("view" if name in views else "table", cols)
    return out


def schema_text(schema: dict[str, tuple[str, list[Column]]]) -> dict[str, str]:
    """Each table's description: ``table calls (one row per ...):`` then ``  column type -- meaning`` lines."""
    out: dict[str, str] = {}
    for name, (kind, cols) in schema.items():
        lines = [f"{kind} {name} ({TABLES[name][0]}):"]
        if name == "batch_summary" and "batches" in schema:  # batches.* and a few more: only those are told
            inherited = {c.name for c in schema["batches"][1]}
            lines.append("  (every column of batches, then:)")
            cols = [c for c in cols if c.name in TABLES[name][1] or c.name not in inherited]
        lines += [f"  {c.name} {c.type}".rstrip() + (f" -- {c.meaning}" if c.meaning else "") for c in cols]
        out[name] = "\n".join(lines)
    return out


_WORD = re.compile(r"[a-z0-9]+")


def pick_tables(texts: dict[str, str], question: str, budget: int = SCHEMA_BUDGET) -> list[str]:
    """All tables when they fit in ``budget`` characters; else those that share the most words with the
    question (plus :data:`ALWAYS`), in order, until the budget is spent."""
    if sum(len(t) for t in texts.values()) <= budget:
        return list(texts)
    words = set(_WORD.findall(question.lower()))
    words |= {w[:-1] for w in words if w.endswith("s")}
    score = {n: len(words & set(_WORD.findall(t.lower()))) + (5 if n in words or n.rstrip("s") in words else 0)
             for n, t in texts.items()}
    order = sorted(texts, key=lambda n: (n not in ALWAYS, -score[n]))
    chosen, used = [], 0
    for n in order:
        if n in ALWAYS or used + len(texts[n]) <= budget:
            chosen.append(n)
            used += len(texts[n])
    return [n for n in texts if n in chosen]


def examples(kind: str, limit: int = 8) -> list[tuple[str, str]]:
    """Worked examples: the questions of the shipped set marked ``"example": true``, with their SQL."""
    out = []
    for q in load_questions(QUESTIONS):
        if q.get("example"):
            out.append((q["question"], q[kind]))
    return out[:limit]


def load_questions(path: Path) -> list[dict[str, Any]]:
    """A question set: one JSON object a line (``question``, ``category``, ``sqlite``, ``postgres``)."""
    out = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(q, dict) or not isinstance(q.get("question"), str):
            raise ValueError(f"{path}:{n}: each line needs a \"question\"")
        out.append(q)
    return out


def system_prompt(db: Database, question: str, now: datetime | None = None, budget: int = SCHEMA_BUDGET,
                  texts: dict[str, str] | None = None) -> str:
    """The whole system message for ``question`` on ``db`` (``texts``: :func:`schema_text` already read)."""
    kind = dialect(db)
    texts = texts if texts is not None else schema_text(live_schema(db))
    names = pick_tables(texts, question, budget)
    now = now or datetime.now(UTC)
    parts = [MARK + " You turn questions about velvet's logs of OpenAI API traffic (live calls and Batch API "
             "jobs: a batch has input lines, each with a custom_id, and an answer line per custom_id) into SQL.",
             RULES, DIALECT[kind], f"Current UTC time: {now.strftime('%Y-%m-%d %H:%M:%S')}.",
             "Schema:\n" + "\n".join(texts[n] for n in names)]
    ex = examples(kind)
    if ex:
        parts.append("Worked examples:\n" + "\n".join(f"Q: {q}\n```sql\n{s}\n```" for q, s in ex))
    return "\n\n".join(parts)
