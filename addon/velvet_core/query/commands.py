"""What the reading commands do: batches, batch, lines, show, calls, stats, status, backup, sql and rebuild
(their arguments are declared in :mod:`velvet_core.query.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from velvet_core import config, jsonout
from velvet_core.humanize import count, duration, money, ms, pairs, printable, size, table, when, without_images
from velvet_core.query import queries, rebuild
from velvet_core.query.backup import cmd_backup
from velvet_core.query.status import database_files
from velvet_core.query.status import status as status_of
from velvet_core.storage import readonly

if TYPE_CHECKING:
    from peewee import Database

# -- commands --------------------------------------------------------------------------------------

def cmd_batches(db: Database, a: argparse.Namespace) -> None:
    rows = queries.batches(db, status=a.status, since=a.since)
    if a.json:
        return jsonout.dump(rows)
    table(["ID", "STATUS", "ENDPOINT", "MODEL", "CREATED", "LINES", "ANSWERED", "FAILED", "TURNAROUND", "COST"],
          [[b["id"], b["status"], b["endpoint"] or "-", b["model"] or "-", when(b["created_at"]),
            count(b["lines"]),
            count(b["answered"]), count(b["failed"]), duration(b["turnaround_seconds"]), money(b["cost_usd"])]
           for b in rows], right=(5, 6, 7, 8, 9), whole=(0, 4))
    if not rows:
        print("(no batches)")


def cmd_batch(db: Database, a: argparse.Namespace) -> None:
    from velvet_core.storage.scores import for_batch

    b = queries.batch(db, a.batch_id)
    b["evals"] = for_batch(db, b["id"])
    if a.json:
        return jsonout.dump(b)
    rc = b["request_counts"]
    d = b["durations"]
    pairs([("batch", b["id"]), ("status", b["status"]), ("endpoint", b["endpoint"]), ("model", b["model"]),
           ("created", when(b["created_at"])), ("input file", b["input_file_id"]),
           ("output file", b["output_file_id"]), ("error file", b["error_file_id"]),
           ("API counts", f"{count(rc['completed'])} completed, {count(rc['failed'])} failed "
                          f"of {count(rc['total'])}" if rc["total"] is not None else None),
           ("logged lines", f"{count(b['lines'])} ({count(b['answered'])} answered, {count(b['failed'])} failed)"),
           ("queued", duration(d["queue_seconds"])), ("processing", duration(d["processing_seconds"])),
           ("finalizing", duration(d["finalize_seconds"])), ("turnaround", duration(d["turnaround_seconds"])),
           ("cost", money(b["cost_usd"])), ("metadata", orjson.dumps(b["metadata"]).decode()
                                              if b["metadata"] else None), ("problem", b["problem"])])
    print("\nStatus history")
    table(["STATUS", "OBSERVED", "API TIME", "SEEN BY"],
          [[e["status"], when(e["observed_at"]), when(e["api_at"]), e["source"]] for e in b["events"]],
          whole=(1, 2))
    if b["errors"]:
        print("\nErrors")
        table(["SOURCE", "CODE", "COUNT", "EXAMPLE"],
              [[e["source"], e["code"] or "-", count(e["count"]), _example(e["example"])] for e in b["errors"]],
              right=(2,))
    if b["cost_by_model"]:
        print("\nCost by model")
        table(["MODEL", "LINES", "INPUT TOK", "OUTPUT TOK", "COST"],
              [[m["model"] or "-", count(m["lines"]), count(m["input_tokens"]), count(m["output_tokens"]),
                money(m["cost_usd"])] for m in b["cost_by_model"]], right=(1, 2, 3, 4))
    if b["evals"]:
        print("\nEvals (its lines)")
        table(["EVAL", "PASSED", "FAILED", "PENDING", "SKIPPED", "PASS RATE"],
              [[printable(e["name"]), count(e["passed"]), count(e["failed"]), count(e["pending"]),
                count(e["skipped"]), "-" if e["pass_rate"] is None else f"{e['pass_rate'] * 100:.1f}%"]
               for e in b["evals"]], right=(1, 2, 3, 4, 5))


def _example(ex: dict[str, Any]) -> str:
    where = f"line {ex['line']}" if ex.get("line") is not None else ""
    if ex.get("custom_id"):
        where = f"{where} {ex['custom_id']}".strip()
    msg = (ex.get("message") or "").replace("\n", " ")
    msg = msg if len(msg) <= 70 else msg[:67] + "..."
    return f"{where}: {msg}" if where else msg


def cmd_lines(db: Database, a: argparse.Namespace) -> None:
    rows = queries.lines(db, a.batch_id, failed=a.failed, custom_id=a.custom_id)
    if a.json:
        return jsonout.dump(rows)
    table(["LINE", "CUSTOM_ID", "STATUS", "ERROR", "MODEL", "IN", "OUT", "COST"],
          [[count(r["line"]), r["custom_id"] or "-", r["status_code"] or "-",
            r["error_code"] or (r["problem"] or "")[:40] or "-", r["model"] or "-", count(r["input_tokens"]),
            count(r["output_tokens"]), money(r["cost_usd"])] for r in rows], right=(0, 5, 6, 7), whole=(1,))
    if not rows:
        print("(no lines)")


def cmd_show(db: Database, a: argparse.Namespace) -> None:
    from velvet_core.storage.scores import for_answer

    if a.custom_id is not None:
        r = queries.batch_line(db, a.ref, a.custom_id)
        head = [("batch", r["batch_id"]), ("custom_id", r["custom_id"]), ("line", r["line"]), ("url", r["url"]),
                ("model", r["model"]), ("status", r["status_code"]), ("error", r["error_message"]),
                ("tokens", f"{count(r['input_tokens'])} in, {count(r['output_tokens'])} out"),
                ("cost", money(r["cost_usd"])), ("request id", r["request_id"]), ("problem", r["problem"])]
    else:
        r = queries.call(db, a.ref)
        head = [("call", r["id"]), ("request id", r["request_id"]), ("started", when(r["started_at"])),
                ("request", f"{r['method']} {r['url']}"), ("model", r["model"]), ("status", r["status_code"]),
                ("latency", ms(r["latency_ms"])), ("ttft", ms(r["ttft_ms"]) if r["stream"] else None),
                ("tokens", f"{count(r['input_tokens'])} in, {count(r['output_tokens'])} out"
                           + (" (estimated: the stream carried no usage)" if r["usage_estimated"] else "")),
                ("cost", money(r["cost_usd"])), ("error", r["error_message"]), ("problem", r["problem"])]
    if r["pruned_at"]:
        head.append(("bodies", f"pruned {when(r['pruned_at'])} (velvet prune / velvet_retention)"))
    r["scores"] = (for_answer(db, batch_id=r["batch_id"], custom_id=r["custom_id"]) if a.custom_id is not None
                   else for_answer(db, call_id=r["id"]))
    if a.json:
        return jsonout.dump(r)
    pairs(head)
    if r["scores"]:
        print("\n--- scores ---")
        table(["EVAL", "CHECK", "STATUS", "SCORE", "REASON"],
              [[printable(s["eval"]), s["check"], s["status"] if s["passed"] is None else
                ("passed" if s["passed"] else "failed"), "-" if s["score"] is None else f"{s['score']:g}",
                printable(s["reason"] or "")] for s in r["scores"]])
    print("\n--- request ---")
    print(printable(jsonout.pretty(without_images(r["request"])), multiline=True))
    print("\n--- response ---")
    if a.custom_id is None and r["stream"] and r["response_text"] is not None:
        print(printable(r["response_text"], multiline=True))
        print("\n(streamed; reassembled from the SSE events)")
    else:
        print(printable(jsonout.pretty(without_images(r["response"])), multiline=True))


def cmd_calls(db: Database, a: argparse.Namespace) -> None:
    rows = queries.calls(db, model=a.model, status=a.status, since=a.since, endpoint=a.endpoint,
                         limit=a.limit or None)
    if a.json:
        return jsonout.dump(rows)
    table(["ID", "STARTED", "ENDPOINT", "MODEL", "STATUS", "LATENCY", "TTFT", "IN", "OUT", "COST"],
          [[c["id"], when(c["started_at"]), c["endpoint"], c["model"] or "-",
            c["status_code"] or ("cut" if not c["complete"] else "-"), ms(c["latency_ms"]), ms(c["ttft_ms"]),
            _est(c, count(c["input_tokens"])), _est(c, count(c["output_tokens"])), _est(c, money(c["cost_usd"]))]
           for c in rows],
          right=(0, 5, 6, 7, 8, 9), whole=(1,))
    if not rows:
        print("(no calls)")
    elif any(c["usage_estimated"] for c in rows):
        print("~ estimated: the stream carried no usage, velvet counted the tokens")


def _est(c: dict[str, Any], text: str) -> str:
    """``~`` marks a figure velvet estimated (a stream without usage)."""
    return f"~{text}" if c["usage_estimated"] and text != "-" else text


def cmd_stats(db: Database, a: argparse.Namespace) -> None:
    s = queries.stats(db, by=a.by, since=a.since)
    if a.json:
        return jsonout.dump(s)
    by = a.by.upper()
    print("Live calls")
    table([by, "CALLS", "ERRORS", "IN TOK", "OUT TOK", "COST", "ESTIMATED", "P50", "P95", "TTFT P50"],
          [[g[a.by], count(g["calls"]), f"{g['error_rate'] * 100:.1f}%", count(g["input_tokens"]),
            count(g["output_tokens"]), money(g["cost_usd"]),
            count(g["estimated_calls"]) if g["estimated_calls"] else "-", ms(g["latency_p50_ms"]),
            ms(g["latency_p95_ms"]), ms(g["ttft_p50_ms"])] for g in s["calls"]],
          right=tuple(range(1, 10)))
    t = s["totals"]
    if t.get("cache_hits"):
        print(f"{count(t['cache_hits'])} calls answered by velvet's cache, saving {money(t['saved_usd'])}")
    if t["estimated_calls"]:
        print(f"{count(t['estimated_calls'])} of {count(t['calls'])} calls have estimated tokens and cost: "
              "streams without usage, counted by velvet (see velvet_stream_usage)")
    print("\nBatches")
    table([by, "BATCHES", "LINES", "FAILED", "IN TOK", "OUT TOK", "COST", "TURNAROUND P50", "P95"],
          [[g[a.by], count(g["batches"]), count(g["lines"]), count(g["failed_lines"]), count(g["input_tokens"]),
            count(g["output_tokens"]), money(g["cost_usd"]), duration(g["turnaround_p50_seconds"]),
            duration(g["turnaround_p95_seconds"])] for g in s["batches"]], right=tuple(range(1, 9)))


def cmd_sql(db: Database, a: argparse.Namespace) -> None:
    with readonly.statement(db, a.query, timeout=a.timeout, allow_powerful_role=a.allow_powerful_role) as cur:
        cols = [d[0] for d in cur.description or ()]
        rows = [tuple(r) for r in cur.fetchall()] if cols else []
    if a.json:
        return jsonout.dump([dict(zip(cols, r, strict=True)) for r in rows])
    table(cols, [[jsonout.default(v) if v is not None and not isinstance(v, int | float | str) else v for v in r]
                 for r in rows])


def _backup(url: str, a: argparse.Namespace) -> int:
    return cmd_backup(url, a.file, a.json)


def cmd_prune(db: Database, a: argparse.Namespace) -> None:
    from velvet_core.storage.prune import prune

    if a.bodies_after is None and a.rows_after is None:
        raise ValueError("say what to prune: --bodies-after WHEN and/or --rows-after WHEN (e.g. 30d)")
    done = prune(db, bodies_before=a.bodies_after, rows_before=a.rows_after, dry_run=a.dry_run).as_dict()
    if a.json:
        return jsonout.dump(done)
    pairs([("calls removed", count(done["calls_pruned"])),
           ("call bodies removed", count(done["call_bodies_pruned"])),
           ("batches pruned", count(done["batches_pruned"])), ("batch lines removed", count(done["lines_pruned"])),
           ("body bytes freed", count(done["bytes_freed"])), ("seconds", done["seconds"])])
    if a.dry_run:
        print("(dry run: nothing changed)")


def cmd_rebuild(db: Database, a: argparse.Namespace) -> None:
    r = rebuild.rebuild(db)
    if a.json:
        return jsonout.dump(r)
    print(f"rebuilt the counters of {r['batches']:,} batches and {r['rollup_rows']:,} rollup rows "
          f"from {r['calls']:,} calls in {r['seconds']} s")


def cmd_status(db: Database | None, a: argparse.Namespace, db_error: str | None = None) -> int:
    """Also called without a database (``db_error`` says why): status must speak when the database does not."""
    url = a.db or config.default_db_url()
    spool = Path(a.spool_dir).expanduser() if a.spool_dir else config.default_spool_dir(url)
    s = status_of(db, spool, db_error, database_files(url))
    if a.json:
        jsonout.dump(s)
    else:
        table(["PROXY", "RUNNING", "LAST WRITE", "FAILING SINCE", "QUEUE", "PENDING", "SPOOLED", "DEAD", "WRITTEN",
               "LAST ERROR"],
              [[p["proxy"], "yes" if p["running"] else "no", when(p["last_write_at"]), when(p["failing_since"]),
                count(p["queue_depth"] or 0), count(p["pending"] or 0), count(p["spooled"] or 0),
                count(p["dead_lettered"] or 0), count(p["written"] or 0), (p["last_error"] or "")[:60]]
               for p in s["proxies"]], right=(4, 5, 6, 7, 8))
        if not s["proxies"]:
            print("(no proxy has written to this database yet)")
        if db_error:
            print(f"database: {printable(db_error)}")
        if d := s["database"]:
            last = d["retention_last_run"]
            print(f"database: {size(d['size_bytes'])}, oldest call {when(d['oldest_call_at'])}, oldest batch "
                  f"{when(d['oldest_batch_at'])}; retention: {printable(d['retention'] or 'off')}"
                  + (f" (last run {when(last.get('at'))})" if isinstance(last, dict) else ""))
            if isinstance(r := d.get("refresh"), dict):
                print(f"batch refresh ({printable(str(r.get('proxy')))}): " + (
                    f"on, every {r.get('interval')} s" + (", downloading output" if r.get("download") else "")
                    + (f"; last round {when(r.get('at'))}: {r.get('retrieved', 0)} of {r.get('open_batches', 0)} "
                       "open batches retrieved" if r.get("at") and "retrieved" in r else "")
                    + (f"; last error: {printable(str(r['error']))}" if r.get("error") else "")
                    if r.get("state") == "on" else f"off ({printable(str(r.get('why')))})"))
        print(f"spool: {printable(s['spool_dir'])}: {len(s['spooled_files'])} spool files, "
              f"{s['dead_letters']} dead letters ({s['dead_letter_file']}), "
              f"{len(s['quarantined'])} quarantined files")
        if s["spool_unsafe"]:
            print(f"spool folder unsafe: {printable(s['spool_unsafe'])} (proxies refuse it: chmod 700)")
        for f in s["world_readable"]:
            print(f"readable by other users: {f['path']} (mode {f['mode']}; velvet leaves an existing file's "
                  f"mode alone: chmod go-rwx it)")
    failing = any(p["running"] and p["failing_since"] for p in s["proxies"])
    return 1 if failing or db_error else 0


def cmd_migrate(db: Database, a: argparse.Namespace) -> None:
    """The schema is migrated on open; ``--partition`` then makes calls partitioned (PostgreSQL)."""
    from velvet_core import clock
    from velvet_core.storage import partitions
    from velvet_core.storage.migrations import schema_version

    out: dict[str, Any] = {"schema_version": schema_version(db), "partitions": partitions.period_of(db)}
    if a.partition:
        out["partitioned"] = partitions.partition(db, a.partition, clock.now())
        out["partitions"] = a.partition
    if a.json:
        return jsonout.dump(out)
    print(f"schema v{out['schema_version']}; calls partitioned by {out['partitions'] or '(not partitioned)'}")
    if done := out.get("partitioned"):
        print(f"{count(done['moved'])} calls copied into {done['partitions']} partitions")
