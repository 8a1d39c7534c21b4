"""Evaluate a rule set and publish its state changes: the addon's thread, and one-shot checks.

:class:`Engine` evaluates every rule against a database and tracks states (starting from the last
ones recorded in ``alerts``, so a restart does not repeat a firing). :class:`AlertRunner` runs it every
``interval`` seconds in its own thread with its own connections, never on mitmproxy's event loop:
changes go to the log, to the notifier's thread and to the ``alerts`` table.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from datetime import datetime

from peewee import Database

from velvet_core import clock
from velvet_core.alerts.evaluate import Reading, evaluate, unreachable
from velvet_core.alerts.history import last_states, record
from velvet_core.alerts.notify import Notifier, payloads
from velvet_core.alerts.rules import RuleSet
from velvet_core.alerts.state import Change, Tracker
from velvet_core.storage.database import connect, open_readonly

log = logging.getLogger(__name__)

MAX_UNRECORDED = 1000


utcnow = clock.now


def proxy_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Engine:
    """Evaluates a rule set and keeps each rule's state between evaluations."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.tracker = Tracker()
        self.readings: dict[str, Reading | None] = {}
        self.restored = False
        self._failing: set[str] = set()  # rules whose evaluation failed (logged once)

    def restore(self, db: Database) -> None:
        """Take the last recorded state of each rule (once)."""
        if not self.restored:
            self.tracker.restore(last_states(db, [r.name for r in self.ruleset.rules]))
            self.restored = True

    def evaluate(self, db: Database, now: datetime) -> list[Change]:
        self.restore(db)
        changes: list[Change] = []
        for rule in self.ruleset.rules:
            reading: Reading | None
            try:
                reading = evaluate(db, rule, now)
                self._failing.discard(rule.name)
            except Exception as e:
                if rule.name not in self._failing:
                    log.warning("velvet: alert rule %r could not be evaluated: %s", rule.name, e)
                    self._failing.add(rule.name)
                reading = None
                with contextlib.suppress(Exception):
                    db.rollback()  # PostgreSQL: leave no failed transaction behind
            self.readings[rule.name] = reading
            changes += self.tracker.step(rule, reading, now)
        return changes

    def unreachable(self, who: str, since: datetime, now: datetime, error: str) -> list[Change]:
        """The database cannot be read: only ``velvet_stalled`` rules can say something (the others keep)."""
        changes: list[Change] = []
        for rule in self.ruleset.rules:
            if rule.kind == "velvet_stalled":
                reading = unreachable(rule, who, since, now, error)
                self.readings[rule.name] = reading
                changes += self.tracker.step(rule, reading, now)
        return changes


def announce(changes: list[Change], notifier: Notifier | None) -> list[dict]:
    """Log each message (warning when firing or warning) and hand it to the notifier."""
    messages = payloads(changes)
    for p in messages:
        log.log(logging.INFO if p["state"] == "resolved" else logging.WARNING, "%s", p["text"])
        if notifier is not None:
            notifier.send(p)
    return messages


class AlertRunner:
    """The addon's alert thread: evaluate every ``interval`` seconds, off the event loop."""

    def __init__(self, url: str, ruleset: RuleSet, interval: float, *, source: str | None = None) -> None:
        self.url = url
        self.engine = Engine(ruleset)
        self.interval = interval
        self.source = source or proxy_name()
        self.notifier = Notifier(ruleset.notify)
        self.evaluations = 0
        self._reader: Database | None = None
        self._writer: Database | None = None
        self._unrecorded: list[Change] = []
        self._down_since: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.notifier.start()
        self._thread = threading.Thread(target=self._run, name="velvet-alerts", daemon=True)
        self._thread.start()
        rules = self.engine.ruleset.rules
        log.info("velvet: %d alert rule%s from %s, evaluated every %gs", len(rules), "s" * (len(rules) != 1),
                 self.engine.ruleset.path, self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout + 15)  # an evaluation in progress ends first (SQLite busy_timeout)
            self._thread = None
        self.notifier.stop(timeout)
        self._close()

    def _run(self) -> None:
        delay = min(self.interval, 1.0)  # the first look soon after start, once the writer made the schema
        while not self._stop.wait(delay):
            delay = self.interval
            try:
                self.tick()
            except Exception:  # never let a bug end the thread
                log.exception("velvet: alert evaluation failed")

    def tick(self) -> None:
        now = utcnow()
        try:
            if self._reader is None:
                self._reader = open_readonly(self.url)
            changes = self.engine.evaluate(self._reader, now)
            if self._down_since is not None:
                log.info("velvet: alerts can read the database again")
            self._down_since = None
        except Exception as e:
            self._close_reader()
            if self._down_since is None:
                self._down_since = now
                log.warning("velvet: alerts cannot read the database: %s", e)
            changes = self.engine.unreachable(self.source, self._down_since, now, str(e))
        self.evaluations += 1
        announce(changes, self.notifier)
        self._record(changes)

    def _record(self, changes: list[Change]) -> None:
        self._unrecorded = (self._unrecorded + changes)[-MAX_UNRECORDED:]
        if not self._unrecorded:
            return
        try:
            if self._writer is None:
                self._writer = connect(self.url)
                self._writer.connect()
            record(self._writer, self._unrecorded, self.source)
            self._unrecorded = []
        except Exception as e:
            log.warning("velvet: cannot record %d alert changes yet (%s); retrying at the next evaluation",
                        len(self._unrecorded), e)
            if self._writer is not None:
                with contextlib.suppress(Exception):
                    self._writer.close()
                self._writer = None

    def _close_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                self._reader.close()
            self._reader = None

    def _close(self) -> None:
        self._close_reader()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
