"""What ``velvet replay`` and ``velvet compare`` do, with their output for people and ``--json`` (their
arguments: :mod:`velvet_core.experiments.cli`)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from peewee import Database

from velvet_core import config, jsonout
from velvet_core.api.client import APIError, Client
from velvet_core.experiments import compare as cmp
from velvet_core.experiments import judge, replay
from velvet_core.experiments.cli import LIVE_DEFAULT_MAX
from velvet_core.experiments.plan import (
    BATCH_MAX_BYTES,
    BATCH_MAX_LINES,
    Overrides,
    Plan,
    build,
    parse_set,
)
from velvet_core.experiments.select import Selection, SelectionError, parse_tag, select
from velvet_core.humanize import Progress, duration, money, ms, pairs, printable, table
from velvet_core.humanize import count as num
from velvet_core.storage import sql
from velvet_core.storage.database import open_db

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
REPLAY_KEYS = ("experiment", "batch_id", "lines", "estimated_cost_usd")




def _note(text: str) -> None:
    print(printable(text, multiline=True), file=sys.stderr)


# -- replay ----------------------------------------------------------------------------------------

def _selection(a: argparse.Namespace) -> Selection:
    if a.limit is not None and a.limit < 1:
        raise ValueError("--limit must be at least 1")
    return Selection(batch=a.batch, calls=a.calls, sql=a.sql, file=a.file, model=a.from_model, endpoint=a.endpoint,
                     allow_powerful_role=a.allow_powerful_role,
                     since=a.since, status=a.status, tags=[parse_tag(t) for t in a.tag or ()], limit=a.limit)


def _name(db: Database, given: str | None) -> str:
    if given is not None:
        if not NAME.match(given):
            raise ValueError(f"--name {given!r}: up to 64 letters, digits, '.', '_', ':' or '-'")
        if _taken(db, given):
            raise ValueError(f"an experiment named {given!r} exists already: choose another --name")
        return given
    base = "replay-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while _taken(db, name):
        n += 1
        name = f"{base}-{n}"
    return name


def _taken(db: Database, name: str) -> bool:
    return sql.has_table(db, "experiments") and bool(
        sql.rows(db, "SELECT name FROM experiments WHERE name = ?", (name,)))


def _check_batch(plan: Plan) -> None:
    if len(plan.urls) > 1:
        raise SelectionError(f"a batch runs one endpoint; the selection has {', '.join(sorted(plan.urls))}: "
                             "add --endpoint or use --mode live")
    if len(plan.models) > 1:
        raise SelectionError(f"a batch runs one model; the requests ask for {', '.join(sorted(plan.models))}: "
                             "add --model (or --from-model), or use --mode live")
    if len(plan.lines) > BATCH_MAX_LINES or plan.bytes > BATCH_MAX_BYTES:
        raise SelectionError(f"{len(plan.lines):,} requests ({plan.bytes / 1e6:,.0f} MB) exceed a batch's "
                             f"{BATCH_MAX_LINES:,} requests or {BATCH_MAX_BYTES // 2**20} MB: add --limit or "
                             "--since")


def cmd_replay(db: Database, a: argparse.Namespace) -> None:
    if a.resume is not None:
        return _resume(db, a)
    if a.concurrency < 1 or a.poll_interval <= 0 or a.max_lines < 0:
        raise ValueError("--concurrency, --poll-interval and --max-lines must be positive")
    sel = _selection(a)
    overrides = Overrides(a.model, tuple(parse_set(s) for s in a.set or ()), a.system_prompt)
    name = _name(db, a.name)
    plan = build(select(db, sel), overrides)
    try:
        n = len(plan.lines)
        if n == 0:
            raise SelectionError("the selection matched no requests")
        mode = a.mode or ("batch" if sel.batch is not None or n > LIVE_DEFAULT_MAX else "live")
        if mode == "batch":
            _check_batch(plan)
        estimate = plan.estimated_cost(mode)
        out = {"experiment": name, "batch_id": None, "lines": n, "estimated_cost_usd": estimate}
        if a.dry_run:
            return jsonout.dump(out) if a.json else _show_plan(name, sel, overrides, mode, plan, estimate)
        if n > a.max_lines and not a.yes:
            raise ValueError(f"the selection has {n:,} requests, more than --max-lines {a.max_lines:,}: add --yes "
                             "to replay them all (or --limit)")
        with Client.from_env() as client:
            if not any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                                                   "OPENAI_BASE_URL")):
                _note("velvet: HTTPS_PROXY is not set: the replay goes straight to the API, and velvet will not "
                      "log its answers")
            wdb = open_db(a.db or config.default_db_url())
            try:
                replay.record(wdb, name=name, source=sel.describe(), overrides=overrides.describe(), mode=mode,
                              plan=plan, estimated_cost_usd=estimate, key_fingerprint=client.key_fingerprint)
                if mode == "batch":
                    out["batch_id"] = _run_batch(wdb, client, plan, name, a)
                else:
                    _run_live(wdb, client, plan, name, a)
            finally:
                wdb.close()
        if a.json:
            jsonout.dump(out)
        else:
            _note(f"compare with what it replayed: velvet compare {name}")
    finally:
        plan.close()


def _run_batch(wdb: Database, client: Client, plan: Plan, name: str, a: argparse.Namespace) -> str:
    try:
        b = replay.submit(client, plan, name)
    except BaseException:
        replay.forget(wdb, name)  # nothing reached the API: no experiment either
        raise
    replay.set_batch(wdb, name, b["id"], b["input_file_id"])
    if not a.json:
        pairs([("experiment", name), ("batch", f"{b['id']} ({b.get('status')})"),
               ("input file", b["input_file_id"]), ("lines", num(len(plan.lines))),
               ("estimated", money(plan.estimated_cost("batch")))])
    if a.wait:
        _wait_and_download(client, b["id"], a, name)
    elif not a.json:
        _note(f"the batch runs on the API's side; download its results through the proxy with: "
              f"velvet replay --resume {name}")
    return str(b["id"])


def _wait_and_download(client: Client, batch_id: str, a: argparse.Namespace, name: str) -> None:
    try:
        done = replay.wait(client, batch_id, a.poll_interval)
    except KeyboardInterrupt:
        _note(f"velvet: batch {batch_id} goes on; wait for it later with: velvet replay --resume {name}")
        raise
    files = replay.download(client, done)
    counts = done.get("request_counts") or {}
    if not a.json:
        got = ", ".join(f"{role} {num(f['lines'])} lines" for role, f in files.items()) or "no files"
        pairs([("status", done.get("status")),
               ("API counts", f"{num(counts.get('completed'))} completed, {num(counts.get('failed'))} failed "
                              f"of {num(counts.get('total'))}"),
               ("downloaded", got)])
    if done.get("status") != "completed":
        _note(f"velvet: batch {batch_id} ended {done.get('status')}")


def _run_live(wdb: Database, client: Client, plan: Plan, name: str, a: argparse.Namespace) -> None:
    progress = Progress(len(plan.lines), f"replaying {name}")
    try:
        run = replay.run_live(client, plan, name, a.concurrency, progress)
    finally:
        progress.close()
    replay.set_answers(wdb, name, run.results)
    errors = ", ".join(f"{k} x{v}" for k, v in run.errors().most_common(5))
    if not a.json:
        pairs([("experiment", name), ("mode", "live"), ("lines", num(len(plan.lines))),
               ("answered", num(run.answered)), ("failed", f"{num(run.failed)}{f' ({errors})' if errors else ''}"),
               ("retried", num(run.retried)), ("estimated", money(plan.estimated_cost("live")))])
    if run.refused is not None:
        raise APIError(f"the API refused the key ({run.refused.error}); {len(run.results)} of "
                       f"{len(plan.lines)} requests sent")
    if run.interrupted:
        raise KeyboardInterrupt
    if run.results and not run.answered:
        raise APIError(f"none of the {len(run.results)} requests was answered ({errors})")


def _resume(db: Database, a: argparse.Namespace) -> None:
    exp = cmp.experiment(db, a.resume)
    if exp["mode"] != "batch" or not exp["batch_id"]:
        raise ValueError(f"experiment {a.resume!r} has no batch to wait for")
    with Client.from_env() as client:
        _wait_and_download(client, exp["batch_id"], a, exp["name"])
    if a.json:
        jsonout.dump({"experiment": exp["name"], "batch_id": exp["batch_id"], "lines": exp["lines"],
               "estimated_cost_usd": exp["estimated_cost_usd"]})


def _show_plan(name: str, sel: Selection, overrides: Overrides, mode: str, plan: Plan,
               estimate: float | None) -> None:
    source = sel.describe()
    models = ", ".join(f"{m} ({num(c)})" for m, c in plan.from_models.most_common())
    new = ", ".join(sorted(plan.models))
    sets = " ".join(f"{k}={orjson.dumps(v).decode()}" for k, v in overrides.describe().get("set", {}).items())
    note = f" (not counted: {num(plan.unpriced)} without logged token counts or a known price)" \
        if plan.unpriced else ""
    pairs([("experiment", f"{name} (dry run: nothing sent)"), ("selection", orjson.dumps(source).decode()),
           ("mode", mode), ("endpoint", ", ".join(sorted(plan.urls))), ("requests", num(len(plan.lines))),
           ("models", f"{models} -> {new}"), ("--set", sets or None),
           ("system prompt", overrides.system_prompt),
           ("logged tokens", f"{num(plan.input_tokens)} in, {num(plan.output_tokens)} out"),
           ("estimated", f"{money(estimate)} at {'batch' if mode == 'batch' else 'synchronous'} prices{note}")])
    print("\nfirst request as it would be sent:")
    print(printable(orjson.dumps(plan.example, option=orjson.OPT_INDENT_2).decode(), multiline=True))


# -- compare ---------------------------------------------------------------------------------------

def cmd_compare(db: Database, a: argparse.Namespace) -> None:
    metrics = cmp.parse_metrics(a.metric)
    if any(m.name.startswith("eval:") for m in metrics):
        from velvet_core.evals.cli import default_rules

        metrics = cmp.attach_evals(metrics, a.rules or default_rules())
    judged = next((m for m in metrics if m.name == "judge"), None)
    prompts = judged is not None  # the judge is shown the requests
    if a.b is None:
        exp = cmp.experiment(db, a.a)
        side_a, side_b = cmp.source_side(db, exp, prompts), cmp.experiment_side(db, exp, prompts)
    else:
        side_a, side_b = cmp.resolve(db, a.a, prompts), cmp.resolve(db, a.b, prompts)
    scores, judge_batch = None, None
    if judged is not None:
        scores, judge_batch = _judge(side_a, side_b, judged.value or "", a)
    result = cmp.compare(side_a, side_b, metrics, scores)
    try:
        wdb = open_db(a.db or config.default_db_url())
        try:
            cmp.record(wdb, result, judge_batch)
        finally:
            wdb.close()
    except Exception as e:  # a read-only database still gets its comparison printed
        _note(f"velvet: comparison not recorded: {type(e).__name__}: {str(e).strip().splitlines()[0]}")
    if a.json:
        return jsonout.dump(result)
    _show_comparison(result, metrics, a.lines)


def _judge(side_a: cmp.Side, side_b: cmp.Side, rubric: str,
           a: argparse.Namespace) -> tuple[dict[str, float | None], str | None]:
    pairs_, _ = cmp.pair(side_a, side_b)
    items = {cmp.judge_key(x): (x.prompt or y.prompt, x.said.text)
             for p in pairs_ for x, y in (p, p[::-1]) if x.ok and x.said.text is not None}
    if not items:
        return {}, None
    _note(f"judging {len(items):,} answers with {a.judge_model} in a batch (polled every {a.poll_interval:g} s)")
    with Client.from_env() as client:
        batch_id, scores = judge.run(client, rubric, items, a.judge_model, a.poll_interval)
    return scores, batch_id


_SHARES = ("json_valid", "contains", "regex")  # summaries that are shares of the answers


def _fmt(name: str, v: Any, delta: bool = False) -> str:
    number = isinstance(v, int | float) and not isinstance(v, bool)
    sign = "+" if delta and number and v > 0 and name not in ("exact_match", "similarity") else ""
    if v is None:
        return "-"
    if number and name in _SHARES:
        return f"{v * 100:+.0f} pp" if delta else f"{v * 100:.0f}%"
    if number and name == "exact_match":
        return f"{v * 100:.0f}% same"
    if name == "cost_usd" and isinstance(v, int | float):
        return sign + (money(v) if v >= 0 else "-" + money(-v))
    if name == "latency" and isinstance(v, int | float):
        return sign + ms(v)
    if name == "turnaround" and isinstance(v, int | float):
        return sign + (duration(v) if v >= 0 else "-" + duration(-v))
    if isinstance(v, dict):
        return ", ".join(f"{k} {v2:+}" if delta and name == "finish_reason" else f"{k} {v2}"
                         for k, v2 in v.items()) or "-"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "(same)"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{sign}{v:,.4g}"
    return f"{sign}{v:,}" if isinstance(v, int) else str(v)


def _show_comparison(result: dict[str, Any], metrics: list[cmp.Metric], limit: int) -> None:
    pairs([("a", result["a"]), ("b", result["b"]),
           ("pairs", f"{num(result['pairs'])} ({num(result['unpaired'])} lines unpaired)")])
    print()
    table(["METRIC", "A", "B", "DELTA (B - A)"],
          [[m.name, _fmt(m.name, s["a"]), _fmt(m.name, s["b"]), _fmt(m.name, s["delta"], delta=True)]
           for m in metrics for s in [result["metrics"][m.name]]], right=(1, 2, 3))
    for side in ("a", "b"):
        missing = sum(1 for ln in result["lines"] if ln["status"][side] is None)
        if missing:
            _note(f"{num(missing)} lines of {result[side]} have no logged answer (yet: a batch still running, or "
                  "results not downloaded through the proxy)")
    shown = result["lines"][:limit]
    if not shown:
        return
    names = [m.name for m in metrics if m.name != "turnaround"]
    print(f"\nLines ({num(len(shown))} of {num(len(result['lines']))})")
    table(["A", "B", "STATUS", *(n.upper() for n in names)],
          [[ln["a"], ln["b"], f"{ln['status']['a'] or '-'}/{ln['status']['b'] or '-'}",
            *(_cell(n, ln["metrics"][n]) for n in names)] for ln in shown])


def _cell(name: str, v: dict[str, Any]) -> str:
    if v["a"] is None and v["b"] is None:
        return _fmt(name, v["delta"])
    return f"{_fmt(name, v['a'])} -> {_fmt(name, v['b'])}"


# -- export --format finetune ----------------------------------------------------------------------

