"""``scripts/bench --scale``: query times on a big database, built through velvet's own store.

A database of ``--lines`` batch lines (10,000-line batches, each with its output file and a few failed
lines in an error file) and ``--calls`` live calls over the last 30 days is built with
:class:`~velvet_core.storage.store.Store` and the operations processing makes (``storage.ops``), on SQLite
and on PostgreSQL. Then each query the CLI answers is timed through the functions the CLI calls
(``query/queries.py``; the median of a few runs), plus one run of the real ``velvet`` command.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from velvet_core.query import queries
from velvet_core.storage import database, sql
from velvet_core.storage.database import open_db
from velvet_core.storage.ops import (
    BatchSeen,
    CallRow,
    FileSeen,
    InputDone,
    Op,
    OutputDone,
    RequestLines,
    ResultLines,
)
from velvet_core.storage.store import Store

ROOT = Path(__file__).resolve().parent.parent

VELVET = Path(sys.executable).with_name("velvet")
PER_BATCH = 10_000
DAYS = 30
MODELS = [("gpt-4o-mini", "gpt-4o-mini-2024-07-18", "chat.completions", "/v1/chat/completions", 0.15, 0.6),
          ("gpt-4o", "gpt-4o-2024-08-06", "chat.completions", "/v1/chat/completions", 2.5, 10.0),
          ("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14", "responses", "/v1/responses", 0.4, 1.6),
          ("text-embedding-3-small", "text-embedding-3-small", "embeddings", "/v1/embeddings", 0.02, 0.0)]
KEYS = ["3f9a1c2b4d5e", "a1b2c3d4e5f6", "0badc0ffee00", "77e1d2c3b4a5"]
USAGE = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}
RUNS = 5  # each query: the median of this many runs
# --bodies: none (metadata only), small (the default: about 100-300 bytes each), or real (a system prompt and a
# question of about 1.5 kB, an answer of about 800 bytes: what a chat app sends)
SYSTEM = ("You are a support assistant for an online shop. Answer in two or three sentences, politely, citing "
          "the order number when the customer gives one. Never promise refunds; point to the returns page "
          "instead. ") * 4
ANSWER = ("Thank you for reaching out. I have looked at your order and it shipped yesterday; the tracking link in "
          "your confirmation e-mail shows its progress. If it has not arrived by Friday, reply here and we will "
          "look into it with the carrier. ") * 3


def request_body(model: str, text: str, bodies: str) -> str | None:
    if bodies == "none":
        return None
    messages = [{"role": "user", "content": text}]
    if bodies == "real":
        messages.insert(0, {"role": "system", "content": SYSTEM})
    return dumps({"model": model, "max_tokens": 64, "messages": messages})


def answer_body(obj: dict[str, Any], bodies: str) -> str | None:
    if bodies == "none":
        return None
    if bodies == "real":
        obj = {**obj, "choices": [{**obj["choices"][0], "message": {"role": "assistant", "content": ANSWER}}]}
    return dumps(obj)


def dumps(v: Any) -> str:
    return orjson.dumps(v).decode()


# -- building --------------------------------------------------------------------------------------

def batch_ops(rng: random.Random, n: int, lines: int, created: datetime, bodies: str = "small"
              ) -> Iterator[list[Op]]:
    """The operations for one batch, in the order a client makes them: upload, create, polls, downloads."""
    bid, fin, fout, ferr = f"batch_{n:08d}", f"file-in{n:08d}", f"file-out{n:08d}", f"file-err{n:08d}"
    model, snapshot = ("gpt-4o-mini", "gpt-4o-mini-2024-07-18") if n % 3 else ("gpt-4o", "gpt-4o-2024-08-06")
    seen = created - timedelta(minutes=1)
    rows = [{"file_id": fin, "line_no": i, "custom_id": f"req-{i}", "method": "POST",
             "url": "/v1/chat/completions", "model": model, "problem": None,
             "body": request_body(model, f"Classify review {i} of batch {n}: the product arrived on time and "
                                         "works as described.", bodies)}
            for i in range(1, lines + 1)]
    yield [FileSeen({"id": fin, "purpose": "batch", "filename": f"reviews-{n}.jsonl", "bytes": lines * 200,
                     "created_at": seen, "status": "processed", "first_seen_at": seen, "updated_at": seen}),
           *(RequestLines(rows[i:i + 500]) for i in range(0, lines, 500)),
           FileSeen({"id": fin, "role": "input", "content_seen": True, "lines": lines, "bad_lines": 0,
                     "complete": True, "updated_at": seen}), InputDone(fin)]
    base = {"id": bid, "endpoint": "/v1/chat/completions", "model": snapshot, "completion_window": "24h",
            "input_file_id": fin, "created_at": created, "expires_at": created + timedelta(days=1),
            "metadata": orjson.dumps({"job": f"nightly-{n % 7}"}).decode(), "key_fingerprint": KEYS[n % len(KEYS)]}
    yield [BatchSeen({**base, "status": "validating"}, created, "create")]
    started = created + timedelta(minutes=rng.randint(1, 30))
    yield [BatchSeen({**base, "status": "in_progress", "in_progress_at": started, "request_total": lines,
                      "request_completed": 0, "request_failed": 0}, started, "retrieve")]
    done = started + timedelta(minutes=rng.randint(20, 600))
    failed = {i for i in range(1, lines + 1) if rng.random() < 0.02}
    inp, outp = 40 * (lines - len(failed)), 12 * (lines - len(failed))
    yield [BatchSeen({**base, "status": "completed", "in_progress_at": started, "finalizing_at": done,
                      "completed_at": done + timedelta(minutes=2), "output_file_id": fout, "error_file_id": ferr,
                      "request_total": lines, "request_completed": lines - len(failed),
                      "request_failed": len(failed), "input_tokens": inp, "output_tokens": outp,
                      "total_tokens": inp + outp, "usage_cost_usd": inp * 0.075e-6 + outp * 0.3e-6},
                     done + timedelta(minutes=3), "retrieve")]
    got = done + timedelta(minutes=5)
    ok, bad, no_ok, no_bad = [], [], 0, 0
    for i in range(1, lines + 1):
        row = {"custom_id": f"req-{i}", "result_id": f"batch_req_{n}_{i}", "request_id": f"req_{n:x}{i:x}",
               "seen_at": got, "problem": None}
        if i in failed:
            no_bad += 1
            message = "The model produced invalid content."
            bad.append({**row, "file_id": ferr, "line_no": no_bad, "status_code": 400, "failed": True,
                        "error_code": "invalid_request_error", "error_message": message,
                        "body": dumps({"error": {"message": message, "type": "invalid_request_error"}})})
        else:
            no_ok += 1
            ok.append({**row, "file_id": fout, "line_no": no_ok, "status_code": 200, "failed": False,
                       "model": snapshot, "input_tokens": 40, "output_tokens": 12, "total_tokens": 52,
                       "cost_usd": 40 * 0.075e-6 + 12 * 0.3e-6,
                       "body": answer_body({"id": f"chatcmpl-{n}-{i}", "object": "chat.completion",
                                            "model": snapshot, "choices": [{"index": 0, "finish_reason": "stop",
                                                                            "message": {"role": "assistant",
                                                                                        "content": "positive"}}],
                                            "usage": USAGE}, bodies)})
    for fid, res in ((fout, ok), (ferr, bad)):
        yield [*(ResultLines(res[i:i + 500]) for i in range(0, len(res), 500)),
               FileSeen({"id": fid, "role": "output" if fid == fout else "error", "content_seen": True,
                         "lines": len(res), "bad_lines": 0, "complete": True, "first_seen_at": got,
                         "updated_at": got}), OutputDone(fid)]


def call_rows(rng: random.Random, start: int, n: int, total: int, now: datetime, bodies: str = "small"
              ) -> list[dict[str, Any]]:
    """Calls ``start`` to ``start + n`` of ``total``, evenly over the last :data:`DAYS` days, in time order."""
    rows = []
    first, gap = now - timedelta(days=DAYS), DAYS * 86400 / max(total, 1)
    for i in range(start, start + n):
        asked, model, endpoint, path, pin, pout = MODELS[0 if i % 10 < 7 else (i % 10) - 6]
        started = first + timedelta(seconds=(i + rng.random()) * gap)
        stream = endpoint != "embeddings" and i % 5 == 0
        status = 429 if i % 97 == 0 else 500 if i % 331 == 0 else 200
        lat = rng.lognormvariate(6.3, 0.6) if endpoint != "embeddings" else rng.lognormvariate(4.5, 0.4)
        inp, outp = rng.randint(20, 2000), (rng.randint(5, 800) if endpoint != "embeddings" else 0)
        ok = status == 200
        rows.append({
            "flow_id": f"{i:08x}-{secrets.token_hex(12)}", "started_at": started,
            "request_end_at": started + timedelta(milliseconds=2),
            "first_byte_at": started + timedelta(milliseconds=lat / 3),
            "ended_at": started + timedelta(milliseconds=lat),
            "latency_ms": lat, "ttft_ms": lat / 3 if stream else None,
            "processing_ms": int(lat * 0.8), "method": "POST", "host": "api.openai.com", "path": path,
            "endpoint": endpoint, "action": "create", "model_requested": asked, "model": model if ok else None,
            "status_code": status, "stream": stream, "complete": True, "request_id": f"req_{i:012x}",
            "key_fingerprint": KEYS[i % len(KEYS)], "rl_limit_requests": 10000, "rl_remaining_requests": 9990,
            "input_tokens": inp if ok else None, "output_tokens": outp if ok else None,
            "total_tokens": inp + outp if ok else None,
            "cost_usd": (inp * pin + outp * pout) / 1e6 if ok else None,
            "error_type": None if ok else "rate_limit_error" if status == 429 else "server_error",
            "error_code": None if ok else "rate_limit_exceeded" if status == 429 else None,
            "finish_reason": "stop" if ok and endpoint != "embeddings" else None,
            "request_headers": '{"content-type":"application/json","user-agent":"OpenAI/Python 1.99.0"}',
            "response_headers": dumps({"content-type": "application/json",
                                       "openai-processing-ms": str(int(lat * 0.8))}),
            "request_bytes": 180, "response_bytes": 420,
            "request_body": request_body(asked, f"Question {i}", bodies),
            "response_body": answer_body({"id": f"chatcmpl-{i}", "object": "chat.completion", "model": model,
                                          "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                              "role": "assistant", "content": "An answer."}}]}, bodies)})
    return rows


def build(url: str, lines: int, calls: int, log: Callable[[str], None], bodies: str = "small") -> float:
    """Fill the (empty) database at ``url``; the seconds it took."""
    rng = random.Random(14)
    now = datetime.now(UTC).replace(tzinfo=None)
    db = open_db(url)
    store = Store(db)
    t0 = time.perf_counter()
    batches = max(1, lines // PER_BATCH)
    step = timedelta(seconds=DAYS * 86400 / batches)
    for n in range(batches):
        size = PER_BATCH if n < batches - 1 else lines - PER_BATCH * (batches - 1)
        for ops in batch_ops(rng, n, size, now - timedelta(days=DAYS) + n * step, bodies):
            store.apply(ops)
        if n % 50 == 49:
            log(f"scale: {(n + 1) * PER_BATCH:,} lines, {time.perf_counter() - t0:.0f} s")
    t1 = time.perf_counter()
    done = 0
    while done < calls:
        k = min(5000, calls - done)
        store.apply([CallRow(r) for r in call_rows(rng, done, k, calls, now, bodies)])
        done += k
        if done % 200_000 == 0:
            log(f"scale: {done:,} calls, {time.perf_counter() - t1:.0f} s")
    db.close()
    return time.perf_counter() - t0


# -- measuring -------------------------------------------------------------------------------------

def median_ms(fn: Callable[[], Any], runs: int = RUNS) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)


def export_rate(url: str, **kw: Any) -> float:
    """Rows per second of ``velvet export --format jsonl`` (the CLI's own loop), written to /dev/null."""
    from velvet_core.jsonout import default as _default

    db = database.open_readonly(url)
    try:
        t = time.perf_counter()
        total, rows = queries.export_rows(db, **kw)
        with open(os.devnull, "w") as out:
            for r in rows:
                out.write(orjson.dumps(r, default=_default).decode() + "\n")
        return total / (time.perf_counter() - t)
    finally:
        db.close()


def measure(url: str, lines: int) -> dict[str, Any]:
    db = database.open_readonly(url)
    out: dict[str, Any] = {}
    try:
        middle = f"batch_{max(1, lines // PER_BATCH) // 2:08d}"
        now = datetime.now(UTC).replace(tzinfo=None)
        checks = {
            "batches_ms": lambda: queries.batches(db),
            "batch_ms": lambda: queries.batch(db, middle),
            "lines_failed_ms": lambda: queries.lines(db, middle, failed=True),
            "calls_ms": lambda: queries.calls(db, limit=100),
            "stats_ms": lambda: queries.stats(db),
            "stats_day_ms": lambda: queries.stats(db, by="day"),
            "stats_endpoint_ms": lambda: queries.stats(db, by="endpoint"),
            "stats_key_ms": lambda: queries.stats(db, by="key"),
            "stats_since_7d_ms": lambda: queries.stats(db, since=now - timedelta(days=7, minutes=17)),
        }
        for key, fn in checks.items():
            fn()  # warm (the first run reads the pages from disk)
            out[key] = median_ms(fn)
        # exports: the calls of the last 3 days (a tenth); the lines of the newest tenth of the batches, 10 at most
        newest = queries.batches(db)[: min(10, max(1, lines // PER_BATCH // 10))]
        lines_since = sql.to_dt(newest[-1]["created_at"].replace("T", " ").rstrip("Z"))
    finally:
        db.close()
    rates = []
    for kw in ({"since": now - timedelta(days=3)}, {"lines_of_batches": True, "since": lines_since}):
        export_rate(url, **kw)  # warm, as the queries above
        rates.append(statistics.median(export_rate(url, **kw) for _ in range(3)))
    calls_rate, lines_rate = rates
    out["export_rows_per_s"] = round(min(calls_rate, lines_rate))
    out["export_calls_rows_per_s"], out["export_lines_rows_per_s"] = round(calls_rate), round(lines_rate)
    cli = {}
    for name, args in (("batches", ["batches"]), ("batch", ["batch", middle]),
                       ("lines_failed", ["lines", middle, "--failed"]), ("calls", ["calls"]), ("stats", ["stats"]),
                       ("stats_day", ["stats", "--by", "day"])):
        t = time.perf_counter()
        subprocess.run([str(VELVET), "--db", url, *args, "--json"], check=True, stdout=subprocess.DEVNULL)
        cli[name] = round((time.perf_counter() - t) * 1000, 1)
    out["velvet_cli_ms"] = cli  # one run of the real command each: Python start-up and imports included
    out["report_s"], out["report_rss_mb"] = report_run(url)
    return out


def report_run(url: str) -> tuple[float, float]:
    """``velvet report --since 30d`` (the whole database) end to end: seconds (the better of two runs, the first
    warms the page cache) and the process's peak RSS in MB."""
    best, rss = float("inf"), 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            t = time.perf_counter()
            proc = subprocess.Popen([str(VELVET), "--db", url, "report", "--since", "30d", "-o", f"{tmp}/r.html"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise RuntimeError(f"velvet report failed ({proc.returncode}) on {url}")
            best = min(best, time.perf_counter() - t)
            rss = max(rss, usage.ru_maxrss / 1024)  # (kB on Linux)
    return round(best, 2), round(rss, 1)


# -- retention under writes --------------------------------------------------------------------------

PRUNE_KEEP_DAYS = 7  # the phase keeps the last week: about three quarters of the database goes


def prune_under_writes(url: str, log: Callable[[str], None]) -> dict[str, Any]:
    """``velvet prune --rows-after 7d`` on the database built while a writer stores new calls into it (groups of
    100 through the store, as a proxy's writer does): the rows pruned per second, and the longest a write waited
    against its median before the prune started. Run last: it removes most of the database."""
    import threading

    from velvet_core.storage.prune import prune

    rng = random.Random(99)
    stop, pruning = threading.Event(), threading.Event()
    before: list[float] = []
    during: list[float] = []

    def writer() -> None:
        db = open_db(url)
        store, n = Store(db), 0
        try:
            while not stop.is_set():
                now = datetime.now(UTC).replace(tzinfo=None)
                rows = call_rows(rng, 0, 100, 100, now, "small")
                for r in rows:
                    r["flow_id"], r["started_at"] = f"live-{n}-{secrets.token_hex(6)}", now
                    n += 1
                t = time.perf_counter()
                store.apply([CallRow(r) for r in rows])
                (during if pruning.is_set() else before).append((time.perf_counter() - t) * 1000)
                time.sleep(0.05)
        finally:
            db.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(3)
    log(f"scale: pruning rows older than {PRUNE_KEEP_DAYS} days while a writer stores calls")
    db = open_db(url)
    try:
        pruning.set()
        done = prune(db, rows_before=datetime.now(UTC).replace(tzinfo=None) - timedelta(days=PRUNE_KEEP_DAYS))
    finally:
        db.close()
        stop.set()
        thread.join(60)
    rows_gone = done.calls_pruned + done.lines_pruned
    return {"prune_s": round(done.seconds, 1), "prune_calls_pruned": done.calls_pruned,
            "prune_lines_pruned": done.lines_pruned, "prune_batches_pruned": done.batches_pruned,
            "prune_rows_per_s": round(rows_gone / max(done.seconds, 1e-9)),
            "prune_longest_transaction_ms": round(done.longest_transaction_ms, 1),
            "prune_writes_during": len(during),
            "prune_writer_p50_ms_before": round(statistics.median(before), 1) if before else None,
            "prune_max_writer_delay_ms": round(max(during), 1) if during else None}


# -- PostgreSQL ------------------------------------------------------------------------------------

@contextlib.contextmanager
def postgres(given: str | None, log: Callable[[str], None]) -> Iterator[str]:
    """A base PostgreSQL URL: ``given``, else ``$VELVET_TEST_PG``, else a throwaway cluster for the run."""
    base = given or os.environ.get("VELVET_TEST_PG")
    if base:
        yield base
        return
    log("scale: starting a throwaway PostgreSQL (scripts/pg-throwaway)")
    script = str(ROOT / "scripts" / "pg-throwaway")
    r = subprocess.run([script, "start"], capture_output=True, text=True, check=True)
    url, pgdir = r.stdout.split()
    try:
        yield url
    finally:
        subprocess.run([str(ROOT / "scripts" / "pg-throwaway"), "stop", pgdir], check=False)


@contextlib.contextmanager
def pg_schema(base: str, keep: bool) -> Iterator[str]:
    """A new schema in the database at ``base`` (dropped after unless ``keep``), reached through search_path."""
    import psycopg

    schema = f"scale_{secrets.token_hex(4)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if urlsplit(base).query else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        if not keep:
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def run_scale(lines: int, calls: int, pg: str | None, keep: bool, log: Callable[[str], None],
              bodies: str = "small", backends: str = "both", partition: str | None = None,
              partitioned: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"scale_lines": lines, "scale_calls": calls, "scale_bodies": bodies}
    if backends in ("both", "sqlite"):
        out.update(_sqlite(lines, calls, keep, log, bodies))
    if backends in ("both", "pg"):
        out.update(_postgres(lines, calls, pg, keep, log, bodies, partition, partitioned))
    return out


def _sqlite(lines: int, calls: int, keep: bool, log: Callable[[str], None], bodies: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="velvet-scale-"))
    url = f"sqlite:///{tmp / 'velvet.db'}"
    log(f"scale: building {lines:,} batch lines and {calls:,} calls in SQLite ({tmp})")
    out["build_s"] = round(build(url, lines, calls, log, bodies), 1)
    out["db_mb"] = round((tmp / "velvet.db").stat().st_size / 1e6, 1)
    log("scale: timing the queries on SQLite")
    out.update(measure(url, lines))
    out.update(prune_under_writes(url, log))
    if keep:
        log(f"scale: kept {url}")
    else:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    return out


def _postgres(lines: int, calls: int, pg: str | None, keep: bool, log: Callable[[str], None], bodies: str,
              partition: str | None = None, partitioned: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with postgres(pg, log) as base, pg_schema(base, keep) as pg_url:
        if partitioned:  # made partitioned (velvet_pg_partitions), with the periods of the 30 days built
            from velvet_core import clock
            from velvet_core.storage import partitions

            os.environ[partitions.ENV] = partitioned
            db = open_db(pg_url)
            try:
                partitions.ensure(db, clock.now(), since=clock.now() - timedelta(days=DAYS + 1))
                out["partitions_pg"] = sum(len(partitions.periods(db, t)) for t in partitions.KEYS)
            finally:
                db.close()
                del os.environ[partitions.ENV]
            out["partitioned_pg"] = partitioned
        log(f"scale: building {lines:,} batch lines and {calls:,} calls in PostgreSQL")
        out["build_s_pg"] = round(build(pg_url, lines, calls, log, bodies), 1)
        import psycopg

        if partition:  # velvet migrate --partition PERIOD on the database built, timed
            from velvet_core import clock
            from velvet_core.storage import partitions

            log(f"scale: converting calls and batch lines to partitions by {partition} (migrate --partition)")
            t = time.perf_counter()
            db = open_db(pg_url)
            try:
                done = partitions.partition(db, partition, clock.now())
            finally:
                db.close()
            out["partition_s_pg"] = round(time.perf_counter() - t, 1)
            out["partitions_pg"] = done["partitions"]

        schema = pg_url.rsplit("%3D", 1)[1]
        with psycopg.connect(base, autocommit=True) as conn:  # planner statistics, as autovacuum makes in time
            tables = ["calls", "batches", "batch_requests", "batch_results", "files", "batch_counts",
                      "call_rollups", "batch_events"]
            tables += [r[0] for r in conn.execute(  # (a partitioned table's statistics are its partitions')
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON "
                "p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace WHERE p.relname IN ('calls', "
                "'batch_requests', 'batch_results') AND n.nspname = %s", (schema,)).fetchall()]
            for table in tables:
                conn.execute(f'VACUUM ANALYZE {schema}."{table}"')
            size = conn.execute("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
                                "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                                (schema,)).fetchone()
            out["db_mb_pg"] = round(int(size[0] or 0) / 1e6, 1) if size else None
        log("scale: timing the queries on PostgreSQL")
        out.update({f"{k}_pg": v for k, v in measure(pg_url, lines).items()})
        out.update({f"{k}_pg": v for k, v in prune_under_writes(pg_url, log).items()})
        if keep:
            log(f"scale: kept {pg_url}")
    return out
