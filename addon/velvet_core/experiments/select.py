"""Which logged requests to replay or export: a batch's input lines, live calls picked by filters, the rows
of an SQL query, or a batch input file, each read as a :class:`Logged` record (the request, where it came
from, what it cost when logged and, when asked for, the answer)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from peewee import Database

from velvet_core.parsing.classify import classify
from velvet_core.query import queries
from velvet_core.storage import readonly
from velvet_core.storage.sql import iso, json_value, rows, stream_rows, to_int, ts

# The endpoints a batch can run and a replay can send, by the kind velvet stores in calls.endpoint.
ENDPOINT_URLS = {"chat.completions": "/v1/chat/completions", "responses": "/v1/responses",
                 "embeddings": "/v1/embeddings", "completions": "/v1/completions",
                 "moderations": "/v1/moderations"}
URL_ENDPOINTS = {v: k for k, v in ENDPOINT_URLS.items()}
# Tags `velvet replay` puts on its live calls (as velvet-metadata-* headers, which the proxy stores and removes)
EXPERIMENT_TAG = "velvet-experiment"
LINE_TAG = "velvet-custom-id"


class SelectionError(ValueError):
    """A selection that cannot be read (unknown batch, bad SQL, bad file): a one-line usage error."""


@dataclass(slots=True)
class Logged:
    """One selected request: what was sent, where it came from, its logged token counts and answer."""

    url: str  # /v1/chat/completions, ...
    body: dict[str, Any]
    custom_id: str | None = None  # the original custom_id (batch lines, files, SQL rows that have one)
    batch_id: str | None = None
    call_id: int | None = None
    input_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    ok: bool = False  # answered with a 200
    response: Any = None  # the parsed answer, when asked for


@dataclass
class Selection:
    """What to read. Exactly one of ``batch``, ``lines`` (every batch line), ``calls``, ``sql``, ``file``."""

    batch: str | None = None
    lines: bool = False
    calls: bool = False
    sql: str | None = None
    file: str | None = None
    model: str | None = None
    endpoint: str | None = None
    since: datetime | None = None
    status: str | None = None
    tags: list[tuple[str, str]] = field(default_factory=list)
    limit: int | None = None
    allow_powerful_role: bool = False  # sql: see storage/readonly.py

    def describe(self) -> dict[str, Any]:
        """The selection as stored in ``experiments.source``."""
        if self.sql is not None:
            return {"sql": self.sql}
        if self.file is not None:
            return {"file": str(Path(self.file).resolve())}
        filters = {k: v for k, v in (("model", self.model), ("endpoint", self.endpoint),
                                     ("since", iso(self.since)), ("status", self.status),
                                     ("tags", dict(self.tags) or None), ("limit", self.limit)) if v}
        if self.batch is not None:
            return {"batch": self.batch, **({"filters": filters} if filters else {})}
        return {"lines" if self.lines else "calls": filters}

    def check(self) -> None:
        """Filters only where they apply."""
        if self.sql is not None or self.file is not None:
            used = [n for n, v in (("--since", self.since), ("--status", self.status), ("--tag", self.tags),
                                   ("--limit", self.limit), ("the model filter", self.model),
                                   ("--endpoint", self.endpoint))
                    if v]
            if used:
                raise SelectionError(f"{', '.join(used)} filter live calls or batch lines, not --sql or --file")
        elif not self.calls and (self.tags or self.status):
            raise SelectionError("--tag and --status filter live calls (--calls), not batch lines")
        if self.endpoint is not None and self.endpoint not in ENDPOINT_URLS:
            raise SelectionError(f"--endpoint {self.endpoint!r}: use one of {', '.join(ENDPOINT_URLS)}")


def parse_tag(text: str) -> tuple[str, str]:
    """``key=value`` (keys are stored lower-case, as the proxy stores them)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--tag {text!r}: use key=value")
    return key.strip().lower(), value


def select(db: Database, sel: Selection, *, answers: bool = False, ok_only: bool = False) -> Iterator[Logged]:
    """The selected requests in their logged order (``answers``: with the parsed answer; ``ok_only``:
    only those answered with a 200)."""
    sel.check()
    if sel.file is not None:
        yield from _from_file(sel.file)
    elif sel.sql is not None:
        yield from _from_sql(db, sel.sql, sel.allow_powerful_role)
    elif sel.calls:
        yield from _from_calls(db, sel, answers, ok_only)
    else:
        yield from _from_batch_lines(db, sel, answers, ok_only)


def count(db: Database, sel: Selection, *, ok_only: bool = False) -> int:
    """How many records :func:`select` yields for calls and batch lines (for progress bars)."""
    if sel.calls and sel.tags:
        return sum(1 for _ in _from_calls(db, sel, False, ok_only))
    sql, params = _calls_sql(db, sel, False, ok_only) if sel.calls else _lines_sql(db, sel, False, ok_only)
    n = int(rows(db, f"SELECT count(*) AS n FROM ({sql}) c", params)[0]["n"])
    return min(n, sel.limit) if sel.limit else n


# -- batch lines -----------------------------------------------------------------------------------

def _lines_sql(db: Database, sel: Selection, answers: bool, ok_only: bool) -> tuple[str, tuple]:
    cond, params = ["r.problem IS NULL", "r.body IS NOT NULL"], []  # type: list[str], list[Any]
    if sel.batch is not None:
        cond.append("r.batch_id = ?")
        params.append(sel.batch)
    else:
        cond.append("r.batch_id IS NOT NULL")
    if sel.model:
        cond.append("(r.model = ? OR x.model = ?)")
        params += [sel.model, sel.model]
    if sel.endpoint:
        cond.append("r.url = ?")
        params.append(ENDPOINT_URLS[sel.endpoint])
    if sel.since:
        cond.append("r.batch_id IN (SELECT id FROM batches WHERE COALESCE(created_at, first_seen_at) >= ?)")
        params.append(ts(db, sel.since))
    if ok_only:
        cond.append("x.status_code = 200 AND NOT x.failed")
    answer = ", x.body AS response_body" if answers else ""
    sql = (f"SELECT r.batch_id, r.line_no, r.custom_id, r.url, r.body, x.status_code, x.failed, x.input_tokens, "
           f"x.cached_tokens, x.output_tokens{answer} FROM batch_requests r "
           f"LEFT JOIN batch_results x ON x.request_row_id = r.id WHERE {' AND '.join(cond)}")
    return sql, tuple(params)


def _from_batch_lines(db: Database, sel: Selection, answers: bool, ok_only: bool) -> Iterator[Logged]:
    if sel.batch is not None and not rows(
            db, "SELECT id FROM batches WHERE id = ? UNION SELECT batch_id FROM batch_requests WHERE batch_id = ?",
            (sel.batch, sel.batch)):
        raise SelectionError(f"--batch {sel.batch}: no such batch in this database")
    sql, params = _lines_sql(db, sel, answers, ok_only)
    seen: set[tuple[str, str | None]] = set()
    n = 0
    for r in stream_rows(db, sql + " ORDER BY r.batch_id, r.line_no", params):
        key = (r["batch_id"], r["custom_id"])
        body = _object(r["body"])
        if key in seen or body is None:  # an input line answered twice (output and error file) counts once
            continue
        seen.add(key)
        ok = r["status_code"] == 200 and not r["failed"]
        yield Logged(url=r["url"] or "/v1/chat/completions", body=body, custom_id=r["custom_id"],
                     batch_id=r["batch_id"], input_tokens=r["input_tokens"], cached_tokens=r["cached_tokens"],
                     output_tokens=r["output_tokens"], ok=ok,
                     response=json_value(r.get("response_body")) if answers else None)
        n += 1
        if sel.limit and n >= sel.limit:
            return
    if sel.batch is not None and not seen:
        raise SelectionError(f"--batch {sel.batch}: none of its input lines were logged (was its input file "
                             "uploaded through the proxy?)")


# -- live calls ------------------------------------------------------------------------------------

def _calls_sql(db: Database, sel: Selection, answers: bool, ok_only: bool) -> tuple[str, tuple]:
    try:
        where, params = queries.calls_where(db, model=sel.model, status=sel.status, since=sel.since,
                                            endpoint=sel.endpoint)
    except ValueError as e:
        raise SelectionError(str(e)) from None
    kinds = ", ".join(f"'{k}'" for k in ENDPOINT_URLS)
    where = ["method = 'POST'", "action = 'create'", f"endpoint IN ({kinds})", "request_body IS NOT NULL", *where]
    if ok_only:
        where.append("status_code = 200 AND complete")
    for key, _ in sel.tags:  # a cheap pre-filter; the exact test is on the parsed tags
        where.append("CAST(tags AS TEXT) LIKE ?")  # (jsonb on PostgreSQL)
        params.append(f"%{orjson.dumps(key).decode()}%")
    answer = ", response_body" if answers else ""
    sql = (f"SELECT id, started_at, endpoint, request_body, status_code, complete, input_tokens, cached_tokens, "
           f"output_tokens, tags{answer} FROM calls WHERE {' AND '.join(where)}")
    return sql, tuple(params)


def _from_calls(db: Database, sel: Selection, answers: bool, ok_only: bool) -> Iterator[Logged]:
    sql, params = _calls_sql(db, sel, answers, ok_only)
    wanted = dict(sel.tags)
    n = 0
    for r in stream_rows(db, sql + " ORDER BY started_at, id", params):
        tags = _object(r["tags"]) or {}
        if any(tags.get(k) != v for k, v in wanted.items()):
            continue
        if EXPERIMENT_TAG in tags and EXPERIMENT_TAG not in wanted:
            continue  # velvet's own replays, unless asked for by name
        body = _object(r["request_body"])
        if body is None:
            continue
        yield Logged(url=ENDPOINT_URLS[r["endpoint"]], body=body, call_id=int(r["id"]),
                     input_tokens=r["input_tokens"], cached_tokens=r["cached_tokens"],
                     output_tokens=r["output_tokens"], ok=r["status_code"] == 200 and bool(r["complete"]),
                     response=json_value(r.get("response_body")) if answers else None)
        n += 1
        if sel.limit and n >= sel.limit:
            return


# -- SQL and files ---------------------------------------------------------------------------------

def _from_sql(db: Database, query: str, allow_powerful_role: bool = False) -> Iterator[Logged]:
    with contextlib.ExitStack() as stack:
        try:  # the one door for SQL velvet did not write: read-only by the engine's rules
            cur = stack.enter_context(readonly.statement(db, query, allow_powerful_role=allow_powerful_role))
            cols = [d[0].lower() for d in cur.description or ()]
        except Exception as e:
            raise SelectionError(f"--sql: {_first_line(e)}") from None
        yield from _logged_rows(cur, cols)


def _logged_rows(cur: Any, cols: list[str]) -> Iterator[Logged]:
    body_col = next((c for c in ("request_body", "body") if c in cols), None)
    if body_col is None:
        raise SelectionError("--sql: the query must return the request body as a request_body (or body) column"
                             f" (it returned {', '.join(cols) or 'nothing'})")
    call_col = "call_id" if "call_id" in cols else "id" if body_col == "request_body" and "id" in cols else None
    n = 0
    while rows := cur.fetchmany(500):
        for values in rows:
            n += 1
            r = dict(zip(cols, values, strict=True))
            body = _object(r[body_col])
            if body is None:
                raise SelectionError(f"--sql: row {n}: {body_col} is not a JSON object")
            url = _url(r, body)
            if url is None:
                raise SelectionError(f"--sql: row {n}: cannot tell the endpoint: also return a url, endpoint or "
                                     "path column")
            batch_id = r.get("batch_id")
            yield Logged(url=url, body=body, custom_id=_str(r.get("custom_id")),
                         batch_id=_str(batch_id) if r.get("custom_id") is not None else None,
                         call_id=to_int(r.get(call_col)) if call_col else None,
                         input_tokens=to_int(r.get("input_tokens")), cached_tokens=to_int(r.get("cached_tokens")),
                         output_tokens=to_int(r.get("output_tokens")))


def _url(r: dict[str, Any], body: dict[str, Any]) -> str | None:
    if isinstance(r.get("url"), str):
        return _known_url(r["url"])
    if isinstance(r.get("endpoint"), str):
        return ENDPOINT_URLS.get(r["endpoint"]) or _known_url(r["endpoint"])
    if isinstance(r.get("path"), str):
        return _known_url(r["path"])
    return "/v1/chat/completions" if "messages" in body else None


def _known_url(path: str) -> str | None:
    return ENDPOINT_URLS.get(classify("POST", path).kind)


def _from_file(path: str) -> Iterator[Logged]:
    p = Path(path).expanduser()
    try:
        f = p.open("rb")
    except OSError as e:
        raise SelectionError(f"--file {path}: {e.strerror or e}") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise SelectionError(f"--file {path}: line {n} is not JSON") from None
            if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
                raise SelectionError(f"--file {path}: line {n} is not a batch input line "
                                     '({"custom_id", "method", "url", "body"})')
            url = _known_url(line["url"]) if isinstance(line.get("url"), str) else None
            if url is None:
                raise SelectionError(f"--file {path}: line {n}: url {line.get('url')!r} is not an endpoint a "
                                     f"batch can run ({', '.join(ENDPOINT_URLS.values())})")
            yield Logged(url=url, body=line["body"], custom_id=_str(line.get("custom_id")))


# -- values ----------------------------------------------------------------------------------------



def _object(v: Any) -> dict[str, Any] | None:
    out = json_value(v)
    return out if isinstance(out, dict) else None




def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _first_line(e: BaseException) -> str:
    return re.sub(r"\s+", " ", str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
