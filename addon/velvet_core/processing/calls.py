"""Turn a :class:`CallSnapshot` into a ``calls`` row: decode, parse, extract, price (writer thread)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson

from velvet_core.cost.prices import Pricer
from velvet_core.cost.tokens import estimate
from velvet_core.parsing.decode import DecodeError, Decoder, decode_body
from velvet_core.parsing.extract import (
    ApiError,
    Tokens,
    api_error,
    bad_counts,
    find_usage,
    images_of,
    json_text,
    ratelimits,
    safe_headers,
    to_int,
    tokens_from_usage,
    utc,
    video_of,
)
from velvet_core.parsing.multipart import form_field
from velvet_core.parsing.sse import reassemble
from velvet_core.parsing.utf8 import loads_replaced, replaced_note
from velvet_core.storage.snapshot import CallSnapshot

log = logging.getLogger("velvet")

ESTIMATED = ("chat.completions", "completions", "responses")  # streams whose tokens velvet counts without usage


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 3)


class Body:
    """A decoded body: the bytes, its JSON value (if any) and its text.

    Decoded once here; the batch module reads ``data`` and ``json`` instead of decoding again.
    ``stored`` is what the JSON column gets: the text, or a body that is not JSON as a JSON string.
    """

    def __init__(self, raw: bytes | None, encoding: str | None, content_type: str, limit: int,
                 side: str, problems: list[str], opaque: bool = False) -> None:
        self.data: bytes | None = None
        self.json: Any = None
        self.text: str | None = None
        self.is_json = False
        self.size: int | None = None
        if raw is None:
            return
        try:
            data = decode_body(raw, encoding)
        except DecodeError as e:
            problems.append(f"{side} body: {e}")
            return
        self.data = data
        self.size = len(data)
        ct = content_type.split(";", 1)[0].strip().lower()
        if opaque or not data or ct.startswith(("multipart/", "audio/", "image/", "video/")) or ct in (
                "application/octet-stream", "application/jsonl", "application/x-ndjson"):
            return
        text: str | None = None
        try:
            self.json = orjson.loads(data)
        except orjson.JSONDecodeError:
            # bad bytes: kept replaced by U+FFFD (the answer is what a user wants to see), and parsed
            self.json, text, bad = loads_replaced(data)
            if bad:
                problems.append(f"{side} body is {replaced_note(bad)}")
            if self.json is None:
                if ct in ("application/json", "") or ct.endswith("+json"):
                    problems.append(f"{side} body is not JSON")
                if len(data) <= limit:
                    self.text = text
                return
        self.is_json = True
        if len(data) <= limit:
            self.text = data.decode("utf-8") if text is None else text  # orjson accepted it: UTF-8
        else:
            problems.append(f"{side} body of {len(data)} bytes not stored (over velvet_body_limit)")

    @property
    def stored(self) -> str | None:
        """The column's JSON text: the body, or a body that is not JSON kept whole as a JSON string (so
        that every stored value is JSON, for ``jsonb`` and ``json_extract``)."""
        if self.text is None or self.is_json:
            return self.text
        return orjson.dumps(self.text).decode()


def parse_call(s: CallSnapshot, pricer: Pricer, body_limit: int) -> tuple[dict[str, Any], Body, Body | None]:
    """The ``calls`` row, and the decoded request and response bodies (for the batch module)."""
    problems = list(s.notes)
    route = s.route
    if route.kind == "other":
        problems.append(f"unknown endpoint {s.method} {route.path}")
    req = Body(s.request_body, s.request_encoding, s.request_headers.get("content-type", ""),
               body_limit, "request", problems)
    rq = req.json if isinstance(req.json, dict) else {}
    rh = s.response_headers
    row: dict[str, Any] = {
        "flow_id": s.flow_id, "method": s.method, "scheme": s.scheme, "host": s.host, "port": s.port,
        "path": s.path, "endpoint": route.kind, "action": route.action, "object_id": route.object_id,
        "deployment": route.deployment, "key_fingerprint": s.key_fingerprint,
        "tags": json_text(s.tags) if s.tags else None,
        "request_headers": json_text(s.request_headers),
        "response_headers": json_text(safe_headers(rh)) if rh else None,
        "started_at": utc(s.started_at), "request_end_at": utc(s.request_end_at),
        "first_byte_at": utc(s.first_byte_at), "ended_at": utc(s.ended_at),
        "latency_ms": _ms(s.started_at, s.ended_at), "status_code": s.status_code,
        "request_id": rh.get("x-request-id"), "processing_ms": to_int(rh.get("openai-processing-ms")),
        "organization": rh.get("openai-organization") or s.request_headers.get("openai-organization"),
        "project": rh.get("openai-project") or s.request_headers.get("openai-project"),
        "model_requested": rq.get("model") if isinstance(rq.get("model"), str) else
        _form_model(route.kind, req, s.request_headers.get("content-type", "")) or route.deployment,
        "stream": bool(rq.get("stream")) or s.stream_chunks is not None,
        "request_bytes": req.size, "request_body": req.stored,
        **ratelimits(rh),
    }
    if rq.get("service_tier"):
        row["service_tier"] = str(rq["service_tier"])

    resp_json: Any = None
    resp: Body | None = None
    if s.stream_chunks is not None:
        resp_json = _stream(s, row, problems)
    elif s.status_code is not None:
        # file contents (JSONL, up to hundreds of MB) belong to the batch tables, not here
        resp = Body(s.response_body, s.response_encoding, rh.get("content-type", ""), body_limit,
                    "response", problems, opaque=route.action == "content" and s.status_code < 400)
        resp_json = resp.json
        row["response_bytes"] = resp.size
        row["response_body"] = resp.stored
        if isinstance(resp_json, dict):
            _fill_from_response(row, resp_json)
    if s.error and not (s.stream_chunks is not None and row.get("complete")):
        # (a client may hang up right after a stream's end event: the answer is still whole)
        row["complete"] = False
        problems.append(f"connection error: {s.error}")
    if s.status_code is not None and s.status_code >= 400 and s.stream_chunks is None:
        err = api_error(resp_json) if resp_json is not None else ApiError(message=resp.text if resp else None)
        row.update(error_type=err.type, error_code=err.code, error_message=err.message)
    elif s.status_code is None:
        row.update(error_type="connection_error", error_message=s.error)

    usage = row.pop("_usage", None) if s.stream_chunks is not None else find_usage(resp_json)
    if route.kind in ("batches", "files", "uploads"):
        usage = None  # a batch's usage belongs to the batch (priced there at batch rates), not to this poll
    tokens = tokens_from_usage(usage)
    if bad := bad_counts(usage):
        problems.append(f"not token counts, left out: {', '.join(bad)}")
    model = row.get("model") or row.get("model_requested")
    if usage is None and s.stream_chunks is not None and route.kind in ESTIMATED and s.status_code is not None \
            and s.status_code < 400:
        try:  # a stream without usage (no stream_options.include_usage): count the tokens ourselves
            inp, out = estimate(route.kind, model, rq, resp_json, row.get("response_text") or "")
            tokens = Tokens(input=inp, output=out, total=inp + out)
            row["usage_estimated"] = True
        except Exception as e:  # (a missing encoding file, say): the row without tokens, and why
            log.exception("velvet: could not count the tokens of flow %s", s.flow_id)
            problems.append(f"tokens not estimated: {type(e).__name__}: {e}")
    row.update(tokens.as_dict())
    if route.kind == "videos":  # a job is billed once, by its seconds: its creation carries the cost
        ok = route.action == "create" and s.status_code is not None and s.status_code < 400
        row["cost_usd"] = pricer.video_cost(model, video_of(resp_json)) if ok else None
    elif route.kind == "images" and pricer.is_per_image(model):  # a model billed per image (a price file's)
        ok = s.status_code is not None and s.status_code < 400
        row["cost_usd"] = pricer.image_cost(model, images_of(resp_json, rq)) if ok else None
    else:
        row["cost_usd"] = pricer.cost(model, tokens, service_tier=row.get("service_tier"))
    row["problem"] = "; ".join(problems) or None
    return row, req, resp


def _form_model(kind: str, req: Body, content_type: str) -> str | None:
    """The ``model`` field of a model call sent as a form (an image edit, a video with a reference, audio);
    never a file upload's (a batch file of hundreds of MB is not scanned for it)."""
    if kind not in ("images", "videos", "audio") or req.data is None \
            or not content_type.lower().startswith("multipart/"):
        return None
    data = req.data

    def read(size: int) -> Iterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i:i + size]

    return form_field(content_type, None, read, "model")


def _fill_from_response(row: dict[str, Any], body: dict[str, Any]) -> None:
    if isinstance(body.get("model"), str):
        row["model"] = body["model"]
    if body.get("service_tier"):
        row["service_tier"] = str(body["service_tier"])
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        reason = choices[0].get("finish_reason")
        row["finish_reason"] = reason if isinstance(reason, str) else None
    elif body.get("object") == "response":
        row["finish_reason"] = body.get("status")


def _stream(s: CallSnapshot, row: dict[str, Any], problems: list[str]) -> Any:
    """Decode the recorded chunks, reassemble the answer, find the time to first token."""
    decoder = Decoder(s.response_encoding) if _known(s.response_encoding) else None
    if decoder is None:
        problems.append(f"response body: unsupported content-encoding {s.response_encoding!r}")
        row["complete"] = False
        return None
    pieces: list[bytes] = []
    ends: list[tuple[int, float]] = []  # (decoded length so far, arrival time)
    size = 0
    try:
        for t, chunk in s.stream_chunks or ():
            out = decoder.feed(chunk)
            pieces.append(out)
            size += len(out)
            ends.append((size, t))
        if s.stream_finished:
            pieces.append(decoder.finish())
    except DecodeError as e:
        problems.append(f"response stream: {e}")
    data = b"".join(pieces)
    row["response_bytes"] = len(data)
    ct = s.response_headers.get("content-type", "")
    if "event-stream" not in ct:
        problems.append(f"streamed response is {ct or 'untyped'}, not text/event-stream")
    res = reassemble(data, s.route.kind)
    problems.extend(res.problems)
    row["complete"] = res.complete
    row["response_text"] = res.text or None
    row["finish_reason"] = res.finish_reason
    if res.model:
        row["model"] = res.model
    if res.service_tier:
        row["service_tier"] = res.service_tier
    if res.body is not None:
        row["response_body"] = orjson.dumps(res.body).decode()
    if res.error:
        err = api_error({"error": res.error})
        row.update(error_type=err.type, error_code=err.code, error_message=err.message)
    if res.first_token_offset is not None:
        for end, t in ends:
            if end >= res.first_token_offset:
                row["ttft_ms"] = _ms(s.started_at, t)
                break
    row["_usage"] = res.usage
    return res.body


def _known(enc: str | None) -> bool:
    try:
        Decoder(enc)
        return True
    except DecodeError:
        return False
