"""The evaluator: scores new answers with each eval's check, and runs the judges (one call each, or gathered
into Batch API jobs), through the proxy when it runs in one. The proxy's eval process and ``velvet evals run``
use it.

Judge work is never lost and never sent twice: an answer chosen for a judge is a ``pending`` row; rows are
claimed for a submission (``sent``, with a token in ``judge_batch_id``) before anything is sent, the batch
carries the token in its metadata, and rows left with a token by a crash are matched to their batch through the
API (or made pending again when no batch has it). A judge that fails (429, 5xx, a line in the error file, a
batch that expired) leaves its rows pending ("delayed"), to be sent again: never counted as a fail.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from peewee import Database

from velvet_core import clock
from velvet_core.cost.prices import Pricer
from velvet_core.evals import checks, judge, store
from velvet_core.evals.answer import Answer
from velvet_core.evals.rules import Eval, EvalSet
from velvet_core.storage.sql import adapt, rows, ts

log = logging.getLogger("velvet")
TAKE = 5000  # answers read at a time
SUBMIT_AT = 10_000  # pending judge work that is submitted at once, without waiting for the interval
BATCH_MAX = 10_000  # lines in one judge batch
LIVE_PER_STEP = 20  # live judge calls per eval and step (the checks wait for a step to end)
CLAIMED = "submitting:%"  # (a LIKE pattern, as a parameter: psycopg reads a % in the query's text)
STALE_SUBMISSION = timedelta(minutes=10)  # a claim older than this was left by a process that stopped


@dataclass(frozen=True)
class Route:
    """How judges reach the API: through the proxy (``proxy`` and its CA) or straight to ``base_url``."""

    base_url: str | None = None
    proxy: str | None = None
    ca_file: str | None = None


@dataclass
class Counts:
    judged: int = 0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    pending: int = 0

    def add(self, status: str, passed: bool | None) -> None:
        if status == "pending":
            self.pending += 1
        elif status == "skipped":
            self.skipped += 1
        else:
            self.judged += 1
            if status == "error":
                self.errors += 1
            elif passed:
                self.passed += 1
            elif passed is not None:
                self.failed += 1


@dataclass
class Evaluator:
    db: Database
    evals: EvalSet
    pricer: Pricer = field(default_factory=Pricer)
    route: Route = field(default_factory=Route)
    key_env: str = "OPENAI_API_KEY"
    interval: float = 60.0
    now: Callable[[], datetime] = clock.now
    _clients: dict[str, Any] = field(default_factory=dict)
    _last_submit: dict[str, datetime] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)

    # -- answers -----------------------------------------------------------------------------------------

    def take(self, *, since: datetime | None = None, until: datetime | None = None, names: set[str] | None = None,
             limit: int = TAKE, progress: Callable[[int], None] | None = None) -> dict[str, Counts]:
        """Score the answers each eval has not seen. The proxy's process goes on from each eval's mark (an eval new
        to this database starts with the answers after it); a backfill (``since``) reads that window whole."""
        out: dict[str, Counts] = {}
        backfill = since is not None
        read = 0
        # evals with the same filters read their answers once (each answer is parsed once for all of them)
        groups: dict[tuple[Any, ...], list[Eval]] = {}
        for rule in self.evals.evals:
            if names is None or rule.name in names:
                out[rule.name] = Counts()
                for source in rule.sources:
                    groups.setdefault((source, rule.models, rule.endpoints, rule.keys, rule.tags), []).append(rule)
        for (source, *_), rules in groups.items():
            marks: dict[str, int] = {}
            for rule in rules:
                m = 0 if backfill else store.mark(self.db, rule, source)
                if m is None:  # first start with this eval: answers from now on (older ones: velvet evals run)
                    store.set_mark(self.db, rule, source, store.newest_id(self.db, source))
                else:
                    marks[rule.name] = m
            active = [r for r in rules if r.name in marks]
            if not active:
                continue
            after = min(marks.values())
            while True:
                got = store.answers(self.db, active[0], source, after, limit, since, until)
                if not got:
                    break
                stamp = ts(self.db, self.now())
                records = []
                for a in got:
                    if store.is_judge_traffic(a):
                        continue
                    point, ident = store.sample_point(a.subject), a.call_id or a.result_id or 0
                    for rule in active:
                        if point < rule.sample and ident > marks[rule.name]:
                            records.append(self._score(rule, a, out[rule.name], stamp))
                after = max(a.call_id or a.result_id or 0 for a in got)
                read += len(got)
                if progress is not None:
                    progress(read)
                with self.db.atomic():
                    store.insert(self.db, records)
                    if not backfill:
                        for rule in active:
                            store.set_mark(self.db, rule, source, after)
                            marks[rule.name] = after
                if len(got) < limit:
                    break
        return out

    def _score(self, rule: Eval, a: Answer, counts: Counts, stamp: Any) -> tuple[Any, ...]:
        if rule.check == "judge":
            if a.failed:
                o = checks.skipped("the call failed: no answer to judge")
            elif a.text is None:
                o = checks.skipped("the answer is not text")
            else:
                counts.add("pending", None)
                return store.pending_row(rule, a, stamp)
        else:
            o = checks.run(rule, a)
        counts.add(o.status, o.passed)
        return store.outcome_row(rule, a, o, stamp)

    # -- judges ------------------------------------------------------------------------------------------

    def judges(self) -> list[Eval]:
        return [e for e in self.evals.evals if e.check == "judge"]

    def client(self, rule: Eval) -> Any:
        """The judge's API client (tagged with the eval's name), or None without a key."""
        if rule.name in self._clients:
            return self._clients[rule.name]
        from velvet_core.api.client import Client

        key = os.environ.get(self.key_env)
        if not key:
            if rule.name not in self._warned:
                self._warned.add(rule.name)
                log.warning("velvet: eval %r: $%s is not set: its judge work waits (pending)", rule.name,
                            self.key_env)
            return None
        c = Client(key, base_url=self.route.base_url, max_retries=0, timeout=120.0, proxy=self.route.proxy,
                   ca_file=self.route.ca_file, tags={judge.TAG: rule.name})
        self._clients[rule.name] = c
        return c

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def judge_step(self, *, now: bool = False) -> None:
        """One round of every judge: live calls; for judges via batch, every ``interval`` seconds (or ``now``, or
        at once when 10,000 answers wait), open batches resumed and polled, and what waits submitted."""
        for rule in self.judges():
            c = self.client(rule)
            if c is None:
                continue
            try:
                if rule.via == "live":
                    self._live(rule, c)
                    continue
                last = self._last_submit.get(rule.name)
                due = now or last is None or self.now() - last >= timedelta(seconds=self.interval)
                if due or store.count_waiting(self.db, rule) >= SUBMIT_AT:
                    self._resume(rule, c)
                    self._poll(rule, c)
                    self._submit(rule, c)
                self._warned.discard(f"judge:{rule.name}")
            except Exception as e:  # an unreachable API: the work waits for the next round (said once)
                from velvet_core.redact import redact

                if f"judge:{rule.name}" not in self._warned:
                    self._warned.add(f"judge:{rule.name}")
                    log.warning("velvet: eval %r: judge: %s", rule.name, redact(str(e))[:300])

    def _budget(self, rule: Eval, todo: list[tuple[dict[str, Any], dict[str, Any], float | None]],
                batch: bool) -> list[tuple[dict[str, Any], dict[str, Any], float | None]]:
        """The work the day's budget allows; the rest is recorded as skipped."""
        if rule.max_usd_per_day is None:
            return todo
        now = self.now()
        spent = store.spent_today(self.db, rule, now)
        keep, over = [], []
        for item in todo:
            est = item[2]
            if est is None or spent + est > rule.max_usd_per_day:
                over.append(item)
            else:
                spent += est
                keep.append(item)
        for row, _, est in over:
            why = (f"over max_usd_per_day ({rule.max_usd_per_day:g} USD): not sent today" if est is not None else
                   f"no price is known for {rule.judge_model}: max_usd_per_day cannot be kept, not sent")
            store.update(self.db, row["id"], status="skipped", reason=why, judged_at=now)
        return keep

    def _work(self, rule: Eval, pending: list[dict[str, Any]], batch: bool
              ) -> list[tuple[dict[str, Any], dict[str, Any], float | None]]:
        """Each pending row's judge request and estimated cost (rows whose answer is gone are skipped)."""
        out = []
        for row in pending:
            a = store.answer_of(self.db, row)
            if a is None:
                store.update(self.db, row["id"], status="skipped", reason="the answer is no longer stored",
                             judged_at=self.now())
                continue
            body = judge.request(rule, a)
            out.append((row, body, judge.estimate(rule, body, self.pricer, batch=batch)))
        return self._budget(rule, out, batch)

    def _verdict(self, rule: Eval, row_id: int, body: Any, *, batch: bool, **more: Any) -> None:
        v = judge.read(rule, body, self.pricer, batch=batch)
        store.update(self.db, row_id, status="scored" if v.score is not None else "error", score=v.score,
                     passed=None if v.score is None else v.score >= rule.pass_at, reason=v.reason,
                     judged_at=self.now(), cost_usd=v.cost_usd, **more)

    def _delay(self, row_ids: list[int], why: str) -> None:
        if not row_ids:
            return
        marks = ", ".join("?" * len(row_ids))
        self.db.execute_sql(adapt(self.db, "UPDATE scores SET status = 'pending', judge_batch_id = NULL, "
                                           "judge_custom_id = NULL, cost_usd = NULL, judged_at = NULL, "
                                           f"attempts = attempts + 1, reason = ? WHERE id IN ({marks})"),
                            (f"delayed: {why}", *row_ids))

    def _live(self, rule: Eval, c: Any) -> None:
        from velvet_core.api.client import APIError

        for row, body, _ in self._work(rule, store.waiting(self.db, rule, "pending", LIVE_PER_STEP), False):
            try:
                reply = c.request("POST", "/v1/chat/completions", json=body)
            except APIError as e:
                self._delay([row["id"]], str(e)[:200])
                return
            if reply.status == 429 or reply.status >= 500:
                self._delay([row["id"]], f"the judge answered {reply.status}")
                return  # back off: the rest waits for the next round
            if reply.status >= 300:
                store.update(self.db, row["id"], status="error", reason=f"the judge answered {reply.status}: "
                             f"{str(reply.body)[:200]}", judged_at=self.now(), judge_call=reply.request_id)
                continue
            self._verdict(rule, row["id"], reply.body, batch=False, judge_call=reply.request_id)

    def _submit(self, rule: Eval, c: Any) -> None:
        self._last_submit[rule.name] = self.now()
        pending = store.waiting(self.db, rule, "pending", BATCH_MAX)
        if not pending:
            return
        token = uuid.uuid4().hex
        now = self.now()
        claimed = self._claim([r["id"] for r in pending], token, now)
        work = self._work(rule, [r for r in pending if r["id"] in claimed], True)
        if not work:
            return
        with tempfile.TemporaryFile() as f:
            for row, body, est in work:
                cid = f"score-{row['id']}"
                f.write(orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                      "body": body}) + b"\n")
                store.update(self.db, row["id"], judge_custom_id=cid, cost_usd=est)
            try:
                uploaded = c.upload(f, f"velvet-eval-{token}.jsonl")
            except Exception:
                self._delay([r["id"] for r, _, _ in work], "the judge's batch file could not be uploaded")
                raise
        created = c.create_batch(uploaded["id"], "/v1/chat/completions",
                                 {judge.TAG: rule.name[:500], judge.SUBMISSION: token})
        self._adopt(token, created["id"])
        log.info("velvet: eval %r: %d answers sent to the judge in batch %s", rule.name, len(work), created["id"])

    def _claim(self, ids: list[int], token: str, now: datetime) -> set[int]:
        """Take pending rows for a submission (another evaluator on the same database takes other rows)."""
        marks = ", ".join("?" * len(ids))
        self.db.execute_sql(adapt(self.db, "UPDATE scores SET status = 'sent', judge_batch_id = ?, judged_at = ? "
                                           f"WHERE status = 'pending' AND id IN ({marks})"),
                            (f"submitting:{token}", ts(self.db, now), *ids))
        return {r["id"] for r in rows(self.db, "SELECT id FROM scores WHERE judge_batch_id = ?",
                                      (f"submitting:{token}",))}

    def _adopt(self, token: str, batch_id: str) -> None:
        self.db.execute_sql(adapt(self.db, "UPDATE scores SET judge_batch_id = ? WHERE judge_batch_id = ?"),
                            (batch_id, f"submitting:{token}"))

    def _resume(self, rule: Eval, c: Any) -> None:
        """Claims a stopped process left: the batch its token names, found through the API, else pending again."""
        stale = ts(self.db, self.now() - STALE_SUBMISSION)
        left = rows(self.db, "SELECT DISTINCT judge_batch_id AS t FROM scores WHERE eval = ? AND status = 'sent' "
                             "AND judge_batch_id LIKE ? AND judged_at < ?", (rule.name, CLAIMED, stale))
        if not left:
            return
        found: dict[str, str] = {}
        page = c.ok("GET", "/batches?limit=100")
        for b in page.get("data") or []:
            meta = b.get("metadata") or {}
            if isinstance(meta, dict) and meta.get(judge.SUBMISSION):
                found[meta[judge.SUBMISSION]] = b["id"]
        for r in left:
            token = r["t"].removeprefix("submitting:")
            if token in found:
                self._adopt(token, found[token])
            else:
                ids = [x["id"] for x in rows(self.db, "SELECT id FROM scores WHERE judge_batch_id = ?", (r["t"],))]
                self._delay(ids, "its submission was cut off before the batch was made")

    def _poll(self, rule: Eval, c: Any) -> None:
        open_ = rows(self.db, "SELECT DISTINCT judge_batch_id AS b FROM scores WHERE eval = ? AND status = 'sent' "
                              "AND judge_batch_id NOT LIKE ?", (rule.name, CLAIMED))
        for r in open_:
            b = c.batch(r["b"])
            status = b.get("status")
            if status in ("failed", "expired", "cancelled"):
                ids = [x["id"] for x in rows(self.db, "SELECT id FROM scores WHERE judge_batch_id = ? AND "
                                                      "status = 'sent'", (r["b"],))]
                self._delay(ids, f"the judge's batch {r['b']} {status}")
            elif status == "completed":
                self._collect(rule, c, b)

    def _collect(self, rule: Eval, c: Any, b: dict[str, Any]) -> None:
        batch_id = b["id"]
        sent = {x["judge_custom_id"]: x["id"] for x in rows(
            self.db, "SELECT id, judge_custom_id FROM scores WHERE judge_batch_id = ? AND status = 'sent'",
            (batch_id,))}
        delayed: list[int] = []
        for file_id in (b.get("output_file_id"), b.get("error_file_id")):
            if not file_id:
                continue
            for line in _lines(c.download(file_id)):
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                row_id = sent.pop(obj.get("custom_id"), None) if isinstance(obj, dict) else None
                if row_id is None:
                    continue
                resp = obj.get("response") if isinstance(obj.get("response"), dict) else {}
                if resp.get("status_code") == 200:
                    self._verdict(rule, row_id, resp.get("body"), batch=True)
                else:
                    delayed.append(row_id)
        self._delay(delayed, f"the judge's line failed in batch {batch_id}")
        self._delay(list(sent.values()), f"no answer for it in the judge's batch {batch_id}")


def _lines(chunks: Any) -> Any:
    """Lines of a downloaded file, whatever its chunks (constant memory)."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *whole, rest = rest.split(b"\n")
        yield from (w for w in whole if w.strip())
    if rest.strip():
        yield rest
