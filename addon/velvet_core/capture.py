"""The mitmproxy addon: decide which flows are ours, snapshot them, hand them to the writer."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from . import batches, batchstore, config
from .calls import parse_call, utc
from .classify import classify
from .database import DatabaseURLError, check_url
from .pricing import PriceFileError, Pricer, load_price_file
from .snapshot import META_KEY, CallSnapshot, StreamRecorder, begin, finish
from .store import Op
from .writer import Writer, _redact

log = logging.getLogger("velvet")


def guarded(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Log any exception of ours with the flow's context; the flow always goes on untouched."""

    @functools.wraps(hook)
    def wrapper(self: Velvet, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception:
            log.exception("velvet: %s failed for %s %s (flow %s); the flow continues",
                          hook.__name__, flow.request.method, flow.request.pretty_url, flow.id)

    return wrapper


class Velvet:
    """Capture OpenAI API traffic into SQLite or PostgreSQL."""

    def __init__(self) -> None:
        self.writer: Writer | None = None
        self.pricer = Pricer()
        self.hosts: frozenset[str] = frozenset(config.DEFAULT_HOSTS)
        self.body_limit = 8 * 1024 * 1024
        self.recorders: dict[str, StreamRecorder] = {}
        self.snapshots: dict[str, CallSnapshot] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option("velvet_db", str, "",
                          "Database URL: sqlite:///relative.db, sqlite:////absolute.db or "
                          "postgresql://user:pass@host:port/db. Default: $VELVET_DB, else "
                          f"{config.default_db_url()}.")
        loader.add_option("velvet_hosts", Sequence[str], list(config.DEFAULT_HOSTS),
                          "Hosts whose flows are captured (repeat --set for several), e.g. an "
                          "Azure OpenAI resource <name>.openai.azure.com.")
        loader.add_option("velvet_prices", str, "",
                          "A TOML or JSON file of prices (USD per million tokens) that override "
                          "genai-prices for the models it names.")
        loader.add_option("velvet_body_limit", int, 8 * 1024 * 1024,
                          "Bodies larger than this many bytes (decoded) are not stored in calls.")
        loader.add_option("velvet_spool_dir", str, "",
                          "Where rows wait on disk while the database is unreachable. Default: "
                          f"{config.default_spool_dir()}.")
        loader.add_option("velvet_flush_timeout", float, 30.0,
                          "Seconds to wait at shutdown for queued rows to be written (the rest is "
                          "spooled to disk and written at the next start).")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "velvet_db" in updated and opts.velvet_db:
            try:
                check_url(opts.velvet_db)
            except DatabaseURLError as e:
                raise exceptions.OptionsError(f"velvet_db: {e}") from None
        if "velvet_hosts" in updated:
            hosts = [h.strip().lower() for h in opts.velvet_hosts if h.strip()]
            if bad := [h for h in hosts if "/" in h or " " in h or "," in h]:
                raise exceptions.OptionsError(
                    f"velvet_hosts: {bad[0]!r} is not a host name (repeat --set velvet_hosts=HOST "
                    "for several)")
            self.hosts = frozenset(hosts)
        if "velvet_prices" in updated:
            try:
                self.pricer = Pricer(load_price_file(opts.velvet_prices) if opts.velvet_prices else None)
            except PriceFileError as e:
                raise exceptions.OptionsError(f"velvet_prices: {e}") from None
        if "velvet_body_limit" in updated:
            if opts.velvet_body_limit < 0:
                raise exceptions.OptionsError("velvet_body_limit must be >= 0")
            self.body_limit = opts.velvet_body_limit
        if self.writer is not None and updated & {"velvet_db", "velvet_spool_dir"}:
            self._stop_writer()
            self._start_writer()

    def running(self) -> None:
        if self.writer is None:
            self._start_writer()

    def done(self) -> None:
        self._stop_writer()

    def db_url(self) -> str:
        return ctx.options.velvet_db or config.default_db_url()

    def _start_writer(self) -> None:
        url = self.db_url()
        spool = Path(ctx.options.velvet_spool_dir or config.default_spool_dir()).expanduser()
        self.writer = Writer(url, self.preparers(), spool_dir=spool, on_error=self._fallback,
                             setup=batchstore.register)
        self.writer.start()
        log.info("velvet: logging %s into %s", ", ".join(sorted(self.hosts)), _redact(url))

    def _stop_writer(self) -> None:
        if self.writer is None:
            return
        w, self.writer = self.writer, None
        if w.stop(ctx.options.velvet_flush_timeout):
            log.info("velvet: %d operations written", w.written)

    def preparers(self) -> dict[str, Callable[[Any], list[Op]]]:
        def call(s: CallSnapshot) -> list[Op]:
            pricer = self.pricer  # read per call: options may change while the writer runs
            row, req, resp = parse_call(s, pricer, self.body_limit)
            if row.get("problem"):
                level = logging.INFO if row["endpoint"] == "other" else logging.WARNING
                log.log(level, "velvet: %s %s: %s", s.method, s.path, row["problem"])
            ops: list[Op] = [("call", row)]
            if s.route.kind in ("files", "uploads", "batches"):
                ops += batches.prepare(s, req, resp, pricer)
            return ops

        return {"call": call}

    @staticmethod
    def _fallback(kind: str, payload: Any, exc: BaseException) -> list[Op]:
        """A bare row for a call we failed to process, so it is never lost."""
        if kind != "call":
            return []
        s: CallSnapshot = payload
        return [("call", {
            "flow_id": s.flow_id, "method": s.method, "host": s.host, "path": s.path,
            "endpoint": s.route.kind, "action": s.route.action, "status_code": s.status_code,
            "started_at": utc(s.started_at),
            "key_fingerprint": s.key_fingerprint,
            "problem": f"velvet internal error: {type(exc).__name__}: {exc}",
        })]

    # -- hooks -----------------------------------------------------------------------------------

    def _ours(self, flow: http.HTTPFlow) -> bool:
        req = flow.request
        return req.host.lower() in self.hosts or req.pretty_host.lower() in self.hosts

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._ours(flow):
            return
        route = classify(flow.request.method, flow.request.path)
        host = flow.request.pretty_host.lower()
        host = host if host in self.hosts else flow.request.host.lower()
        self.snapshots[flow.id] = begin(flow, route, host)
        flow.metadata[META_KEY] = {"endpoint": route.kind, "action": route.action}

    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.id not in self.snapshots or flow.response is None:
            return
        if "text/event-stream" in flow.response.headers.get("content-type", ""):
            rec = StreamRecorder(time.time)
            self.recorders[flow.id] = rec
            flow.response.stream = rec

    @guarded
    def response(self, flow: http.HTTPFlow) -> None:
        self._submit(flow)

    @guarded
    def error(self, flow: http.HTTPFlow) -> None:
        self._submit(flow)

    def _submit(self, flow: http.HTTPFlow) -> None:
        snap = self.snapshots.pop(flow.id, None)
        rec = self.recorders.pop(flow.id, None)
        if snap is None:
            return
        if rec is not None:
            snap.stream_chunks = rec.chunks
            snap.stream_finished = rec.finished
        finish(snap, flow)
        if self.writer is None:  # only before running() or after done(): keep the row anyway
            self._start_writer()
        assert self.writer is not None
        self.writer.submit("call", snap)
