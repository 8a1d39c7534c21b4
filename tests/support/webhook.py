"""A local webhook receiver for the alert tests: keeps every POST (headers and JSON body)."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from support.rig import WAIT


def velvet_webhook_ok(secret: bytes, headers: dict[str, str], body: bytes, tolerance: int = 300,
                      now: float | None = None) -> bool:
    """The receiver's check documented in docs/security.md (``now`` added to test old messages)."""
    ts = headers.get("x-velvet-timestamp", "")
    if not ts.isdigit() or abs((time.time() if now is None else now) - int(ts)) > tolerance:
        return False  # missing, malformed or too old: a replay
    mac = hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest("v1=" + mac, headers.get("x-velvet-signature", ""))


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        srv = self.server
        with srv.lock:
            srv.attempts += 1
            fail = srv.fail_next > 0
            if fail:
                srv.fail_next -= 1
            else:
                srv.received.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body, "json": orjson.loads(body)})
        self.send_response(500 if fail else 204)
        self.send_header("content-length", "0")
        self.end_headers()


class WebhookServer(ThreadingHTTPServer):
    """``url`` takes POSTs; ``fail_next`` answers that many with a 500 first."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[dict[str, Any]] = []
        self.attempts = 0
        self.fail_next = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def messages(self, rule: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [r["json"] for r in self.received if rule is None or r["json"]["rule"] == rule]

    def wait(self, pred: Callable[[list[dict[str, Any]]], Any], timeout: float = WAIT,
             what: str = "messages") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred(self.messages())
            if got:
                return got
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; received: {[m['text'] for m in self.messages()]}")

    def wait_state(self, rule: str, state: str, after: int = 0, timeout: float = WAIT) -> dict[str, Any]:
        """The first message of ``rule`` in ``state`` among those after the first ``after`` of the rule."""
        return self.wait(lambda ms: next((m for m in [m for m in ms if m["rule"] == rule][after:]
                                          if m["state"] == state), None), timeout, f"{rule} {state}")

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
