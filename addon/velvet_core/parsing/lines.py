"""Batch JSONL lines -> rows: input lines (requests) and output/error lines (results)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from velvet_core.parsing.classify import BATCH_ENDPOINTS, normalise
from velvet_core.parsing.extract import api_error, tokens_from_usage
from velvet_core.parsing.jsonl import Line
from velvet_core.parsing.utf8 import loads_replaced, replaced_note
from velvet_core.secret_names import redact_path


def _notes(line: Line) -> list[str]:
    notes = []
    if line.crlf:
        notes.append("CRLF line ending")
    if not line.final_newline:
        notes.append("no final newline")
    return notes


def _load(line: Line, problems: list[str]) -> Any:
    if not line.data.strip():
        problems.append("blank line")
        return None
    try:
        return orjson.loads(line.data)  # (it checks the UTF-8 too: decoding first cost every good line a copy)
    except orjson.JSONDecodeError as e:
        obj, _, bad = loads_replaced(line.data)  # a few bad bytes must not cost the line its custom_id
        if bad:
            problems.append(replaced_note(bad))
        if obj is None:
            problems.append(f"bad JSON: {e}")
        return obj


def raw_json(line: Line, obj: Any) -> str:
    """A line kept as it was sent, as JSON text for the ``body`` column: the line itself when it is JSON,
    else its text as a JSON string (every stored body is JSON: ``jsonb`` and ``json_extract`` read them all)."""
    text = line.data.decode("utf-8", "replace")
    return text if obj is not None else orjson.dumps(text).decode()


def request_row(line: Line) -> dict[str, Any]:
    """A ``batch_requests`` row (without file/part keys) for one input line."""
    problems = _notes(line)
    obj = _load(line, problems)
    row: dict[str, Any] = {"custom_id": None, "method": None, "url": None, "model": None, "body": None}
    if obj is not None and not isinstance(obj, dict):
        problems.append("line is not a JSON object")
    elif isinstance(obj, dict):
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            problems.append("missing custom_id")
        else:
            row["custom_id"] = cid
        row["method"] = obj.get("method") if isinstance(obj.get("method"), str) else None
        row["url"] = redact_path(obj["url"])[0] if isinstance(obj.get("url"), str) else None
        if row["url"] is None:
            problems.append("missing url")
        elif normalise(row["url"])[0] not in BATCH_ENDPOINTS:
            problems.append(f"endpoint {row['url']} is not one velvet knows")
        body = obj.get("body")
        if isinstance(body, dict):
            row["body"] = orjson.dumps(body).decode()
            if isinstance(body.get("model"), str):
                row["model"] = body["model"]
        else:
            problems.append("missing body")
    if row["body"] is None and line.data.strip():
        row["body"] = raw_json(line, obj)  # keep what was sent, for inspection
    row["problem"] = "; ".join(problems) or None
    return row


def looks_like_input(obj: Any) -> bool:
    return isinstance(obj, dict) and "url" in obj and "body" in obj and "response" not in obj


def result_row(line: Line, seen_at: datetime) -> dict[str, Any]:
    """A ``batch_results`` row (without file keys, not priced: see :mod:`velvet_core.cost`) for one output or
    error line."""
    problems = _notes(line)
    obj = _load(line, problems)
    row: dict[str, Any] = {"line_no": line.no, "seen_at": seen_at, "failed": False, "custom_id": None}
    if isinstance(obj, dict):
        cid = obj.get("custom_id")
        row["custom_id"] = cid if isinstance(cid, str) and cid else None
        if row["custom_id"] is None:
            problems.append("missing custom_id")
        row["result_id"] = obj.get("id") if isinstance(obj.get("id"), str) else None
        resp = obj.get("response") if isinstance(obj.get("response"), dict) else None
        err = obj.get("error") if isinstance(obj.get("error"), dict) else None
        if resp is not None:
            status = resp.get("status_code")
            row["status_code"] = status if isinstance(status, int) else None
            row["request_id"] = resp.get("request_id") if isinstance(resp.get("request_id"), str) else None
            body = resp.get("body")
            if body is not None:
                row["body"] = orjson.dumps(body).decode()
            if isinstance(body, dict):
                if isinstance(body.get("model"), str):
                    row["model"] = body["model"]
                tokens = tokens_from_usage(body.get("usage"))
                row.update(tokens.as_dict())
            if row.get("status_code") is not None and row["status_code"] >= 400:
                row["failed"] = True
                e = api_error(body)
                row["error_code"] = e.code or e.type
                row["error_message"] = e.message
        if err is not None:
            row["failed"] = True
            e = api_error(err)
            row["error_code"] = e.code or row.get("error_code")
            row["error_message"] = e.message or row.get("error_message")
        if resp is None and err is None:
            problems.append("neither response nor error")
    elif obj is not None:
        problems.append("line is not a JSON object")
    if problems and row.get("body") is None and line.data.strip():
        row["body"] = raw_json(line, obj)
    row["problem"] = "; ".join(problems) or None
    return row
