"""The mitmproxy addon, and velvet's assembly: options and hooks; it builds the writer (a thread or a child
process, with its processor) and the alert runner, decides which flows are ours, snapshots them
(:mod:`velvet_core.capture`) and hands the snapshots to the writer (:mod:`velvet_core.writer`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mitmproxy import command, contentviews, ctx, exceptions, http

from velvet_core import config
from velvet_core.cache.key import CACHEABLE_KINDS, parse_ttl, scope_value
from velvet_core.cache.lookup import BIG_BODY
from velvet_core.capture.contentview import BatchJsonlContentview
from velvet_core.capture.notes import FlowNotes
from velvet_core.capture.take import META_KEY, StreamRecorder, begin, finish
from velvet_core.capture.tap import BodyTap
from velvet_core.capture.usage import UsageStripper, ask_for_usage
from velvet_core.options import BY_NAME, OPTIONS, OptionError
from velvet_core.parsing.classify import classify
from velvet_core.private import unsafe_dir
from velvet_core.processing import markers
from velvet_core.processing.processor import Processor
from velvet_core.redact import redact
from velvet_core.storage.snapshot import CallSnapshot, TapInfo
from velvet_core.writer.child import ChildWriter

if TYPE_CHECKING:
    from velvet_core.alerts.rules import RuleSet
    from velvet_core.alerts.runner import AlertRunner
    from velvet_core.cache.lookup import Found, Lookup
    from velvet_core.evals.rules import EvalSet
    from velvet_core.jobs.worker import JobsProcess
    from velvet_core.storage.prune import Pruner, Retention
    from velvet_core.writer.writer import Writer

# The database side (peewee, psycopg, the store) is imported only where it runs: with a writer process, the
# proxy never needs it. Each full garbage collection pauses every flow in flight and walks the whole heap:
# those 17,000 objects made one take 49 ms instead of 35.

log = logging.getLogger("velvet")

# Warn once when this many flows went through, or this many seconds passed since the first one, and
# velvet captured none of them (the usual cause: a host missing from velvet_hosts, e.g. the target of
# reverse mode or an Azure resource).
UNCAPTURED_FLOWS = 5
UNCAPTURED_SECONDS = 30.0


def failed(hook: str, flow: http.HTTPFlow) -> None:
    """Log the exception being handled, with the flow's context; the flow goes on untouched."""
    log.exception("velvet: %s failed for %s %s (flow %s); the flow continues",
                  hook, flow.request.method, redact(flow.request.pretty_url), flow.id)


def guarded(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Log any exception of ours with the flow's context (:func:`failed`). The hooks every captured flow goes
    through catch their own instead: a wrapper is one more Python frame per hook, on the event loop, for every
    call."""

    @functools.wraps(hook)
    def wrapper(self: Velvet, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception:
            failed(hook.__name__, flow)

    return wrapper


def _encoding_and_project(fields: Any) -> tuple[str, str | None]:
    """The request's content-encoding (lower case, "" when none) and OpenAI-Project header (the cache's look-up,
    on the event loop for every call): one pass over the raw fields. (Joining the names to search them in C first
    took three times as long for the bench's 4 headers, 1.46 us against 0.46, and 2.0 against 1.3 for an SDK's 15:
    timed in one process, alternated, the best of 15; the Python steps it saved cost less than the C calls.)"""
    encoding, project = "", None
    for k, v in fields:
        name = k.lower()
        if name == b"content-encoding":
            encoding = v.decode("latin-1").strip().lower()
        elif name == b"openai-project":  # (several: joined, as headers.get does)
            value = v.decode("utf-8", "surrogateescape")
            project = value if project is None else f"{project}, {value}"
    return encoding, project


def _azure_knows_stream_options(api_version: str) -> bool:
    """Azure OpenAI deployments accept ``stream_options`` from api-version 2024-09-01(-preview) on; older ones
    refuse the request, so velvet leaves those alone (ISO dates compare as strings)."""
    return api_version[:10] >= "2024-09-01"


def settle_heap() -> None:
    """Move everything alive once the proxy has started (mitmproxy's and velvet's modules, classes, options; with
    the cache, peewee and the driver) out of the garbage collector's reach (:func:`gc.freeze`): they live as long
    as the process. A full collection otherwise walks them all while every flow in flight waits: some 35 ms each,
    a quarter of the collector's time, about 2.5 % of a proxy core under load (measured through mitmdump at the
    bench's load, 16,300 calls: 11 full collections, 0.34 s in plain mitmdump, 0.40 s with velvet; 0.05 s after the
    freeze). Called at ``running``: no flow is in flight yet; what start-up left as garbage is collected first, so
    none of it is frozen."""
    import gc

    gc.collect()
    gc.freeze()


def _last_value_wins(options: Any) -> list[str]:
    """Keep the last value of a velvet option given twice with ``--set`` (the names so treated).

    mitmproxy holds a script's ``--set`` values until the script declares its options, then refuses one given
    twice; the refusal is swallowed and the script never starts (velvet would capture nothing, silently).
    Called from ``load``, before mitmproxy reads them. ``velvet_hosts`` takes several values by design.
    """
    fixed = []
    deferred: Any = getattr(options, "deferred", None)
    for name, value in list(deferred.items() if isinstance(deferred, dict) else ()):
        values = getattr(value, "val", None)  # (mitmproxy's unconverted --set strings)
        if name.startswith("velvet_") and name != "velvet_hosts" and isinstance(values, list) and len(values) > 1:
            deferred[name] = type(value)(values[-1:])
            fixed.append(name)
    return fixed


# what the background process (velvet_evals, velvet_refresh) is started with: a change starts it again
JOBS_OPTIONS = {"velvet_db", "velvet_evals", "velvet_eval_interval", "velvet_eval_key_env", "velvet_prices",
                "velvet_refresh", "velvet_refresh_key_env", "velvet_refresh_download"}


class Velvet:
    """Capture OpenAI API traffic into SQLite or PostgreSQL."""

    def __init__(self) -> None:
        self.writer: Writer | ChildWriter | None = None
        self.processor = Processor()
        self.hosts: frozenset[str] = frozenset(config.DEFAULT_HOSTS)
        self.recorders: dict[str, StreamRecorder] = {}
        self.snapshots: dict[str, CallSnapshot] = {}
        self.notes = FlowNotes()
        self.stream_threshold = config.STREAM_THRESHOLD
        self.taps: dict[str, tuple[BodyTap | None, BodyTap | None]] = {}
        self.captured = 0  # flows captured since start (only compared with 0)
        self.passed: dict[str, int] = {}  # flows not captured, per host, until the warning (bounded)
        self.warned = False
        self.inject_usage = False
        self.injected: set[str] = set()  # flows whose request velvet asked for include_usage
        self.alert_rules: RuleSet | None = None
        self.alerts: AlertRunner | None = None
        self.alert_interval = 30.0
        self.eval_rules: EvalSet | None = None
        self.eval_interval = 60.0
        self.jobs: JobsProcess | None = None
        self.retention: Retention | None = None
        self.pruner: Pruner | None = None
        # the response cache (velvet_cache): its look-up (threads of its own, made at the first one)
        self.cache_mode = "header"
        self.cache_ttl = 7 * 86400.0
        self.cache_scope = "key"
        self.cache_bucket = 1
        self.lookup: Lookup | None = None
        # the request hook exists only with velvet_stream_usage=inject or the cache on: mitmproxy skips a hook
        # that is None, which saves every other flow a call
        self.request: Callable[[http.HTTPFlow], Any] | None = None

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
        for name in _last_value_wins(loader.master.options):
            log.warning("velvet: %s was given more than once; using the last value", name)
        for o in OPTIONS:
            loader.add_option(o.name, o.type, o.default, o.help, choices=o.choices)

    # what the addon keeps of each checked option: an attribute (of itself, or of its processor)
    _KEEP: ClassVar[dict[str, str]] = {
        "velvet_hosts": "hosts", "velvet_prices": "processor.pricer", "velvet_body_limit": "processor.body_limit",
        "velvet_stream_threshold": "stream_threshold", "velvet_alert_interval": "alert_interval",
        "velvet_alerts": "alert_rules", "velvet_stream_usage": "stream_usage", "velvet_retention": "retention",
        "velvet_evals": "eval_rules", "velvet_eval_interval": "eval_interval",
        "velvet_cache": "cache_mode", "velvet_cache_ttl": "cache_ttl", "velvet_cache_scope": "cache_scope",
        "velvet_cache_bucket": "cache_bucket"}

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        for name in sorted(updated & BY_NAME.keys()):
            o = BY_NAME[name]
            if o.parse is None:
                continue
            try:
                value = o.parse(getattr(opts, name), o)
            except OptionError as e:
                raise exceptions.OptionsError(f"{name}: {e}") from None
            if keep := self._KEEP.get(name):
                owner, _, attr = keep.rpartition(".")
                setattr(getattr(self, owner) if owner else self, attr, value)
        if "velvet_pg_partitions" in updated:  # read where a new database is made: the writer (its own process)
            if ctx.options.velvet_pg_partitions:
                os.environ["VELVET_PG_PARTITIONS"] = ctx.options.velvet_pg_partitions
            else:
                os.environ.pop("VELVET_PG_PARTITIONS", None)
        if updated & {"velvet_db", "velvet_spool_dir"}:
            for folder in (self.spool_dir(), self.spool_dir() / "journal"):
                if why := unsafe_dir(folder):  # someone else could have put a spool file or a journal there
                    raise exceptions.OptionsError(
                        f"velvet_spool_dir: {why}: velvet reads its spool and journal back from there, so "
                        "it must be yours alone (chmod 700, or choose another with --set velvet_spool_dir=DIR)")
        restart = {"velvet_db", "velvet_spool_dir", "velvet_journal", "velvet_writer"}
        if isinstance(self.writer, ChildWriter):  # its own processor: started with these
            restart |= {"velvet_prices", "velvet_body_limit"}
        if self.writer is not None and updated & restart:
            # the old writer finishes its queue in the background: never on the event loop
            old, self.writer = self.writer, None
            self._start_writer()
            threading.Thread(target=self._retire, args=(old,), name="velvet-writer-retire", daemon=True).start()
        if self.writer is not None and updated & {"velvet_db", "velvet_alerts", "velvet_alert_interval"}:
            self._stop_alerts()
            self._start_alerts()
        if self.writer is not None and updated & JOBS_OPTIONS:
            self._stop_jobs(wait=False)  # (the old process finishes its step in the background: not on the loop)
            self._start_jobs()
        if self.writer is not None and updated & {"velvet_db", "velvet_retention"}:
            self._stop_pruner()
            self._start_pruner()
        if (updated & {"velvet_db", "velvet_cache"} or (updated & restart and self.writer is not None)) \
                and self.lookup is not None:  # (a new writer process follows the index for a new look-up)
            self.lookup.close()
            self.lookup = None
        self._hook_request()

    @property
    def stream_usage(self) -> str:
        return "inject" if self.inject_usage else "off"

    @stream_usage.setter
    def stream_usage(self, value: str) -> None:
        self.inject_usage = value == "inject"

    def _hook_request(self) -> None:
        """The request hook exists only when it has work (mitmproxy skips a hook that is None)."""
        if self.cache_mode != "off":
            self.request = self._request
        else:
            self.request = self._ask_for_usage if self.inject_usage else None

    def running(self) -> None:
        self.notes.loop = ctx.master.event_loop
        # comments only where a flow list shows them (mitmweb, the console); mitmdump has none
        self.comments = ctx.master.addons.get("view") is not None
        if self.writer is None:
            self._start_writer()
        if self.alerts is None:
            self._start_alerts()
        if self.pruner is None:
            self._start_pruner()
        if self.jobs is None:
            self._start_jobs()
        if self.cache_mode == "on" and self.lookup is None:
            self._start_lookup()
        settle_heap()

    def _start_lookup(self) -> None:
        """With velvet_cache=on, the look-up is made at start, before any flow: the database modules its threads
        use (peewee, the driver, the models) are imported now, on this thread, and then frozen with the rest of the
        start-up heap (:func:`settle_heap`); the cache's misses cost 7 % of the proxy's throughput while every
        full collection walked them (bench, quick runs of 8 rounds: cache_on_miss_rps_ratio 0.922-0.931 in six
        runs without the freeze, 0.937-0.952 in four with it)."""
        from velvet_core.storage import database, sql  # noqa: F401  (what the look-up's threads use)

        self._make_lookup()

    def _make_lookup(self) -> Lookup:
        """The look-up; with a writer process, that process follows the index for it (storage/cache_index.py)."""
        from velvet_core.cache.lookup import Lookup

        w, loop = self.writer, self.notes.loop
        fed = isinstance(w, ChildWriter) and w.can_index and loop is not None
        self.lookup = Lookup(self.db_url(), follow=not fed)
        if fed:
            assert isinstance(w, ChildWriter) and loop is not None
            w.index(functools.partial(self.lookup.feed, loop=loop))
        return self.lookup

    def done(self) -> None:
        if self.lookup is not None:
            self.lookup.close()
            self.lookup = None
        self._stop_jobs()
        self._stop_pruner()
        self._stop_alerts()
        self._stop_writer()

    def db_url(self) -> str:
        return ctx.options.velvet_db or config.default_db_url()

    def spool_dir(self) -> Path:
        return Path(ctx.options.velvet_spool_dir or config.default_spool_dir(self.db_url())).expanduser()

    def _writer_mode(self) -> str:
        mode = ctx.options.velvet_writer
        if mode == "auto":  # a process needs the journal (its input) and a second core; comments need a thread
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            spare = (os.cpu_count() or 1) > cores or cores > 1
            return "process" if ctx.options.velvet_journal and not self.comments and spare else "thread"
        return "thread" if mode == "process" and not ctx.options.velvet_journal else mode

    def _start_writer(self) -> None:
        url = self.db_url()
        opts = ctx.options
        if not opts.velvet_spool_dir:
            self._warn_legacy_spool()
        if self._writer_mode() == "process":
            self.writer = ChildWriter(url, spool_dir=self.spool_dir(), prices=opts.velvet_prices,
                                        body_limit=opts.velvet_body_limit, flush_timeout=opts.velvet_flush_timeout)
        else:
            from velvet_core.writer.writer import Writer

            self.writer = Writer(url, self.processor.operations, spool_dir=self.spool_dir(),
                                 setup=self.processor.warm, journaled=opts.velvet_journal,
                                 pricer=lambda: self.processor.pricer)
        self.writer.start()
        log.info("velvet: logging %s into %s (%s)", ", ".join(sorted(self.hosts)), redact(url),
                 "writer process" if isinstance(self.writer, ChildWriter) else "writer thread")

    @staticmethod
    def _warn_legacy_spool() -> None:
        """Before each database had its own spool folder, every proxy used the one above them: what a proxy of
        that version left there (spooled rows, a journal) is named, never silently left behind."""
        base = config.default_spool_dir()
        left = [p.name for p in (base.iterdir() if base.is_dir() else ())
                if p.name.startswith("spool-") or (p.name == "journal" and any(p.iterdir()))]
        if left:
            log.warning("velvet: %s holds %s from an older velvet (spool folders are now per database, below it); "
                        "to write them, run once with --set velvet_spool_dir=%s", base, ", ".join(sorted(left)),
                        base)

    def _stop_writer(self) -> None:
        if self.writer is not None:
            w, self.writer = self.writer, None
            self._retire(w)

    @staticmethod
    def _retire(w: Writer | ChildWriter) -> None:
        if w.stop(ctx.options.velvet_flush_timeout):
            log.info("velvet: %d operations written to %s", w.written, redact(w.url))

    @command.command("velvet.status")
    def status(self) -> str:
        """The writer's health: last write, queue, pending, spooled and dead-lettered operations, last error."""
        if self.writer is None:
            return "velvet: not running"
        from velvet_core.writer.health import status_line

        return status_line(self.writer.status())

    def _start_alerts(self) -> None:
        """Rules are evaluated in their own thread with their own connections (never on the event loop)."""
        if self.alert_rules is not None and self.alerts is None:
            from velvet_core.alerts.runner import AlertRunner

            self.alerts = AlertRunner(self.db_url(), self.alert_rules, self.alert_interval)
            self.alerts.start()

    def _start_pruner(self) -> None:
        """velvet_retention: its own thread and connection, once an hour (and once at start)."""
        if self.retention is not None and self.pruner is None:
            from velvet_core.storage.database import open_db
            from velvet_core.storage.prune import Pruner

            url = self.db_url()
            self.pruner = Pruner(lambda: open_db(url), self.retention)
            self.pruner.start()

    def _start_jobs(self) -> None:
        """velvet_evals (checks and judges) and velvet_refresh (open batches kept current): a process of their own
        (:mod:`velvet_core.jobs.worker`), its API requests through this proxy."""
        opts = ctx.options
        if self.jobs is not None or (self.eval_rules is None and opts.velvet_refresh <= 0):
            return
        from velvet_core.jobs.worker import JobsProcess, route_args

        args = ["--interval", str(self.eval_interval), "--key-env", opts.velvet_eval_key_env,
                "--refresh", str(opts.velvet_refresh), "--refresh-key-env", opts.velvet_refresh_key_env,
                "--prices", opts.velvet_prices, *route_args(opts)]
        if self.eval_rules is not None:
            args += ["--rules", self.eval_rules.path]
        if opts.velvet_refresh_download:
            args.append("--refresh-download")
        self.jobs = JobsProcess(self.db_url(), args)
        self.jobs.start()

    def _stop_jobs(self, wait: bool = True) -> None:
        if self.jobs is not None:
            j, self.jobs = self.jobs, None
            if wait:
                j.stop()
            else:
                threading.Thread(target=j.stop, name="velvet-jobs-retire", daemon=True).start()

    def _stop_pruner(self) -> None:
        if self.pruner is not None:
            p, self.pruner = self.pruner, None
            p.stop()

    def _stop_alerts(self) -> None:
        if self.alerts is not None:
            a, self.alerts = self.alerts, None
            a.stop()

    @command.command("velvet.summary")
    def summary(self) -> str:
        """What velvet has captured: calls, tokens, cost and batches by status."""
        from velvet_core.query.summary import text as summary_text

        try:
            return summary_text(self.db_url())
        except Exception as e:
            raise exceptions.CommandError(f"velvet: {e}") from None

    # -- hooks -----------------------------------------------------------------------------------

    def _passed(self, flow: http.HTTPFlow) -> None:
        """Count a flow that is not ours, until velvet captures one or has warned."""
        host = flow.request.host.lower()
        if host in self.passed or len(self.passed) < 10:
            self.passed[host] = self.passed.get(host, 0) + 1
        if sum(self.passed.values()) >= UNCAPTURED_FLOWS:
            self._warn_uncaptured()
        elif sum(self.passed.values()) == 1:
            # (no running loop, e.g. in a unit test: the count still warns)
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(UNCAPTURED_SECONDS, self._warn_uncaptured)

    def _warn_uncaptured(self) -> None:
        if self.warned or self.captured or not self.passed:
            return
        self.warned = True
        seen = sorted(self.passed.items(), key=lambda x: (-x[1], x[0]))
        add = " ".join(f"--set velvet_hosts={h}" for h in [*sorted(self.hosts), seen[0][0]])
        n = sum(self.passed.values())
        log.warning(
            "velvet: %d %s went through the proxy and none was captured: velvet logs only the hosts "
            "in velvet_hosts (%s), and this proxy saw %s. To capture a host, list it with the others: %s "
            "(in reverse mode the host is the target of --mode reverse:URL).",
            n, "flow" if n == 1 else "flows", ", ".join(sorted(self.hosts)) or "none",
            ", ".join(f"{h} ({c})" for h, c in seen), add)
        self.passed.clear()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            req = flow.request
            # the host the client asked for, if it is one of ours (``host`` first: ``pretty_host`` parses the
            # Host header, which costs more on every flow)
            host = req.host.lower()
            if host not in self.hosts:
                host = req.pretty_host.lower()
                if host not in self.hosts:
                    if not (self.warned or self.captured):
                        self._passed(flow)
                    return
            self.captured += 1
            route = classify(req.method, req.path)
            self.snapshots[flow.id] = begin(flow, route, host)
            flow.metadata[META_KEY] = {"endpoint": route.kind, "action": route.action}
            if route.batch_body == "request":
                self._tap(flow, req, "request")
        except Exception:
            failed("requestheaders", flow)

    def _request(self, flow: http.HTTPFlow) -> Any:
        """The ``request`` hook with the cache on: a look-up (a coroutine mitmproxy awaits, so the loop serves
        other flows meanwhile) for a request the cache applies to; else what velvet_stream_usage asks."""
        snap = self.snapshots.get(flow.id)
        if snap is None:
            return None
        try:
            asked = snap.cache.get("header", "") if snap.cache else ""
            if ((self.cache_mode == "on" and asked != "off") or asked in ("on", "refresh")) \
                    and snap.route.action == "create" and snap.route.kind in CACHEABLE_KINDS:
                return self._look_up(flow, snap, asked == "refresh")
            if snap.cache is not None:
                snap.cache = None  # (the headers' values, taken by begin(): nothing for the writer)
        except Exception:
            failed("request", flow)
        if self.inject_usage:
            self._ask_for_usage(flow)
        return None

    def _look_up(self, flow: http.HTTPFlow, snap: CallSnapshot, refresh: bool) -> Any:
        """Decide on the event loop what it can (not cacheable, refresh, a key the index does not hold: a miss);
        a coroutine for the rest (a hit to read from the database, a big body to hash)."""
        req = flow.request
        asked, snap.cache = snap.cache, None
        body = req.raw_content
        encoding, project = _encoding_and_project(snap.request_fields or req.headers.fields)
        if body is None or len(body) > self.processor.body_limit or encoding not in ("", "identity"):
            return self._ask_for_usage(flow) if self.inject_usage else None
        lookup = self.lookup or self._make_lookup()
        ttl, seed = self.cache_ttl, ""
        if asked:  # (velvet-cache-* headers)
            seed = asked.get("seed", "")
            if "ttl" in asked:
                try:
                    ttl = parse_ttl(asked["ttl"])
                except ValueError:
                    log.info("velvet: velvet-cache-ttl %r is not a TTL; using velvet_cache_ttl", asked["ttl"])
        args = (snap.route.kind, body, scope_value(self.cache_scope, snap.key_fingerprint, project),
                snap.method, snap.host, snap.path, seed)
        if len(body) > BIG_BODY:
            return self._look_up_later(flow, snap, None, args, refresh, ttl)
        found = lookup.key_for(*args)
        if found.key is not None and not refresh and lookup.known(found.key):
            return self._look_up_later(flow, snap, found, args, refresh, ttl)
        self._cache_miss(flow, snap, found, ttl)
        return None

    def _cache_miss(self, flow: http.HTTPFlow, snap: CallSnapshot, found: Found, ttl: float) -> None:
        if found.key is not None:
            snap.cache = {"key": found.key, "ttl": ttl, "bucket": self.cache_bucket}
        if self.inject_usage:
            self._ask_for_usage(flow)

    async def _look_up_later(self, flow: http.HTTPFlow, snap: CallSnapshot, found: Found | None,
                             args: tuple[Any, ...], refresh: bool, ttl: float) -> None:
        lookup = self.lookup
        assert lookup is not None
        try:
            if found is None:  # (a big body: hashed off the loop)
                found = await lookup.key_off_loop(*args)
                if found.key is None or refresh or not lookup.known(found.key):
                    return self._cache_miss(flow, snap, found, ttl)
            got = await lookup.fetch(snap.route.kind, found, self.cache_bucket)
            if flow.id not in self.snapshots:  # (the client went away meanwhile)
                return None
            if (content := got.content) is not None:
                flow.response = http.Response.make(200, content, {
                    "content-type": got.content_type, "x-velvet-cache": "HIT", "age": str(got.age)})
                snap.cache = got.info
                if got.content_type.startswith("text/event-stream"):
                    snap.stream_chunks, snap.stream_finished = [(time.time(), content)], True
                return None
        except Exception:
            log.exception("velvet: cache look-up failed for %s %s (flow %s); the flow continues",
                          flow.request.method, redact(flow.request.pretty_url), flow.id)
            if found is None:
                return None
        return self._cache_miss(flow, snap, found, ttl)

    @guarded
    def _ask_for_usage(self, flow: http.HTTPFlow) -> None:
        """The ``request`` hook when velvet_stream_usage=inject: ask upstream for the usage of a stream."""
        snap = self.snapshots.get(flow.id)
        if snap is None or snap.route.action != "create" or snap.route.kind not in ("chat.completions",
                                                                                   "completions"):
            return
        if snap.route.deployment and not _azure_knows_stream_options(flow.request.query.get("api-version", "")):
            return
        original = ask_for_usage(flow.request)
        if original is not None:
            snap.client_body = original
            self.injected.add(flow.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            snap = self.snapshots.get(flow.id)
            if snap is None or flow.response is None:
                return
            cached = snap.cache
            if cached is not None and "hit" in cached:
                return  # answered from the cache: the whole body is there
            # one pass over the raw header fields (for every call, on the event loop: a headers.get costs more)
            stream = marked = False
            for k, v in flow.response.headers.fields:
                name = k.lower()
                if name == b"content-type":
                    stream = stream or v.find(b"text/event-stream") >= 0
                elif name == b"x-velvet-cache":
                    marked = True  # (another velvet upstream said)
            if cached is not None and "key" in cached:
                h = flow.response.headers
                if marked:
                    h["x-velvet-cache"] = "MISS"
                else:  # (appended to the raw fields: a third of the cost of setting a header)
                    h.fields = (*h.fields, (b"x-velvet-cache", b"MISS"))
            if stream:
                strip = None
                if flow.id in self.injected:
                    h = flow.response.headers
                    if h.get("content-encoding", "identity").strip().lower() in ("", "identity") \
                            and "content-length" not in h:
                        strip = UsageStripper()
                    else:
                        log.warning("velvet: cannot take the usage chunk out of the stream of %s (compressed or "
                                    "of fixed length): the client gets it too", redact(flow.request.path))
                rec = StreamRecorder(time.time, strip)
                self.recorders[flow.id] = rec
                flow.response.stream = rec
                return
            route = snap.route
            if route.batch_body == "response" and route.object_id and flow.response.status_code < 400:
                self._tap(flow, flow.response, "response")
        except Exception:
            failed("responseheaders", flow)

    def _tap(self, flow: http.HTTPFlow, msg: http.Message, side: str) -> None:
        """Stream a big batch body through a :class:`BodyTap` (or one mitmproxy already streams)."""
        if self.writer is None:
            return
        length = msg.headers.get("content-length", "").strip()
        size = int(length) if length.isdigit() else None
        if msg.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
            big = True  # compressed: the decoded body may be a hundred times the wire size
        else:  # a download without a length may be any size
            big = size > self.stream_threshold if size is not None else side == "response"
        if callable(msg.stream) or not (big or msg.stream is True):  # True: mitmproxy's stream_large_bodies
            return
        # A body that may still be small (compressed, or of unknown length) is also kept, up to the
        # threshold, and put back into the flow at the end so that mitmweb can show it; one known to
        # be bigger, or that mitmproxy was told to stream, is not.
        small = msg.stream is not True and (size is None or size <= self.stream_threshold)
        snap = self.snapshots[flow.id]
        tap = BodyTap(self.spool_dir() / "streams", {
            "flow_id": flow.id, "method": snap.method, "host": snap.host, "path": snap.path,
            "started_at": snap.started_at, "key_fingerprint": snap.key_fingerprint, "side": side},
            keep=self.stream_threshold if small else 0)
        msg.stream = tap
        req_tap, resp_tap = self.taps.get(flow.id, (None, None))
        self.taps[flow.id] = (tap, resp_tap) if side == "request" else (req_tap, tap)

    def response(self, flow: http.HTTPFlow) -> None:
        try:
            self._submit(flow)
        except Exception:
            failed("response", flow)

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            self._submit(flow)
        except Exception:
            failed("error", flow)

    def _submit(self, flow: http.HTTPFlow) -> None:
        snap = self.snapshots.pop(flow.id, None)
        if snap is None:
            return
        rec = self.recorders.pop(flow.id, None) if self.recorders else None
        taps = self.taps.pop(flow.id, None) if self.taps else None
        if self.injected:
            self.injected.discard(flow.id)
        if taps is not None:  # (a batch body streamed through velvet's tap: rare, and big)
            for t in taps:
                if t is not None:
                    t.close()  # (no end-of-body call comes when the flow failed)
            snap.request_tap, snap.response_tap = (
                None if t is None else TapInfo(t.path, t.bytes, t.finished, t.broken) for t in taps)
        if rec is not None:
            snap.stream_chunks = rec.chunks
            snap.stream_finished = rec.finished
        finish(snap, flow)
        if taps is not None:
            for t, msg in zip(taps, (flow.request, flow.response), strict=True):
                if t is not None and msg is not None and msg.raw_content is None \
                        and (kept := t.kept()) is not None:
                    msg.raw_content = kept  # viewable in mitmweb, as a buffered body would be
        if flow.response is None or flow.response.status_code >= 400:
            if not flow.marked:
                flow.marked = markers.FAILED
        elif (mark := markers.marker(snap.route, flow.response.status_code)) and not flow.marked:
            flow.marked = mark  # at once; the writer refines it (batch status) with the comment
        if self.processor.note is not None:  # (self.comments, without a property's call)
            self.notes.expect(flow)
        if self.writer is None:  # only before running() or after done(): keep the row anyway
            self._start_writer()
        assert self.writer is not None
        self.writer.submit(snap)
