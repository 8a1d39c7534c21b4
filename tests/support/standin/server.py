"""A local stand-in for the OpenAI API, for tests and the offline demo.

Object shapes follow OpenAI's published OpenAPI spec. Behaviour is steered per request with headers
(sent by the SDK as ``extra_headers``):

- ``x-standin-scenario``: ``429``, ``500``, ``drop`` (a stream cut mid-way), ``slow`` (wait
  ``x-standin-delay`` seconds, default 1, before answering);
- ``x-standin-delay``: seconds between stream events (default 0.02);
- ``x-standin-gzip``: ``1`` to gzip the response (streams use ``Z_SYNC_FLUSH``);
- ``x-standin-canned``: the key of a reply registered with ``StandIn.can`` (fault tests: exact bytes,
  however malformed, in the status line, headers and body).

Answers are deterministic: ``ANSWER``, cut to ``max_tokens`` / ``max_completion_tokens`` /
``max_output_tokens`` words (finish reason ``length``, or an ``incomplete`` response); with
``response_format`` ``json_object`` the JSON ``{"answer": ANSWER}``, with a ``json_schema`` an instance
of the schema in which every integer is the number of words between ``<answer>`` and ``</answer>`` in
the last user message, clamped to the schema's ``minimum``/``maximum`` (how it "grades" an answer), and
every number a tenth of it, at most 1 (how it "judges" one).
``StandIn.rate_limit(n)`` makes the next ``n`` model calls get a 429 with a short ``retry-after-ms``.

An API key ``sk-bad…`` gets a 401. Azure OpenAI paths are served too: ``/openai/deployments/{name}/…``
(deployments in ``AZURE_DEPLOYMENTS``) and ``/openai/files``, ``/openai/batches`` with ``?api-version=``,
or ``/openai/v1/…``, authenticated by the ``api-key`` header (a key ``bad…`` gets Azure's 401).
Run standalone: ``PYTHONPATH=tests python -m support.standin.server --port 8600``.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import itertools
import secrets
import socket
import threading
import time
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

ANSWER = "Hello from the stand-in API."
AZURE_DEPLOYMENTS = {"chat-prod": "gpt-4o-mini", "embed-prod": "text-embedding-3-small"}  # name -> model
AZURE_401 = ("Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
             "valid key for an active subscription and use a correct regional API endpoint for your resource.")
_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(6)}{next(_ids)}"


def count_tokens(value: Any) -> int:
    """A rough, deterministic token count: words in all strings."""
    if isinstance(value, str):
        return max(1, len(value.split()))
    if isinstance(value, dict):
        return sum(count_tokens(v) for v in value.values())
    if isinstance(value, list):
        return sum(count_tokens(v) for v in value)
    return 0


def _last_user_text(messages: Any) -> str:
    for m in reversed(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return " ".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
            return str(c or "")
    return ""


def _instance(schema: Any, prompt: str) -> Any:
    """A deterministic instance of a JSON schema (see the module docstring for integers)."""
    if not isinstance(schema, dict):
        return None
    t = schema.get("type")
    if t == "object":
        return {k: _instance(v, prompt) for k, v in (schema.get("properties") or {}).items()}
    if t in ("integer", "number"):
        start, end = prompt.find("<answer>"), prompt.find("</answer>")
        words = len(prompt[start + 8:end].split()) if 0 <= start < end else 0
        if t == "number":  # a score from 0 to 1: a tenth of the words, at most 1
            return max(schema.get("minimum", 0), min(schema.get("maximum", 1), words / 10))
        return max(schema.get("minimum", 0), min(schema.get("maximum", words), words))
    if t == "boolean":
        return True
    if t == "array":
        return []
    return ANSWER


def answer(body: dict[str, Any], prompt: str) -> tuple[str, bool]:
    """The answer text for a request, and whether it was cut by a token limit."""
    fmt = body.get("response_format") or (body.get("text") or {}).get("format") or {}
    if fmt.get("type") == "json_object":
        return orjson.dumps({"answer": ANSWER}).decode(), False
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or fmt.get("schema")
        return orjson.dumps(_instance(schema, prompt)).decode(), False
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    words = ANSWER.split()
    if isinstance(limit, int) and 0 < limit < len(words):
        return " ".join(words[:limit]), True
    return ANSWER, False


def chat_completion(body: dict[str, Any]) -> dict[str, Any]:
    prompt = count_tokens(body.get("messages"))
    text, cut = answer(body, _last_user_text(body.get("messages")))
    out = len(text.split())
    return {
        "id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
        "model": _snapshot(body.get("model")), "system_fingerprint": "fp_standin",
        "service_tier": body.get("service_tier") or "default",
        "choices": [{"index": 0, "finish_reason": "length" if cut else "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": text, "refusal": None,
                                 "annotations": []}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                "accepted_prediction_tokens": 0,
                                                "rejected_prediction_tokens": 0}},
    }


def response_object(body: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    inp = count_tokens(body.get("input")) + count_tokens(body.get("instructions"))
    given = body.get("input")
    text, cut = answer(body, given if isinstance(given, str) else _last_user_text(given))
    out = len(text.split())
    return {
        "id": new_id("resp_"), "object": "response", "created_at": int(time.time()),
        "status": "incomplete" if cut and status == "completed" else status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": body.get("instructions"),
        "model": _snapshot(body.get("model")), "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": [], "temperature": 1.0, "top_p": 1.0, "metadata": {}, "service_tier": "default",
        "output": [{"type": "message", "id": new_id("msg_"), "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": inp + out},
    }


def text_completion(body: dict[str, Any]) -> dict[str, Any]:
    """The legacy ``/v1/completions`` answer (``choices[].text``)."""
    prompt = count_tokens(body.get("prompt"))
    out = len(ANSWER.split())
    return {
        "id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()),
        "model": _snapshot(body.get("model")), "system_fingerprint": "fp_standin",
        "choices": [{"index": 0, "text": ANSWER, "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out},
    }


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    data = [{"object": "embedding", "index": i, "embedding": [0.01 * (i + 1), -0.02, 0.03]}
            for i in range(len(inputs))]
    n = count_tokens(inputs)
    return {"object": "list", "data": data, "model": body.get("model") or "text-embedding-3-small",
            "usage": {"prompt_tokens": n, "total_tokens": n}}


def images(body: dict[str, Any], edit: bool = False) -> dict[str, Any]:
    """An ImagesResponse (no ``model``, as the API answers): one small base64 image per ``n``, and the usage of
    gpt-image-1 (an edit's input counts image tokens too)."""
    n = body.get("n") if isinstance(body.get("n"), int) else 1
    text, image = count_tokens(body.get("prompt")) + 15, 10 if edit else 0
    data = [{"b64_json": base64.b64encode(b"\x89PNG standin %d" % i + bytes(3000)).decode()} for i in range(n)]
    return {"created": int(time.time()), "data": data,
            "size": body.get("size") or "1024x1024", "quality": body.get("quality") or "low",
            "output_format": "png",
            "usage": {"input_tokens": text + image, "output_tokens": 272 * n,
                      "total_tokens": text + image + 272 * n,
                      "input_tokens_details": {"text_tokens": text, "image_tokens": image}}}


def moderation(body: dict[str, Any]) -> dict[str, Any]:
    """A CreateModerationResponse: no usage (the moderation models are free)."""
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return {"id": new_id("modr-"), "model": body.get("model") or "omni-moderation-latest",
            "results": [{"flagged": False, "categories": {"violence": False},
                         "category_scores": {"violence": 0.001}} for _ in inputs]}


def video(body: dict[str, Any]) -> dict[str, Any]:
    """A VideoResource job object, as ``POST /v1/videos`` answers it."""
    return {"id": new_id("video_"), "object": "video", "model": body.get("model") or "sora-2", "status": "queued",
            "progress": 0, "created_at": int(time.time()), "completed_at": None, "expires_at": None,
            "prompt": body.get("prompt"), "seconds": str(body.get("seconds") or "4"),
            "size": body.get("size") or "720x1280", "remixed_from_video_id": None, "error": None}


def video_bytes(job: dict[str, Any]) -> bytes:
    """The content of a video job: an MP4 header, then 40,000 bytes per second of video."""
    seconds = int(float(job.get("seconds") or 4))
    return b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * (seconds * 40_000 // 256)


def _snapshot(model: Any) -> str:
    """Answer with a dated snapshot name, as the API does."""
    m = str(model or "gpt-4o-mini")
    m = AZURE_DEPLOYMENTS.get(m, m)  # an Azure batch line names its deployment
    return {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4o": "gpt-4o-2024-08-06"}.get(m, m)


_MODEL_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StandIn

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _common_headers(self) -> dict[str, str]:
        return {
            "x-request-id": new_id("req_"), "openai-processing-ms": "12", "openai-version": "2020-10-01",
            "openai-organization": "org-standin", "openai-project": "proj_standin",
            "x-ratelimit-limit-requests": "10000", "x-ratelimit-limit-tokens": "30000000",
            "x-ratelimit-remaining-requests": "9999", "x-ratelimit-remaining-tokens": "29999000",
            "x-ratelimit-reset-requests": "6ms", "x-ratelimit-reset-tokens": "2ms",
        }

    def send(self, status: int, body: Any, *, content_type: str = "application/json",
             headers: dict[str, str] | None = None, cut: bool = False) -> None:
        if status == 200 and isinstance(body, dict) and self.command == "POST" and \
                urlsplit(self.path).path in _MODEL_PATHS:
            self.server.used(int(time.time()), body, batch=False)
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        hdrs = {**self._common_headers(), **(headers or {})}
        if self.headers.get("x-standin-gzip") == "1" and "gzip" in self.headers.get("accept-encoding", ""):
            data = gzip.compress(data)
            hdrs["content-encoding"] = "gzip"
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
                f"content-type: {content_type}", f"content-length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in hdrs.items()]
        if cut:
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        self.wfile.flush()

    def send_raw(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Exactly these header bytes (plus a request id unless given, and the length) and body."""
        head = [b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode())]
        names = {k.lower() for k, _ in headers}
        if b"x-request-id" not in names:
            head.append(b"x-request-id: " + new_id("req_").encode())
        head += [k + b": " + v for k, v in headers]
        head.append(b"content-length: %d" % len(body))
        self.wfile.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.wfile.flush()

    def send_error_json(self, status: int, message: str, type_: str, code: str | None,
                        headers: dict[str, str] | None = None) -> None:
        self.send(status, error_body(message, type_, code), headers=headers)

    def stream(self, events: list[bytes], *, drop_after: int | None = None) -> None:
        """Send SSE events one by one with chunked encoding (optionally gzip, Z_SYNC_FLUSH)."""
        delay = float(self.headers.get("x-standin-delay") or 0.02)
        gz = self.headers.get("x-standin-gzip") == "1"
        comp = zlib.compressobj(wbits=31) if gz else None
        head = ["HTTP/1.1 200 OK", "content-type: text/event-stream; charset=utf-8",
                "transfer-encoding: chunked", "cache-control: no-cache"]
        head += [f"{k}: {v}" for k, v in self._common_headers().items()]
        if gz:
            head.append("content-encoding: gzip")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
        self.wfile.flush()
        for i, ev in enumerate(events):
            if drop_after is not None and i == drop_after:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            data = comp.compress(ev) + comp.flush(zlib.Z_SYNC_FLUSH) if comp else ev
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            if i < len(events) - 1:
                time.sleep(delay)
        if comp:
            tail = comp.flush()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- routing ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def do_DELETE(self) -> None:
        self.route("DELETE")

    def route(self, method: str) -> None:
        raw = self._body()
        url = urlsplit(self.path)
        path = url.path
        self.query = parse_qs(url.query)
        if self.server.take_broken():
            return self.send_error_json(503, "The stand-in is down (StandIn.break_after).", "server_error", None)
        deployment = None
        if path.startswith("/openai/"):
            path, deployment, refused = self._azure(path, parse_qs(url.query))
            if refused:
                return
        else:
            auth = self.headers.get("authorization", "")
            if self.server.keyless and not auth:
                pass  # playing a local model server (Ollama, vLLM): no key asked for
            elif not auth.startswith("Bearer sk-") or auth.startswith("Bearer sk-bad"):
                return self.send_error_json(401, "Incorrect API key provided.", "invalid_request_error",
                                            "invalid_api_key")
        if canned := self.server.canned.get(self.headers.get("x-standin-canned", "")):
            return self.send_raw(*canned)
        scenario = self.headers.get("x-standin-scenario", "")
        if method == "POST" and path in _MODEL_PATHS and self.server.take_rate_limit():
            return self.send_error_json(
                429, "Rate limit reached for requests per min (RPM).", "requests", "rate_limit_exceeded",
                headers={"retry-after-ms": "50", "retry-after": "1", "x-ratelimit-remaining-requests": "0"})
        if scenario == "429":
            return self.send_error_json(
                429, "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3.",
                "requests", "rate_limit_exceeded",
                headers={"retry-after": "20", "x-ratelimit-remaining-requests": "0"})
        if scenario == "500":
            return self.send_error_json(500, "The server had an error while processing your request.",
                                        "server_error", None)
        if scenario == "slow":
            time.sleep(float(self.headers.get("x-standin-delay") or 1))
        body: Any = {}
        if raw and self.headers.get("content-type", "").startswith("application/json"):
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return self.send_error_json(400, "We could not parse the JSON body of your request.",
                                            "invalid_request_error", None)
        if deployment is not None and isinstance(body, dict):
            body = {**body, "model": AZURE_DEPLOYMENTS[deployment]}  # the deployment decides the model
        handler = self.server.routes.get((method, path))
        if handler is None:
            for (m, prefix), h in self.server.prefix_routes.items():
                if m == method and path.startswith(prefix):
                    handler = h
                    break
        if handler is None:
            return self.send_error_json(404, f"Invalid URL ({method} {path})", "invalid_request_error",
                                        None)
        handler(self, path, body, raw)

    def _azure(self, path: str, query: dict[str, list[str]]) -> tuple[str, str | None, bool]:
        """An Azure OpenAI path -> (the OpenAI path, the deployment, whether it was refused (answered))."""
        key = self.headers.get("api-key", "")
        if not key or key.startswith("bad"):
            self.send(401, {"error": {"code": "401", "message": AZURE_401}})
            return path, None, True
        rest = path[len("/openai"):]
        if rest.startswith("/v1/"):  # Azure's v1 API: no api-version
            return rest, None, False
        if not query.get("api-version"):
            self.send(404, {"error": {"code": "404", "message": "Resource not found"}})
            return path, None, True
        deployment = None
        if rest.startswith("/deployments/"):
            deployment, _, rest = rest[len("/deployments/"):].partition("/")
            rest = "/" + rest
            if deployment not in AZURE_DEPLOYMENTS:
                self.send(404, {"error": {
                    "code": "DeploymentNotFound",
                    "message": "The API deployment for this resource does not exist. If you created the "
                               "deployment within the last 5 minutes, please wait a moment and try again."}})
                return path, None, True
        return "/v1" + rest, deployment, False

    # -- live endpoints --------------------------------------------------------------------------

    def h_chat(self, path: str, body: dict[str, Any], raw: bytes) -> None:
        if (reply := self.server.copilot.reply(body, dict(self.headers.items()))) is not None:
            resp = chat_completion(body)
            resp["choices"][0]["message"]["content"] = reply
            return self.send(200, resp)
        resp = chat_completion(body)
        if not body.get("stream"):
            return self.send(200, resp)
        base = {k: resp[k] for k in ("id", "created", "model", "system_fingerprint", "service_tier")}
        base["object"] = "chat.completion.chunk"
        words = resp["choices"][0]["message"]["content"].split(" ")
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}]
        for i, w in enumerate(words):
            events.append({**base, "choices": [{"index": 0, "delta": {"content": w if i == 0 else " " + w},
                                                "finish_reason": None}]})
        events.append({**base, "choices": [{"index": 0, "delta": {},
                                            "finish_reason": resp["choices"][0]["finish_reason"]}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            # as OpenAI: every chunk gets "usage": null, then one more with empty choices and the usage
            events = [{**e, "usage": None} for e in events]
            events.append({**base, "choices": [], "usage": resp["usage"]})
        wire = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
        drop = 3 if self.headers.get("x-standin-scenario") == "drop" else None
        self.stream(wire, drop_after=drop)

    def h_usage(self, path: str, body: Any, raw: bytes) -> None:
        """``GET /v1/organization/usage/completions`` (an admin key, ``sk-admin…``): daily buckets of what this
        stand-in served, grouped by model, filtered by ``batch``; pages of ``limit`` buckets (default 7)."""
        if not self.headers.get("authorization", "").startswith("Bearer sk-admin"):
            return self.send_error_json(401, "An admin key is required.", "invalid_request_error",
                                        "invalid_api_key")
        q = self.query
        start = int(q["start_time"][0]) // 86400 * 86400
        end = int((q.get("end_time") or [str(int(time.time()) + 86400)])[0])
        batch = {"true": True, "false": False}.get((q.get("batch") or [""])[0])
        by_model = "model" in (q.get("group_by") or q.get("group_by[]") or [])
        limit = int((q.get("limit") or ["7"])[0])
        first = int((q.get("page") or ["0"])[0])
        days = list(range(start, end, 86400))
        page = days[first:first + limit]
        with self.server._usage_lock:
            served = list(self.server.usage)
        data = []
        for day in page:
            groups: dict[tuple[str | None, bool | None], list[int]] = {}
            for at, model, is_batch, inp, out in served:
                if day <= at < day + 86400 and (batch is None or is_batch == batch):
                    g = groups.setdefault((model if by_model else None, batch), [0, 0, 0])
                    g[0] += inp
                    g[1] += out
                    g[2] += 1
            data.append({"object": "bucket", "start_time": day, "end_time": day + 86400, "results": [
                {"object": "organization.usage.completions.result", "input_tokens": g[0], "output_tokens": g[1],
                 "input_cached_tokens": 0, "input_audio_tokens": 0, "output_audio_tokens": 0,
                 "num_model_requests": g[2], "project_id": None, "user_id": None, "api_key_id": None,
                 "model": model, "batch": b} for (model, b), g in sorted(groups.items(), key=str)]})
        more = first + limit < len(days)
        self.send(200, {"object": "page", "data": data, "has_more": more,
                        "next_page": str(first + limit) if more else None})

    def h_completions(self, path: str, body: dict[str, Any], raw: bytes) -> None:
        """Legacy completions: streamed chunks carry ``choices[0].text``, not a ``delta``."""
        resp = text_completion(body)
        if not body.get("stream"):
            return self.send(200, resp)
        base = {k: resp[k] for k in ("id", "object", "created", "model", "system_fingerprint")}
        words = ANSWER.split(" ")
        events = [{**base, "choices": [{"index": 0, "text": w if i == 0 else " " + w, "logprobs": None,
                                        "finish_reason": None}]} for i, w in enumerate(words)]
        events.append({**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": resp["usage"]})
        self.stream([b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"])

    def h_responses(self, path: str, body: dict[str, Any], raw: bytes) -> None:
        final = response_object(body)
        if not body.get("stream"):
            return self.send(200, final)
        start = {**final, "status": "in_progress", "output": [], "usage": None}
        item = final["output"][0]
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": start}),
            ("response.in_progress", {"response": start}),
            ("response.output_item.added", {"output_index": 0, "item": {**item, "content": [],
                                                                          "status": "in_progress"}}),
        ]
        text = item["content"][0]["text"]
        for i, w in enumerate(text.split(" ")):
            events.append(("response.output_text.delta", {"item_id": item["id"], "output_index": 0,
                                                          "content_index": 0,
                                                          "delta": w if i == 0 else " " + w}))
        events += [
            ("response.output_text.done", {"item_id": item["id"], "output_index": 0, "content_index": 0,
                                           "text": text}),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": final}),
        ]
        wire = [f"event: {t}\n".encode() + b"data: " + orjson.dumps(
            {"type": t, "sequence_number": n, **d}) + b"\n\n" for n, (t, d) in enumerate(events)]
        drop = 4 if self.headers.get("x-standin-scenario") == "drop" else None
        self.stream(wire, drop_after=drop)

    def h_embeddings(self, path: str, body: dict[str, Any], raw: bytes) -> None:
        self.send(200, embeddings(body))

    def h_images(self, path: str, body: dict[str, Any], raw: bytes) -> None:
        self.send(200, images(body, edit=path.endswith("/edits")))

    def h_moderations(self, path: str, body: dict[str, Any], raw: bytes) -> None:
        self.send(200, moderation(body))

    def h_videos(self, path: str, body: dict[str, Any], raw: bytes) -> None:
        if self.headers.get("content-type", "").startswith("multipart/"):  # the SDK sends a form
            body = {k: v.decode("utf-8", "replace") for k, v in _multipart(self, raw).items()}
        job = video(body)
        self.server.videos[job["id"]] = job
        self.send(200, job)

    def h_video_get(self, path: str, body: dict[str, Any], raw: bytes) -> None:
        parts = path.removeprefix("/v1/videos/").split("/")
        job = self.server.videos.get(parts[0])
        if job is None:
            return self.send_error_json(404, "Video not found.", "invalid_request_error", None)
        if parts[1:] == ["content"]:  # an MP4 of 40 kB a second of video (the size is what a test checks)
            self.send(200, video_bytes(job), content_type="video/mp4")
            return
        self.send(200, {**job, "status": "completed", "progress": 100, "completed_at": int(time.time())})


def _multipart(handler: Handler, raw: bytes) -> dict[str, bytes]:
    """Parse a multipart body with the stdlib (independent of velvet's own scanner)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    ct = handler.headers.get("content-type", "")
    if len(raw) > 8 * 1024 * 1024:
        return _multipart_big(ct, raw)
    msg = BytesParser(policy=HTTP).parsebytes(b"content-type: " + ct.encode() + b"\r\n\r\n" + raw)
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[name] = part.get_payload(decode=True) or b""
    return out


def _multipart_big(content_type: str, raw: bytes) -> dict[str, bytes]:
    """The stdlib parser is slow on hundreds of MB: split on the boundary with ``bytes.find``."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"').encode()
    delim = b"\r\n--" + boundary
    out, pos = {}, raw.find(b"--" + boundary)
    while pos >= 0:
        head_end = raw.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        head = raw[pos:head_end]
        end = raw.find(delim, head_end + 4)
        i = head.find(b'name="')
        if i >= 0 and end >= 0:
            out[head[i + 6:head.find(b'"', i + 6)].decode()] = raw[head_end + 4:end]
        pos = end + 2 if end >= 0 else -1
    return out


def batch_answer(line: dict[str, Any], endpoint: str) -> tuple[dict[str, Any], bool]:
    """The output-file line for one input line, and whether it failed."""
    body = line.get("body") or {}
    if body.get("model") == "bad-model":
        return {"id": new_id("batch_req_"), "custom_id": line.get("custom_id"), "error": None,
                "response": {"status_code": 400, "request_id": new_id("req_"),
                             "body": error_body("The model `bad-model` does not exist.",
                                                "invalid_request_error", "model_not_found", "model")}}, True
    if endpoint.endswith("/embeddings"):
        answer = embeddings(body)
    elif endpoint.endswith("/images/generations") or endpoint.endswith("/images/edits"):
        answer = images(body, edit=endpoint.endswith("/edits"))
    elif endpoint.endswith("/moderations"):
        answer = moderation(body)
    elif endpoint.endswith("/videos"):
        answer = video(body)
    elif endpoint.endswith("/completions") and not endpoint.endswith("/chat/completions"):
        answer = text_completion(body)
    elif endpoint.endswith("/responses"):
        answer = response_object(body)
    else:
        answer = chat_completion(body)
    return {"id": new_id("batch_req_"), "custom_id": line.get("custom_id"), "error": None,
            "response": {"status_code": 200, "request_id": new_id("req_"), "body": answer}}, False


class BatchAPI:
    """Files, uploads and batches. A batch moves one step per retrieve (validating -> in_progress ->
    finalizing -> completed); ``metadata.standin`` = ``fail`` fails validation, ``expire`` expires it
    with partial output, ``stuck`` keeps it ``in_progress`` (until cancelled). Lines whose body asks for
    model ``bad-model`` fail with a 400."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.content: dict[str, bytes] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self.parts: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.clock = int(time.time())  # fake API time: starts now, advances 60 s per step
        self.paused = False  # True: no batch moves on (a test holds one open)
        self.used: Any = lambda at, body, batch: None  # the server's usage record (StandIn.used)

    def tick(self) -> int:
        self.clock += 60
        return self.clock

    def new_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        f = {"id": new_id("file-"), "object": "file", "bytes": len(data), "created_at": self.clock,
             "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
             "status_details": None}
        self.files[f["id"]] = f
        self.content[f["id"]] = data
        return f

    def advance(self, b: dict[str, Any]) -> None:
        if self.paused:
            return
        mode = (b.get("metadata") or {}).get("standin")
        st = b["status"]
        if st == "validating":
            if mode == "fail":
                b.update(status="failed", failed_at=self.tick(), errors={"object": "list", "data": [
                    {"code": "invalid_request", "message": "Line 2: custom_id is duplicated.",
                     "param": "custom_id", "line": 2}]})
            else:
                b.update(status="in_progress", in_progress_at=self.tick())
        elif st == "in_progress":
            if mode == "stuck":
                return
            if mode == "expire":
                self.finish(b, "expired", partial=True)
            else:
                b.update(status="finalizing", finalizing_at=self.tick())
        elif st == "finalizing":
            self.finish(b, "completed")
        elif st == "cancelling":
            self.finish(b, "cancelled", partial=True)

    def finish(self, b: dict[str, Any], status: str, partial: bool = False) -> None:
        lines = []
        for x in self.content[b["input_file_id"]].splitlines():
            try:
                obj = orjson.loads(x)
            except orjson.JSONDecodeError:
                continue  # the real API rejects such files; the stand-in just skips the line
            if isinstance(obj, dict):
                lines.append(obj)
        done = lines[: len(lines) // 2] if partial else lines
        out, err = [], []
        for line in reversed(done):  # output order is not input order
            ans, failed = batch_answer(line, b["endpoint"])
            (err if failed else out).append(ans)
        if status == "expired":
            err += [{"id": new_id("batch_req_"), "custom_id": x.get("custom_id"), "response": None,
                     "error": {"code": "batch_expired",
                               "message": "This request could not be executed before the "
                                          "completion window expired."}}
                    for x in lines[len(done):]]
        jl = lambda xs: b"".join(orjson.dumps(x) + b"\n" for x in xs)  # noqa: E731
        if out:
            b["output_file_id"] = self.new_file(jl(out), "batch_output.jsonl", "batch_output")["id"]
        if err:
            b["error_file_id"] = self.new_file(jl(err), "batch_errors.jsonl", "batch_output")["id"]
        usage = [o["response"]["body"].get("usage") or {} for o in out]
        inp = sum(u.get("prompt_tokens", u.get("input_tokens", 0)) for u in usage)
        outp = sum(u.get("completion_tokens", u.get("output_tokens", 0)) for u in usage)
        for o in out:
            self.used(self.clock + 60, o["response"]["body"], batch=True)  # (at its end, on the API's clock)
        b.update(status=status, request_counts={"total": len(lines), "completed": len(out), "failed": len(err)},
                 model=_snapshot((lines[0].get("body") or {}).get("model")) if lines else None,
                 usage={"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": outp, "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": inp + outp})
        b[f"{status}_at"] = self.tick()

    # handlers (called with the Handler as first argument)

    def files_create(self, h: Handler, path: str, body: Any, raw: bytes) -> None:
        form = _multipart(h, raw)
        if "file" not in form:
            return h.send_error_json(400, "Missing file", "invalid_request_error", None)
        with self.lock:
            f = self.new_file(form["file"], "input.jsonl", form.get("purpose", b"").decode())
        h.send(200, f)

    def files_get(self, h: Handler, path: str, body: Any, raw: bytes) -> None:
        parts = path.split("/")
        fid = parts[3]
        if fid not in self.files:
            return h.send_error_json(404, f"No such File object: {fid}", "invalid_request_error", None)
        if len(parts) == 5 and parts[4] == "content":
            if h.headers.get("x-standin-scenario") == "drop":  # the connection dies half-way
                return h.send(200, self.content[fid], content_type="application/octet-stream", cut=True)
            return h.send(200, self.content[fid], content_type="application/octet-stream")
        h.send(200, self.files[fid])

    def files_delete(self, h: Handler, path: str, body: Any, raw: bytes) -> None:
        fid = path.split("/")[3]
        self.files.pop(fid, None)
        h.send(200, {"id": fid, "object": "file", "deleted": True})

    def uploads_create(self, h: Handler, path: str, body: Any, raw: bytes) -> None:
        u = {"id": new_id("upload_"), "object": "upload", "bytes": body.get("bytes"), "created_at": self.tick(),
             "filename": body.get("filename"), "purpose": body.get("purpose"), "status": "pending",
             "expires_at": self.clock + 3600, "file": None}
        self.uploads[u["id"]] = u
        h.send(200, u)

    def uploads_action(self, h: Handler, path: str, body: Any, raw: bytes) -> None:
        _, _, _, uid, action = path.split("/")
        u = self.uploads.get(uid)
        if u is None:
            return h.send_error_json(404, "No such upload", "invalid_request_error", None)
        if action == "parts":
            pid = new_id("part_")
            self.parts[pid] = _multipart(h, raw).get("data", b"")
            return h.send(200, {"id": pid, "object": "upload.part", "created_at": self.tick(), "upload_id": uid})
        if action == "complete":
            data = b"".join(self.parts[p] for p in body.get("part_ids", []))
            with self.lock:
                f = self.new_file(data, u["filename"], u["purpose"])
            u.update(status="completed", file=f)
        elif action == "cancel":
            u.update(status="cancelled")
        h.send(200, u)

    def batches_create(self, h: Handler, path: str, body: Any, raw: bytes) -> None:
        if body.get("input_file_id") not in self.files:
            return h.send_error_json(400, "Invalid input_file_id", "invalid_request_error", None)
        now = self.tick()
        b = {"id": new_id("batch_"), "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
             "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window"),
             "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
             "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None, "completed_at": None,
             "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
             "model": None, "usage": None}
        if body.get("output_expires_after"):
            b["output_expires_after"] = body["output_expires_after"]
        self.batches[b["id"]] = b
        h.send(200, b)

    def batches_get(self, h: Handler, path: str, body: Any, raw: bytes) -> None:
        parts = path.split("/")
        if len(parts) == 3:  # list, newest first, a page of ``limit`` (default 20, at most 100) ``after`` an id
            data = sorted(self.batches.values(), key=lambda b: (b["created_at"], b["id"]), reverse=True)
            after = (h.query.get("after") or [None])[0]
            if after is not None:
                ids = [b["id"] for b in data]
                data = data[ids.index(after) + 1:] if after in ids else []
            limit = max(1, min(100, int((h.query.get("limit") or ["20"])[0])))
            page, more = data[:limit], len(data) > limit
            return h.send(200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                "last_id": page[-1]["id"] if page else None, "has_more": more})
        b = self.batches.get(parts[3])
        if b is None:
            return h.send_error_json(404, "No such batch", "invalid_request_error", None)
        with self.lock:
            self.advance(b)
        h.send(200, b)

    def batches_cancel(self, h: Handler, path: str, body: Any, raw: bytes) -> None:
        b = self.batches.get(path.split("/")[3])
        if b is None:
            return h.send_error_json(404, "No such batch", "invalid_request_error", None)
        if b["status"] in ("validating", "in_progress", "finalizing"):
            b.update(status="cancelling", cancelling_at=self.tick())
        h.send(200, b)


COPILOT_MARK = "You are velvet's SQL copilot."


class Copilot:
    """Scripted replies for ``velvet ask`` (a chat request whose system message starts with
    :data:`COPILOT_MARK`), and every such request received (``requests``: body and headers).

    A reply comes from ``queue`` (first in, first out) while it holds any; else from ``answers``: the replies for
    the last user message of the conversation that is a key of it, the n-th reply for the n-th attempt (the last
    one repeated); else ``UNSUPPORTED: ...``.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: list[str] = []
        self.answers: dict[str, list[str]] = {}
        self.requests: list[dict[str, Any]] = []

    def reset(self) -> None:
        with self.lock:
            self.queue.clear()
            self.answers.clear()
            self.requests.clear()

    def reply(self, body: Any, headers: dict[str, str]) -> str | None:
        messages = body.get("messages") if isinstance(body, dict) else None
        if not (isinstance(messages, list) and messages and isinstance(messages[0], dict)
                and str(messages[0].get("content", "")).startswith(COPILOT_MARK)):
            return None
        with self.lock:
            self.requests.append({"body": body, "headers": {k.lower(): v for k, v in headers.items()}})
            if self.queue:
                return self.queue.pop(0)
            for i in range(len(messages) - 1, 0, -1):
                m = messages[i]
                if m.get("role") == "user" and m.get("content") in self.answers:
                    replies = self.answers[m["content"]]
                    n = sum(1 for x in messages[i + 1:] if x.get("role") == "assistant")
                    return replies[min(n, len(replies) - 1)]
        return "UNSUPPORTED: the stand-in has no scripted reply for this question"


class StandIn(ThreadingHTTPServer):
    """The server. ``StandIn.start()`` runs it in a thread on a free port."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), Handler)
        self.routes = {
            ("POST", "/v1/chat/completions"): Handler.h_chat,
            ("POST", "/v1/responses"): Handler.h_responses,
            ("POST", "/v1/embeddings"): Handler.h_embeddings,
            ("POST", "/v1/completions"): Handler.h_completions,
            ("POST", "/v1/images/generations"): Handler.h_images,
            ("POST", "/v1/images/edits"): Handler.h_images,
            ("POST", "/v1/moderations"): Handler.h_moderations,
            ("POST", "/v1/videos"): Handler.h_videos,
        }
        api = self.batch_api = BatchAPI()
        self.routes.update({
            ("POST", "/v1/files"): lambda h, *a: api.files_create(h, *a),
            ("POST", "/v1/uploads"): lambda h, *a: api.uploads_create(h, *a),
            ("POST", "/v1/batches"): lambda h, *a: api.batches_create(h, *a),
            ("GET", "/v1/batches"): lambda h, *a: api.batches_get(h, *a),
        })
        self.prefix_routes: dict[tuple[str, str], Any] = {
            ("GET", "/v1/files/"): lambda h, *a: api.files_get(h, *a),
            ("DELETE", "/v1/files/"): lambda h, *a: api.files_delete(h, *a),
            ("POST", "/v1/uploads/"): lambda h, *a: api.uploads_action(h, *a),
            ("POST", "/v1/batches/"): lambda h, *a: api.batches_cancel(h, *a),
            ("GET", "/v1/batches/"): lambda h, *a: api.batches_get(h, *a),
            ("GET", "/v1/videos/"): Handler.h_video_get,
        }
        self.routes[("GET", "/v1/organization/usage/completions")] = Handler.h_usage
        api.used = self.used
        self.usage: list[tuple[int, str, bool, int, int]] = []  # (unix time, model, batch, input, output tokens)
        self._usage_lock = threading.Lock()
        self._broken_in: int | None = None  # requests left before the API is down (break_after)
        self.videos: dict[str, dict[str, Any]] = {}
        self.thread: threading.Thread | None = None
        self.canned: dict[str, tuple[int, list[tuple[bytes, bytes]], bytes]] = {}
        self._rate_limited = 0
        self._rate_lock = threading.Lock()
        self.copilot = Copilot()
        self.keyless = False  # True: requests without a key are answered (a local model server)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a proxy stopped while its keep-alive connection was open) is no error of the
        stand-in's: nothing printed. Anything else is printed, as socketserver does."""
        import sys

        if not isinstance(sys.exception(), ConnectionError):
            super().handle_error(request, client_address)

    def rate_limit(self, n: int) -> None:
        """The next ``n`` model calls (chat, responses, embeddings) get a 429."""
        with self._rate_lock:
            self._rate_limited = n

    def used(self, at: int, body: dict[str, Any], batch: bool) -> None:
        """Record an answered model request for the Usage API (what it served: live answers as sent, batch
        lines when their batch ends)."""
        u = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        inp = u.get("prompt_tokens", u.get("input_tokens", 0)) or 0
        out = u.get("completion_tokens", u.get("output_tokens", 0)) or 0
        with self._usage_lock:
            self.usage.append((at, str(body.get("model")), batch, int(inp), int(out)))

    def break_after(self, n: int | None) -> None:
        """After ``n`` more requests every request gets a 503 (None: mended)."""
        with self._rate_lock:
            self._broken_in = n

    def take_broken(self) -> bool:
        with self._rate_lock:
            if self._broken_in is None:
                return False
            if self._broken_in > 0:
                self._broken_in -= 1
                return False
            return True

    def take_rate_limit(self) -> bool:
        with self._rate_lock:
            if self._rate_limited <= 0:
                return False
            self._rate_limited -= 1
            return True

    def can(self, body: bytes, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None,
            content_type: bytes = b"application/json") -> str:
        """Register a reply sent verbatim to requests with ``x-standin-canned: <the returned key>``."""
        key = new_id("canned-")
        self.canned[key] = (status, [(b"content-type", content_type), *(headers or [])], body)
        return key


    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> StandIn:
        self.thread = threading.Thread(target=self.serve_forever, name="standin", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(description="A local stand-in for the OpenAI API.")
    ap.add_argument("--port", type=int, default=8600)
    args = ap.parse_args()
    srv = StandIn(port=args.port)
    print(f"stand-in OpenAI API on {srv.url}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
