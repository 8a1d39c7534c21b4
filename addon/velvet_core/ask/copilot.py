"""A question → read-only SQL → its result: the model's reply read for SQL, checked with ``EXPLAIN``, errors sent
back (at most :data:`MAX_ATTEMPTS`), run through :func:`velvet_core.storage.readonly.statement` (the engine's own
read-only mode, with a time limit) with a row cap."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from peewee import Database, PostgresqlDatabase

from velvet_core.api.client import APIError, Client, MissingKey
from velvet_core.ask import context
from velvet_core.redact import redact
from velvet_core.storage import readonly

MAX_ATTEMPTS = 3
DEFAULT_MODEL = "gpt-4.1-mini"
MAX_ROWS = 1000
TAG = "velvet-copilot"
"""The tag of the copilot's calls: header ``velvet-metadata-velvet-copilot: ask``, so
``calls.tags->>'velvet-copilot' = 'ask'``."""
ERROR_CHARS = 1000  # of a database error sent back to the model

_FENCE = re.compile(r"```[ \t]*sql[^\n]*\n(.*?)(?:```|\Z)", re.S | re.I)
_TAIL_LIMIT = re.compile(r"\blimit\s+(\d+|all)(\s+offset\s+\d+)?\s*$", re.I)


class ModelDown(Exception):
    """The model could not be reached or refused the request (one line saying which)."""


@dataclass(slots=True)
class Result:
    sql: str
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool


@dataclass(slots=True)
class Answer:
    question: str
    sql: str | None = None
    attempts: int = 0
    result: Result | None = None
    error: str | None = None
    unsupported: str | None = None

    def as_json(self) -> dict[str, Any]:
        r = self.result
        return {"question": self.question, "sql": r.sql if r else self.sql, "attempts": self.attempts,
                "columns": r.columns if r else [], "rows": r.rows if r else [],
                "truncated": r.truncated if r else False, "error": self.error}


def extract_sql(reply: str) -> str:
    """The first ```sql fenced block of the reply, else the whole reply; without a trailing ``;``."""
    m = _FENCE.search(reply)
    sql = m.group(1) if m else reply
    sql = sql.strip()
    if not m and sql.startswith("```"):  # a fence without "sql"
        sql = sql.strip("`").strip()
    while sql.endswith(";"):
        sql = sql[:-1].rstrip()
    return sql


def unsupported(reply: str) -> str | None:
    """The model's reason when it answered ``UNSUPPORTED: <why>``."""
    text = reply.strip().strip("`").strip()
    if text.upper().startswith("UNSUPPORTED"):
        return text[len("UNSUPPORTED"):].lstrip(" :").strip() or "no reason given"
    return None


def with_limit(sql: str, max_rows: int) -> str:
    """``sql`` with ``LIMIT max_rows`` when it ends with no LIMIT of its own."""
    return sql if _TAIL_LIMIT.search(sql) else f"{sql}\nLIMIT {max_rows}"


class DBError(Exception):
    """What the database said about a statement (sent back to the model)."""


def _error(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return redact(text[:ERROR_CHARS])  # (cut first: redact takes minutes over a 200 kB message)


def _writes(db: Database, sql: str, timeout: float, allow: bool) -> bool:
    """PostgreSQL: whether the statement's plan modifies a table (the engine's word: EXPLAIN's plan)."""
    with readonly.statement(db, "EXPLAIN (FORMAT JSON) " + sql, timeout=timeout, allow_powerful_role=allow) as cur:
        plan = cur.fetchall()
    return '"ModifyTable"' in str(plan).replace("'", '"')


def run_sql(db: Database, sql: str, *, max_rows: int = MAX_ROWS, timeout: float = readonly.DEFAULT_TIMEOUT,
            allow_powerful_role: bool = False, execute: bool = True) -> Result:
    """``EXPLAIN`` the statement, add the LIMIT where it takes one, run it read-only; :class:`DBError` with the
    database's message on any error (a write refused, a syntax error, an unknown column, the time limit)."""
    if not sql:
        raise DBError("the reply held no SQL")
    try:
        pg = isinstance(db, PostgresqlDatabase)
        if pg:  # EXPLAIN does not refuse a write on PostgreSQL: the plan says whether it is one
            reads = not _writes(db, sql, timeout, allow_powerful_role)
        else:  # SQLite refuses a write while preparing it (the authorizer), EXPLAIN included
            with readonly.statement(db, "EXPLAIN " + sql, timeout=timeout,
                                    allow_powerful_role=allow_powerful_role) as cur:
                cur.fetchall()
            reads = True
        final = sql
        if reads and (limited := with_limit(sql, max_rows)) != sql:
            try:
                with readonly.statement(db, "EXPLAIN " + limited, timeout=timeout,
                                        allow_powerful_role=allow_powerful_role) as cur:
                    cur.fetchall()
                final = limited
            except readonly.ReadOnlyError:
                raise
            except Exception:
                final = sql
        if not execute:
            return Result(final, [], [], False)
        with readonly.statement(db, final, timeout=timeout, allow_powerful_role=allow_powerful_role) as cur:
            columns = [d[0] for d in cur.description or ()]
            rows = [list(r) for r in cur.fetchmany(max_rows + 1)] if columns else []
    except readonly.ReadOnlyError as e:
        if str(e).startswith("role "):  # the connection's role, not the SQL: no use asking the model again
            raise
        raise DBError(_error(e)) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        raise DBError(_error(e)) from None
    truncated = len(rows) > max_rows or (final != sql and len(rows) >= max_rows)
    return Result(final, columns, rows[:max_rows], truncated)


@dataclass
class Copilot:
    """A conversation with the model over one database: :meth:`ask` keeps earlier questions and their SQL so
    that a follow-up refines the previous query."""

    db: Database
    client: Client
    model: str
    max_rows: int = MAX_ROWS
    timeout: float = readonly.DEFAULT_TIMEOUT
    allow_powerful_role: bool = False
    history: list[dict[str, str]] = field(default_factory=list)
    last_sql: str | None = None
    schema: dict[str, str] | None = None  # the tables' descriptions, read from the database once

    def prompt(self, question: str) -> str:
        if self.schema is None:
            self.schema = context.schema_text(context.live_schema(self.db))
        return context.system_prompt(self.db, question, texts=self.schema)

    def chat(self, messages: list[dict[str, str]]) -> str:
        try:
            reply = self.client.request("POST", "/chat/completions",
                                        json={"model": self.model, "messages": messages, "temperature": 0},
                                        headers={f"velvet-metadata-{TAG}": "ask"})
        except APIError as e:
            raise ModelDown(f"the model at {self.client.base_url} is unreachable: {_error(e)}") from None
        body = reply.body if isinstance(reply.body, dict) else {}
        if reply.status >= 300:
            err = body.get("error")
            err = err if isinstance(err, dict) else {}
            raise ModelDown(f"the model at {self.client.base_url} answered {reply.status}: "
                            f"{redact(str(err.get('message') or reply.body)[:300])}")
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ModelDown(f"the model at {self.client.base_url} sent no chat completion") from None
        return content if isinstance(content, str) else ""

    def ask(self, question: str, *, execute: bool = True, fresh: bool = False) -> Answer:
        """Ask; at most :data:`MAX_ATTEMPTS` replies, each database error sent back. :class:`ModelDown` when the
        model cannot be reached. ``fresh``: without the earlier questions."""
        history = [] if fresh else self.history
        system = {"role": "system", "content": self.prompt(question)}
        turn: list[dict[str, str]] = [{"role": "user", "content": question}]
        answer = Answer(question)
        while answer.attempts < MAX_ATTEMPTS:
            answer.attempts += 1
            reply = self.chat([system, *history, *turn])
            if (why := unsupported(reply)) is not None:
                answer.unsupported = why
                answer.error = f"UNSUPPORTED: {why}"
                return answer
            answer.sql = extract_sql(reply)
            turn.append({"role": "assistant", "content": reply})
            try:
                answer.result = run_sql(self.db, answer.sql, max_rows=self.max_rows, timeout=self.timeout,
                                        allow_powerful_role=self.allow_powerful_role, execute=execute)
            except DBError as e:
                answer.error = str(e)
                turn.append({"role": "user", "content": f"The database refused that SQL:\n{e}\n"
                                                        "Answer again with corrected SQL."})
                continue
            answer.error = None
            answer.sql = answer.result.sql
            if not fresh:
                self.history += [turn[0], {"role": "assistant", "content": f"```sql\n{answer.sql}\n```"}]
                self.last_sql = answer.sql
            return answer
        return answer


def make_client(base_url: str | None) -> Client:
    """The model's client: ``--base-url`` / ``$VELVET_ASK_BASE_URL`` (a local server: no key needed), else the
    SDK's environment (``OPENAI_API_KEY`` required, ``OPENAI_BASE_URL``, ``HTTPS_PROXY``)."""
    base = base_url or os.environ.get("VELVET_ASK_BASE_URL")
    key = os.environ.get("OPENAI_API_KEY") or None
    if not base and not key:
        raise MissingKey("OPENAI_API_KEY is not set: velvet ask needs an API key, or a local model's "
                         "--base-url (VELVET_ASK_BASE_URL)")
    return Client(key, base_url=base, max_retries=2, timeout=120.0)


def model_name(model: str | None) -> str:
    return model or os.environ.get("VELVET_ASK_MODEL") or DEFAULT_MODEL
