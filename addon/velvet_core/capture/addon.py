"""The mitmproxy addon: decide which flows are ours, snapshot them, hand them to the writer."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mitmproxy import command, contentviews, ctx, exceptions, http

from velvet_core import config
from velvet_core.alerts.rules import RulesError, RuleSet, load_rules
from velvet_core.alerts.runner import AlertRunner
from velvet_core.capture import markers
from velvet_core.capture.contentview import BatchJsonlContentview
from velvet_core.capture.notes import FlowNotes
from velvet_core.capture.snapshot import META_KEY, CallSnapshot, StreamRecorder, TapInfo, begin, finish
from velvet_core.capture.tap import BodyTap, remove_stale_spills
from velvet_core.parsing.classify import classify
from velvet_core.parsing.pricing import PriceFileError, Pricer, load_price_file
from velvet_core.process.processor import Processor
from velvet_core.query.summary import text as summary_text
from velvet_core.storage.database import DatabaseURLError, check_url
from velvet_core.writer.writer import Writer, _redact

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


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v < float("inf"):
        raise exceptions.OptionsError(f"velvet_alert_interval must be a number of seconds > 0, got {text!r}")
    return v


class Velvet:
    """Capture OpenAI API traffic into SQLite or PostgreSQL."""

    def __init__(self) -> None:
        self.writer: Writer | None = None
        self.processor = Processor()
        self.hosts: frozenset[str] = frozenset(config.DEFAULT_HOSTS)
        self.recorders: dict[str, StreamRecorder] = {}
        self.snapshots: dict[str, CallSnapshot] = {}
        self.notes = FlowNotes()
        self.stream_threshold = 4 * 1024 * 1024
        self.taps: dict[str, tuple[BodyTap | None, BodyTap | None]] = {}
        self.alert_rules: RuleSet | None = None
        self.alerts: AlertRunner | None = None
        self.alert_interval = 30.0

    @property
    def comments(self) -> bool:
        """Whether flows get comments: only where a flow list shows them (mitmweb, the console)."""
        return self.processor.note is not None

    @comments.setter
    def comments(self, on: bool) -> None:
        self.processor.note = self.notes.add if on else None

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
        loader.add_option("velvet_alerts", str, "",
                          "A TOML file of alert rules (error rate, latency, spend, batches, velvet's own "
                          "health) evaluated in the background, with a webhook or command to notify.")
        # a str holding a number: mitmproxy's --set cannot parse float options
        loader.add_option("velvet_alert_interval", str, "30",
                          "Seconds between two evaluations of the alert rules (decimals allowed).")

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
                self.processor.pricer = Pricer(load_price_file(opts.velvet_prices) if opts.velvet_prices else None)
            except PriceFileError as e:
                raise exceptions.OptionsError(f"velvet_prices: {e}") from None
        if "velvet_body_limit" in updated:
            if opts.velvet_body_limit < 0:
                raise exceptions.OptionsError("velvet_body_limit must be >= 0")
            self.processor.body_limit = opts.velvet_body_limit
        if "velvet_stream_threshold" in updated:
            if opts.velvet_stream_threshold < 0:
                raise exceptions.OptionsError("velvet_stream_threshold must be >= 0")
            self.stream_threshold = opts.velvet_stream_threshold
        if "velvet_alert_interval" in updated:
            self.alert_interval = _seconds(opts.velvet_alert_interval)
        if "velvet_alerts" in updated:
            try:
                self.alert_rules = load_rules(opts.velvet_alerts) if opts.velvet_alerts else None
            except RulesError as e:
                raise exceptions.OptionsError(f"velvet_alerts: {e}") from None
        if self.writer is not None and updated & {"velvet_db", "velvet_spool_dir"}:
            self._stop_writer()
            self._start_writer()
        if self.writer is not None and updated & {"velvet_db", "velvet_alerts", "velvet_alert_interval"}:
            self._stop_alerts()
            self._start_alerts()

    def running(self) -> None:
        self.notes.loop = ctx.master.event_loop
        # comments only where a flow list shows them (mitmweb, the console); mitmdump has none
        self.comments = ctx.master.addons.get("view") is not None
        if self.writer is None:
            self._start_writer()
        if self.alerts is None:
            self._start_alerts()

    def done(self) -> None:
        self._stop_alerts()
        self._stop_writer()

    def db_url(self) -> str:
        return ctx.options.velvet_db or config.default_db_url()

    def spool_dir(self) -> Path:
        return Path(ctx.options.velvet_spool_dir or config.default_spool_dir()).expanduser()

    def _start_writer(self) -> None:
        url = self.db_url()
        spool = self.spool_dir()
        remove_stale_spills(spool / "streams")
        self.writer = Writer(url, self.processor.process, spool_dir=spool, setup=self.processor.warm)
        self.writer.start()
        log.info("velvet: logging %s into %s", ", ".join(sorted(self.hosts)), _redact(url))

    def _stop_writer(self) -> None:
        if self.writer is None:
            return
        w, self.writer = self.writer, None
        if w.stop(ctx.options.velvet_flush_timeout):
            log.info("velvet: %d operations written", w.written)

    def _start_alerts(self) -> None:
        """Rules are evaluated in their own thread with their own connections (never on the event loop)."""
        if self.alert_rules is not None and self.alerts is None:
            self.alerts = AlertRunner(self.db_url(), self.alert_rules, self.alert_interval)
            self.alerts.start()

    def _stop_alerts(self) -> None:
        if self.alerts is not None:
            a, self.alerts = self.alerts, None
            a.stop()

    @command.command("velvet.summary")
    def summary(self) -> str:
        """What velvet has captured: calls, tokens, cost and batches by status."""
        try:
            return summary_text(self.db_url())
        except Exception as e:
            raise exceptions.CommandError(f"velvet: {e}") from None

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
        if route.batch_body == "request":
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
        if route.batch_body == "response" and route.object_id and flow.response.status_code < 400:
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
                flow.marked = markers.FAILED
        elif (mark := markers.marker(snap.route, flow.response.status_code)) and not flow.marked:
            flow.marked = mark  # at once; the writer refines it (batch status) with the comment
        if self.comments:
            self.notes.expect(flow)
        if self.writer is None:  # only before running() or after done(): keep the row anyway
            self._start_writer()
        assert self.writer is not None
        self.writer.submit(snap)
