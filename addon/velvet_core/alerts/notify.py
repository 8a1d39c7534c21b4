"""Messages for state changes, and their delivery: webhook POSTs (signed, retried) and a command.

The :class:`Notifier` works in its own thread from a queue: ``send`` never blocks the caller, a failing
webhook is retried with exponential backoff (network errors, 5xx, 408, 429) and then given up with a
logged warning. A webhook URL often holds a token: logs show its scheme and host only. With a secret,
each POST is signed over its send time and body (``v1=``, docs/security.md), so a captured message
cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import logging
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson

from velvet_core import __version__
from velvet_core.alerts.evaluate import fmt_value
from velvet_core.alerts.rules import BATCH_KINDS, BELOW_KINDS, Notify, Rule
from velvet_core.alerts.state import Change
from velvet_core.storage.sql import iso

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Velvet-Signature"
TIMESTAMP_HEADER = "X-Velvet-Timestamp"
MAX_QUEUED = 1000
MAX_LISTED = 50  # subjects detailed in one message (the text names 5)
_COMPARED = ("error_rate", "latency_p95_ms", "ttft_p95_ms", "spend_usd", "spend_spike", "batch_overdue",
             "batch_unread", "eval_fail_rate", "eval_score")
_WINDOWED = ("error_rate", "latency_p95_ms", "ttft_p95_ms", "spend_usd", "spend_spike", "eval_fail_rate",
             "eval_score")


# -- messages --------------------------------------------------------------------------------------

def threshold_for(rule: Rule, state: str) -> float | None:
    """The level a state is judged against: ``warning`` for warning, else ``threshold``
    (``window`` in seconds for velvet_stalled)."""
    if rule.kind == "velvet_stalled":
        return rule.window
    return rule.warning if state == "warning" else rule.threshold


def text(rule: Rule, state: str, summaries: Sequence[str], repeat: bool = False) -> str:
    """One line for people, e.g. ``velvet FIRING · chat errors: error rate 34.0% (…) > 20.0% over 5m``."""
    head = {"firing": "FIRING", "warning": "WARNING", "resolved": "RESOLVED"}[state]
    if repeat:
        head = f"STILL {head}"
    body = summaries[0]
    if len(summaries) > 1:
        body = f"{len(summaries)} {_plural(rule)}: " + "; ".join(summaries[:5])
    if len(summaries) > 5:
        body += f"; and {len(summaries) - 5} more"
    limit = threshold_for(rule, state)
    if state != "resolved" and rule.kind in _COMPARED and limit is not None and not body.startswith("no data"):
        sign = "<" if rule.kind in BELOW_KINDS else ">"
        body += f" {sign} {'warning ' if state == 'warning' else ''}{fmt_value(rule, limit)}"
    if rule.kind in _WINDOWED and not body.startswith("no data"):
        body += f" over {rule.window_text}"
    return f"velvet {head} · {rule.name}: {body}"


def _plural(rule: Rule) -> str:
    return "batches" if rule.kind in BATCH_KINDS else "proxies" if rule.kind == "velvet_stalled" else "subjects"


def payloads(changes: list[Change]) -> list[dict[str, Any]]:
    """One message per rule and new state: the changes of one evaluation, grouped (no flood)."""
    groups: dict[tuple[str, str, bool], list[Change]] = {}
    for c in changes:
        groups.setdefault((c.rule.name, c.state, c.repeat), []).append(c)
    out = []
    for (_, state, repeat), cs in groups.items():
        rule = cs[0].rule
        values = [c.value for c in cs if c.value is not None]
        if rule.kind in BATCH_KINDS:
            details: dict[str, Any] = {"batches": [c.details or {"id": c.subject} for c in cs[:MAX_LISTED]]}
        elif rule.kind == "velvet_stalled" and not cs[0].no_data:
            details = {"proxies": [c.details or {"proxy": c.subject} for c in cs[:MAX_LISTED]]}
        else:
            details = cs[0].details
        if len(cs) > MAX_LISTED:
            details["more"] = len(cs) - MAX_LISTED
        out.append({
            "rule": rule.name, "kind": rule.kind, "state": state,
            "value": max(values) if values else None, "threshold": threshold_for(rule, state),
            "window": rule.window_text, "at": iso(cs[0].at), "details": details,
            "text": text(rule, state, [slack_escape(c.summary) for c in cs], repeat),
        })
    return out


def slack_escape(s: str) -> str:
    """Text from traffic (model names, error codes) made inert for Slack's ``text``: a ``<!channel>``
    or ``<https://…|link>`` in a model name would otherwise ping everyone or show a link."""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Velvet-Signature`` value: ``v1=`` and the hex HMAC-SHA256 of ``"<timestamp>." + body``.

    The timestamp (``X-Velvet-Timestamp``, Unix seconds) is signed too, so a receiver that refuses old
    timestamps refuses a replayed message (the body alone was signed before ``v1``)."""
    return "v1=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def where(url: str) -> str:
    """A webhook URL for logs: scheme and host only (its path or query may hold a token)."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc.rsplit('@', 1)[-1]}/…"


# -- delivery --------------------------------------------------------------------------------------

class Notifier:
    """Delivers payloads to the ``[notify]`` webhooks and command from one background thread."""

    def __init__(self, notify: Notify, *, backoff: float = 1.0, command_timeout: float = 30.0) -> None:
        self.notify = notify
        self.backoff = backoff
        self.command_timeout = command_timeout
        self.delivered = 0
        self.failed = 0
        self._heap: list[tuple[float, int, tuple[str, str, bytes, int]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.notify.webhooks or self.notify.command)

    def start(self) -> Notifier:
        if self._thread is None and self.enabled:
            self._thread = threading.Thread(target=self._run, name="velvet-notify", daemon=True)
            self._thread.start()
        return self

    def send(self, payload: dict[str, Any]) -> None:
        """Queue ``payload`` for every target; never blocks."""
        if not self.enabled:
            return
        body = orjson.dumps(payload)
        with self._cv:
            if len(self._heap) >= MAX_QUEUED:
                log.warning("velvet: %d alert messages waiting to be delivered; dropping %r", len(self._heap),
                            payload.get("text"))
                return
            now = time.monotonic()
            for url in self.notify.webhooks:
                heapq.heappush(self._heap, (now, next(self._seq), ("webhook", url, body, 0)))
            if self.notify.command:
                heapq.heappush(self._heap, (now, next(self._seq), ("command", "", body, 0)))
            self._cv.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued was delivered or given up (retries included), at most ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._heap or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cv.wait(left)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``timeout``, then drop the rest (with a warning)."""
        if self._thread is None:
            return
        self.flush(timeout)
        with self._cv:
            self._stopping = True
            if self._heap:
                log.warning("velvet: %d alert messages not delivered before shutdown", len(self._heap))
            self._heap.clear()
            self._cv.notify_all()
        self._thread.join(self.notify.timeout + 1)
        self._thread = None

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stopping:
                        return
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        _, _, job = heapq.heappop(self._heap)
                        self._busy = True
                        break
                    self._cv.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
            try:
                self._deliver(job)
            except Exception:  # a bug here must not end the thread
                log.exception("velvet: delivering an alert failed")
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _deliver(self, job: tuple[str, str, bytes, int]) -> None:
        kind, url, body, attempt = job
        if kind == "command":
            self._run_command(body)
            return
        error = self._post(url, body)
        if error is None:
            self.delivered += 1
            return
        retryable, why = error
        tries = self.notify.retries + 1
        if retryable and attempt + 1 < tries:
            delay = min(self.backoff * 2 ** attempt, 300.0)
            log.warning("velvet: alert webhook %s failed (%s); retrying in %.0fs (attempt %d of %d)",
                        where(url), why, delay, attempt + 1, tries)
            with self._cv:
                heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq),
                                            ("webhook", url, body, attempt + 1)))
            return
        self.failed += 1
        log.warning("velvet: alert webhook %s failed (%s); gave up after %d attempt%s", where(url), why,
                    attempt + 1, "s" if attempt else "")

    def _post(self, url: str, body: bytes) -> tuple[bool, str] | None:
        """None when delivered, else (worth retrying, why)."""
        headers = {"Content-Type": "application/json", "User-Agent": f"velvet/{__version__}"}
        if self.notify.secret:
            # signed per attempt: a retry minutes later must still pass the receiver's time check
            now = int(time.time())
            headers[TIMESTAMP_HEADER] = str(now)
            headers[SIGNATURE_HEADER] = signature(self.notify.secret, now, body)
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.notify.timeout) as r:
                r.read(65536)
            return None
        except urllib.error.HTTPError as e:
            return e.code >= 500 or e.code in (408, 429), f"HTTP {e.code}"
        except (OSError, ValueError) as e:  # refused, unreachable, timeout, TLS
            reason = getattr(e, "reason", None) or e
            return True, f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason

    def _run_command(self, body: bytes) -> None:
        argv = self.notify.command
        try:
            r = subprocess.run(argv, input=body, capture_output=True, timeout=self.command_timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.failed += 1
            log.warning("velvet: alert command %s failed: %s", argv[0], e)
            return
        if r.returncode != 0:
            self.failed += 1
            err = r.stderr.decode("utf-8", "replace").strip().splitlines()
            log.warning("velvet: alert command %s exited with status %d%s", argv[0], r.returncode,
                        f": {err[-1][:200]}" if err else "")
        else:
            self.delivered += 1
