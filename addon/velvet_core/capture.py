"""The mitmproxy addon: decide which flows are ours, snapshot them, hand them to the writer."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mitmproxy import command, contentviews, ctx, exceptions, http
from mitmproxy.hooks import UpdateHook

from . import annotate, batches, batchstore, config, humanize, queries
from .calls import Body, parse_call, utc
from .classify import classify
from .contentview import BatchJsonlContentview
from .database import DatabaseURLError, check_url
from .ingest import ingest_buffered, ingest_streamed
from .pricing import PriceFileError, Pricer, load_price_file
from .snapshot import META_KEY, CallSnapshot, StreamRecorder, TapInfo, begin, finish
from .store import ROW_KINDS, Op
from .tap import BodyTap, remove_stale_spills
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
        # flows waiting for their comment; weak, so a flow nobody else keeps (mitmdump) is not held
        self.flows: weakref.WeakValueDictionary[str, http.HTTPFlow] = weakref.WeakValueDictionary()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.comments = False  # set in running()
        self._notes: list[tuple[str, str, str | None]] = []  # comments waiting for the event loop
        self._notes_lock = threading.Lock()
        self.batch_status: dict[str, str] = {}  # writer thread only: last status seen per batch
        self.stream_threshold = 4 * 1024 * 1024
        self.taps: dict[str, tuple[BodyTap | None, BodyTap | None]] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        contentviews.add(BatchJsonlContentview())
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
        loader.add_option("velvet_stream_threshold", int, 4 * 1024 * 1024,
                          "Batch bodies (uploads, upload parts, file downloads) larger than this many bytes "
                          "are streamed through velvet's parser instead of being buffered: no delay to the "
                          "transfer, bounded memory, but mitmweb does not show the body (unless "
                          "store_streamed_bodies is on). Bodies mitmproxy already streams "
                          "(stream_large_bodies) are always followed.")
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
        if "velvet_stream_threshold" in updated:
            if opts.velvet_stream_threshold < 0:
                raise exceptions.OptionsError("velvet_stream_threshold must be >= 0")
            self.stream_threshold = opts.velvet_stream_threshold
        if self.writer is not None and updated & {"velvet_db", "velvet_spool_dir"}:
            self._stop_writer()
            self._start_writer()

    def running(self) -> None:
        self.loop = ctx.master.event_loop
        # comments only where a flow list shows them (mitmweb, the console); mitmdump has none
        self.comments = ctx.master.addons.get("view") is not None
        if self.writer is None:
            self._start_writer()

    def done(self) -> None:
        self._stop_writer()

    def db_url(self) -> str:
        return ctx.options.velvet_db or config.default_db_url()

    def spool_dir(self) -> Path:
        return Path(ctx.options.velvet_spool_dir or config.default_spool_dir()).expanduser()

    def _start_writer(self) -> None:
        url = self.db_url()
        spool = self.spool_dir()
        remove_stale_spills(spool / "streams")
        def setup(store: Any) -> None:  # in the writer thread, before the first flow
            batchstore.register(store)
            self.pricer.warm()

        self.writer = Writer(url, self.preparers(), spool_dir=spool, on_error=self._fallback, setup=setup)
        self.writer.start()
        log.info("velvet: logging %s into %s", ", ".join(sorted(self.hosts)), _redact(url))

    def _stop_writer(self) -> None:
        if self.writer is None:
            return
        w, self.writer = self.writer, None
        if w.stop(ctx.options.velvet_flush_timeout):
            log.info("velvet: %d operations written", w.written)

    def preparers(self) -> dict[str, Callable[[Any], Iterable[Op]]]:
        def call(s: CallSnapshot) -> Iterable[Op]:
            pricer = self.pricer  # read per call: options may change while the writer runs
            row, req, resp = parse_call(s, pricer, self.body_limit)
            if (s.route.kind, s.route.action) in batches.BODIES:
                return self._with_body(s, row, req, resp, pricer)
            ops: list[Op] = [("call", row)]
            if s.route.kind in ("files", "uploads", "batches"):
                ops += batches.prepare(s, req, resp, pricer)
            self._log_problem(s, row)
            self._annotate_later(s, row, ops)
            return ops

        return {"call": call}

    def _with_body(self, s: CallSnapshot, row: dict[str, Any], req: Body, resp: Body | None,
                   pricer: Pricer) -> Iterator[Op]:
        """An upload, upload part or download: its lines as they are parsed, then the call row."""
        problems: list[str] = []
        summary: list[Op] = [("call", row)]  # what the flow comment needs, not the lines themselves
        tap = s.request_tap or s.response_tap
        resp_json = resp.json if resp else None
        try:
            if tap is not None:  # streamed: the tap kept it on disk
                ops = ingest_streamed(s, tap, resp_json, pricer, problems)
            elif s.status_code is not None and s.status_code < 400:
                body = resp if s.route.action == "content" else req
                ops = ingest_buffered(s, body.data if body else None, resp_json, pricer, problems)
            else:
                ops = iter(())
            for op in ops:
                if op[0] not in ROW_KINDS:
                    summary.append(op)
                yield op
        except Exception as e:  # the call row below is written whatever happened to the body
            log.exception("velvet: could not parse the body of %s %s", s.method, s.path)
            problems.append(f"velvet internal error while parsing the body: {type(e).__name__}: {e}")
        if tap is not None:
            row["request_bytes" if s.request_tap else "response_bytes"] = tap.bytes
        if problems:
            row["problem"] = "; ".join(p for p in (row.get("problem"), *problems) if p)
            if tap is not None:
                row["complete"] = row.get("complete", True) and tap.finished and not tap.broken
        self._log_problem(s, row)
        self._annotate_later(s, row, summary)
        yield ("call", row)

    @staticmethod
    def _log_problem(s: CallSnapshot, row: dict[str, Any]) -> None:
        if row.get("problem"):
            level = logging.INFO if row["endpoint"] == "other" else logging.WARNING
            log.log(level, "velvet: %s %s: %s", s.method, s.path, row["problem"])

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

    # -- flow comments and markers ------------------------------------------------------------------

    def _annotate_later(self, s: CallSnapshot, row: dict[str, Any], ops: list[Op]) -> None:
        """(writer thread) Describe the call, then set the comment on the event loop."""
        if not self.comments:
            return
        try:
            text = annotate.comment(s.route, row, ops, self.batch_status)
            status = next((p["row"]["status"] for k, p in ops if k == "batch"), None)
            mark = annotate.marker(s.route, row.get("status_code"), row.get("complete", True), status)
            if self.loop is None or self.loop.is_closed() or s.flow_id not in self.flows:
                return
            with self._notes_lock:  # one loop wake-up per burst, not per call
                self._notes.append((s.flow_id, text, mark))
                if len(self._notes) > 1:
                    return
            self.loop.call_soon_threadsafe(self._annotate)
        except Exception:
            log.exception("velvet: could not describe flow %s", s.flow_id)

    def _annotate(self) -> None:
        """(event loop) Set our comments and markers unless the user has put their own there."""
        with self._notes_lock:
            notes, self._notes = self._notes, []
        updated = []
        for flow_id, text, mark in notes:
            flow = self.flows.pop(flow_id, None)
            if flow is None:
                continue
            if not flow.comment or flow.comment == flow.metadata.get(META_KEY, {}).get("comment"):
                flow.comment = text
                flow.metadata.setdefault(META_KEY, {})["comment"] = text
            if mark and (not flow.marked or flow.marked in annotate.MARKERS):
                flow.marked = mark
            updated.append(flow)
        # tell mitmweb's view; mitmdump has none, and an extra event per flow costs throughput there
        if updated and ctx.master.addons.get("view") is not None:
            try:
                ctx.master.addons.trigger(UpdateHook(updated))
            except Exception:
                log.debug("velvet: update hook failed", exc_info=True)

    @command.command("velvet.summary")
    def summary(self) -> str:
        """What velvet has captured: calls, tokens, cost and batches by status."""
        try:
            db = queries.open_readonly(self.db_url())
        except Exception as e:
            raise exceptions.CommandError(f"velvet: {e}") from None
        try:
            s = queries.stats(db, by="endpoint")
            by_status: dict[str, int] = {}
            for b in queries.batches(db):
                by_status[b["status"]] = by_status.get(b["status"], 0) + 1
        finally:
            db.close()
        calls = sum(g["calls"] for g in s["calls"])
        tokens = sum(g["input_tokens"] + g["output_tokens"] for g in s["calls"])
        cost = sum(g["cost_usd"] for g in s["calls"]) + sum(g["cost_usd"] for g in s["batches"])
        lines = sum(g["lines"] for g in s["batches"])
        statuses = ", ".join(f"{n} {st}" for st, n in sorted(by_status.items())) or "none"
        return (f"velvet: {calls:,} calls, {tokens:,} tokens; batches: {statuses}; {lines:,} batch lines; "
                f"cost {humanize.money(cost)}")

    # -- hooks -----------------------------------------------------------------------------------

    def _host(self, flow: http.HTTPFlow) -> str | None:
        """The host the client asked for, if it is one of ours (``host`` first: ``pretty_host`` parses
        the Host header, which costs more on every flow)."""
        req = flow.request
        host = req.host.lower()
        if host in self.hosts:
            return host
        pretty = req.pretty_host.lower()
        return pretty if pretty in self.hosts else None

    @guarded
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        host = self._host(flow)
        if host is None:
            return
        route = classify(flow.request.method, flow.request.path)
        self.snapshots[flow.id] = begin(flow, route, host)
        flow.metadata[META_KEY] = {"endpoint": route.kind, "action": route.action}
        if (route.kind, route.action) in (("files", "upload"), ("uploads", "part")):
            self._tap(flow, flow.request, "request")

    @guarded
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.id not in self.snapshots or flow.response is None:
            return
        if "text/event-stream" in flow.response.headers.get("content-type", ""):
            rec = StreamRecorder(time.time)
            self.recorders[flow.id] = rec
            flow.response.stream = rec
            return
        route = self.snapshots[flow.id].route
        if route.kind == "files" and route.action == "content" and route.object_id \
                and flow.response.status_code < 400:
            self._tap(flow, flow.response, "response")

    def _tap(self, flow: http.HTTPFlow, msg: http.Message, side: str) -> None:
        """Stream a big batch body through a :class:`BodyTap` (or one mitmproxy already streams)."""
        if self.writer is None:
            return
        length = msg.headers.get("content-length", "").strip()
        if msg.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
            big = True  # compressed: the decoded body may be a hundred times the wire size
        else:  # a download without a length may be any size
            big = int(length) > self.stream_threshold if length.isdigit() else side == "response"
        if callable(msg.stream) or not (big or msg.stream is True):  # True: mitmproxy's stream_large_bodies
            return
        tap = BodyTap(self.spool_dir() / "streams")
        msg.stream = tap
        req_tap, resp_tap = self.taps.get(flow.id, (None, None))
        self.taps[flow.id] = (tap, resp_tap) if side == "request" else (req_tap, tap)

    @guarded
    def response(self, flow: http.HTTPFlow) -> None:
        self._submit(flow)

    @guarded
    def error(self, flow: http.HTTPFlow) -> None:
        self._submit(flow)

    def _submit(self, flow: http.HTTPFlow) -> None:
        snap = self.snapshots.pop(flow.id, None)
        rec = self.recorders.pop(flow.id, None)
        taps = self.taps.pop(flow.id, (None, None))
        if snap is None:
            return
        for t in taps:
            if t is not None:
                t.close()  # (no end-of-body call comes when the flow failed)
        snap.request_tap, snap.response_tap = (
            None if t is None else TapInfo(t.path, t.bytes, t.finished, t.broken) for t in taps)
        if rec is not None:
            snap.stream_chunks = rec.chunks
            snap.stream_finished = rec.finished
        finish(snap, flow)
        if flow.response is None or flow.response.status_code >= 400:
            if not flow.marked:
                flow.marked = annotate.FAILED
        elif (mark := annotate.marker(snap.route, flow.response.status_code)) and not flow.marked:
            flow.marked = mark  # at once; the writer refines it (batch status) with the comment
        if self.comments:
            self.flows[flow.id] = flow
        if self.writer is None:  # only before running() or after done(): keep the row anyway
            self._start_writer()
        assert self.writer is not None
        self.writer.submit("call", snap)
