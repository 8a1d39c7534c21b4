"""Run a plan and record it: as a Batch API job (upload the input file, create the batch, and with ``wait``
poll until it ends and download its output and error files) or live (bounded concurrency, retries with
backoff on 429). Requests go wherever the environment says (``HTTPS_PROXY``: velvet's proxy), so an
experiment is logged like any other traffic; the ``experiments`` tables hold what pairs it with its source."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import orjson
from peewee import Database

from velvet_core import clock
from velvet_core.api.client import APIError, Client, Reply
from velvet_core.experiments.plan import Plan, PlanLine
from velvet_core.experiments.select import EXPERIMENT_TAG, LINE_TAG
from velvet_core.humanize import Progress
from velvet_core.storage.models import Experiment, ExperimentLine, use

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


def now() -> datetime:
    return clock.now()


# -- the record ------------------------------------------------------------------------------------

def exists(db: Database, name: str) -> bool:
    with use(db):
        return Experiment.get_or_none(Experiment.name == name) is not None


def record(db: Database, *, name: str, source: dict[str, Any], overrides: dict[str, Any], mode: str,
           plan: Plan, estimated_cost_usd: float | None, key_fingerprint: str | None) -> None:
    """The experiment and its line map, in one transaction, before anything is sent."""
    with use(db), db.atomic():
        Experiment.insert(
            name=name, created_at=now(), source=orjson.dumps(source).decode(),
            overrides=orjson.dumps(overrides).decode(), mode=mode, endpoint=plan.endpoint,
            model=next(iter(plan.models)) if len(plan.models) == 1 else None, lines=len(plan.lines),
            estimated_cost_usd=estimated_cost_usd, key_fingerprint=key_fingerprint).execute()
        for i in range(0, len(plan.lines), 500):
            ExperimentLine.insert_many([_line_row(name, ln) for ln in plan.lines[i:i + 500]]).execute()


def _line_row(name: str, ln: PlanLine) -> dict[str, Any]:
    return {"experiment": name, "line_no": ln.line_no, "custom_id": ln.custom_id,
            "source_batch_id": ln.source_batch_id, "source_custom_id": ln.source_custom_id,
            "source_call_id": ln.source_call_id}


def forget(db: Database, name: str) -> None:
    """Remove an experiment that never reached the API (its upload or batch creation failed)."""
    with use(db), db.atomic():
        ExperimentLine.delete().where(ExperimentLine.experiment == name).execute()
        Experiment.delete().where(Experiment.name == name).execute()


def set_batch(db: Database, name: str, batch_id: str, input_file_id: str) -> None:
    with use(db):
        Experiment.update(batch_id=batch_id, input_file_id=input_file_id).where(Experiment.name == name).execute()


def set_answers(db: Database, name: str, replies: dict[str, LiveResult]) -> None:
    with use(db), db.atomic():
        for cid, r in replies.items():
            ExperimentLine.update(request_id=r.request_id, status_code=r.status).where(
                ExperimentLine.experiment == name, ExperimentLine.custom_id == cid).execute()


# -- batch mode ------------------------------------------------------------------------------------

def submit(client: Client, plan: Plan, name: str) -> dict[str, Any]:
    """Upload the input file and create the batch (metadata ``velvet_experiment``: the experiment)."""
    assert plan.endpoint is not None
    f = client.upload(plan.file, f"velvet-{name}.jsonl")
    return client.create_batch(f["id"], plan.endpoint, {"velvet_experiment": name})


def wait(client: Client, batch_id: str, poll_interval: float, status: TextIO | None = None,
         sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll every ``poll_interval`` seconds until the batch ends; a status line on a terminal."""
    out = status if status is not None else sys.stderr
    tty = out.isatty()
    try:
        while True:
            b = client.batch(batch_id)
            counts = b.get("request_counts") or {}
            if tty:
                done = (counts.get("completed") or 0) + (counts.get("failed") or 0)
                out.write(f"\r{batch_id}: {b.get('status')} ({done:,}/{counts.get('total') or 0:,} done)   ")
                out.flush()
            # a completed batch can report its output file a moment after its status
            pending_files = (b.get("status") == "completed" and not b.get("output_file_id")
                             and not b.get("error_file_id") and (counts.get("total") or 0) > 0)
            if b.get("status") in TERMINAL and not pending_files:
                return b
            sleep(poll_interval)
    finally:
        if tty:
            out.write("\n")
            out.flush()


def download(client: Client, batch: dict[str, Any], keep: bool = False) -> dict[str, Any]:
    """Download the output and error files (through the proxy, which logs their lines). Returns the line
    counts per file, and with ``keep`` the contents."""
    out: dict[str, Any] = {}
    for role in ("output", "error"):
        file_id = batch.get(f"{role}_file_id")
        if not file_id:
            continue
        data = bytearray() if keep else None
        lines, last = 0, b"\n"
        for chunk in client.download(file_id):
            lines += chunk.count(b"\n")
            last = chunk[-1:] or last
            if data is not None:
                data += chunk
        out[role] = {"file_id": file_id, "lines": lines + (last != b"\n"), "content": bytes(data or b"")}
    return out


# -- live mode -------------------------------------------------------------------------------------

@dataclass(slots=True)
class LiveResult:
    status: int | None  # None: the connection failed for good
    request_id: str | None
    attempts: int
    error: str | None = None


@dataclass
class LiveRun:
    results: dict[str, LiveResult] = field(default_factory=dict)
    refused: LiveResult | None = None  # a 401/403 stopped the run
    interrupted: bool = False

    @property
    def answered(self) -> int:
        return sum(1 for r in self.results.values() if r.status is not None and r.status < 300)

    @property
    def failed(self) -> int:
        return len(self.results) - self.answered

    @property
    def retried(self) -> int:
        return sum(1 for r in self.results.values() if r.attempts > 1)

    def errors(self) -> Counter[str]:
        return Counter(r.error or str(r.status) for r in self.results.values()
                       if r.status is None or r.status >= 300)


def _header_safe(value: str) -> bool:
    return value.isascii() and value.isprintable()


def run_live(client: Client, plan: Plan, name: str, concurrency: int, progress: Progress | None = None) -> LiveRun:
    """Send every request with at most ``concurrency`` in flight; stop early when the key is refused."""
    run = LiveRun()
    requests = plan.requests()
    lock, stop = threading.Lock(), threading.Event()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                try:
                    cid, url, body = next(requests)
                except StopIteration:
                    return
            headers = {f"velvet-metadata-{EXPERIMENT_TAG}": name}
            if _header_safe(cid):
                headers[f"velvet-metadata-{LINE_TAG}"] = cid
            try:
                reply: Reply = client.request("POST", url, json=body, headers=headers)
            except APIError as e:
                result = LiveResult(None, None, client.max_retries + 1, str(e))
            else:
                err = reply.body.get("error") if isinstance(reply.body, dict) else None
                code = (err.get("code") or err.get("type")) if isinstance(err, dict) else None
                result = LiveResult(reply.status, reply.request_id, reply.attempts,
                                    None if reply.status < 300 else f"{reply.status} {code or ''}".strip())
                if reply.status in (401, 403):
                    run.refused = result
                    stop.set()
            with lock:
                run.results[cid] = result
                if progress:
                    progress.advance()

    threads = [threading.Thread(target=worker, name=f"velvet-replay-{i}", daemon=True)
               for i in range(max(1, concurrency))]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
    except KeyboardInterrupt:
        stop.set()  # the requests in flight finish and are recorded
        run.interrupted = True
        for t in threads:
            t.join()
    return run
