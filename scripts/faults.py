"""The fault suite's figures: faults injected from outside into real mitmdump processes with velvet.

Run through ``scripts/faults [--quick] [--json]``. Starts the stand-in API and a PostgreSQL cluster of
its own, then runs each scenario of ``tests/support/faultkit.py`` (the same ones tests/test_faults.py asserts
on) and prints what survived what. Targets: every ``*_lost`` and ``*_missing`` is 0, ``tracebacks`` is 0, and
every figure of the ``security`` section is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from support import attacks, planted, privacy, reportfuzz
from support import faultkit as fk
from support.pg import reader_url
from support.standin import StandIn


def report_fuzz(root: Path, urls: Callable[[], str], n: int, say: Callable[[str], None]) -> dict[str, Any]:
    """``velvet report`` on `n` seeded hostile databases per backend, each in a child held to 1 GB and 90 s:
    cases run, hangs (time or memory limit reached) and crashes, all to be 0 but the first."""
    found = {"cases": 0, "hangs": 0, "crashes": 0}
    for backend in ("sqlite", "postgres"):
        for i, (text, number, age) in enumerate(reportfuzz.cases(24, n)):
            url = f"sqlite:///{root / f'report-{i}.db'}" if backend == "sqlite" else urls()
            reportfuzz.prepare(url, text, number, age)
            outcome = reportfuzz.run_report(url, root / f"report-{backend}-{i}.html")
            found["cases"] += 1
            if outcome != "ok":
                found["hangs" if outcome == "hang" else "crashes"] += 1
                say(f"faults:   report on {text[:40]!r}, {number}: {outcome}")
    return found


def run(quick: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Every scenario (``quick``: fewer and smaller, about a minute); the figures as one flat dict."""
    root = Path(tempfile.mkdtemp(prefix="velvet-faults-"))
    outage_s = 3.0 if quick else 20.0
    calls, lines = (20, 500) if quick else (200, 20_000)
    fuzz_n = 50 if quick else 400
    out: dict[str, Any] = {}
    standin = StandIn().start()
    say("faults: starting a PostgreSQL cluster of our own")
    cluster = fk.Cluster()
    n = iter(range(1000))

    def tmp(name: str) -> Path:
        d = root / f"{next(n):02d}-{name}"
        d.mkdir()
        return d

    def each(name: str, fn: Callable[[Path, str], Any]) -> list[Any]:
        res = []
        for backend in ("sqlite", "postgres"):
            d = tmp(f"{name}-{backend}")
            url = f"sqlite:///{d / 'velvet.db'}" if backend == "sqlite" else cluster.fresh_url()
            t = time.monotonic()
            res.append(fn(d, url))
            say(f"faults:   {name} ({backend}) {time.monotonic() - t:.1f} s")
        return res

    try:
        say(f"faults: PostgreSQL stopped for {outage_s:.0f} s under traffic")
        o = fk.outage(standin, tmp("outage-postgres"), cluster.fresh_url(), cluster.down, cluster.up,
                      seconds=outage_s, pace=0.15)
        out.update(outage_s=o.outage_s, outage_calls=o.during, served_during_outage=o.served_during,
                   served_p99_ms_during_outage=o.p99_ms_during, outage_calls_total=o.calls,
                   stored_after_outage=o.stored, outage_warned=o.warned, scored_after_outage=o.scored)
        if not quick:
            say(f"faults: SQLite write-locked by another process for {outage_s:.0f} s under traffic")
            d = tmp("outage-sqlite")
            url = f"sqlite:///{d / 'velvet.db'}"
            lock = fk.SqliteLock(url)
            s = fk.outage(standin, d, url, lock.down, lock.up, seconds=outage_s, pace=0.15)
            out.update(sqlite_locked_s=s.outage_s, sqlite_locked_calls=s.calls,
                       sqlite_locked_served=s.served, sqlite_locked_calls_lost=s.calls - s.stored)

        say(f"faults: SIGKILL after {calls} calls and a {lines:,}-line streamed upload, another upload half-way")
        k = []
        for everything in (True,) if quick else (True, False):
            what = "mitmdump+writer" if everything else "mitmdump"
            k += each(f"kill9-{what}", lambda d, url, e=everything: fk.kill9(standin, d, url, calls=calls,
                                                                           lines=lines, everything=e))
        out.update(kill9_calls=sum(x.calls for x in k), kill9_calls_lost=sum(x.calls_lost for x in k),
                   kill9_stream_lines=sum(x.stream_lines for x in k),
                   kill9_stream_lines_lost=sum(x.stream_lines_lost for x in k),
                   kill9_cut_uploads=len(k), kill9_cut_uploads_recorded=sum(x.incomplete_recorded for x in k),
                   kill9_calls_not_yet_written=sum(x.calls - x.calls_stored_at_kill for x in k),
                   kill9_lines_not_yet_written=sum(x.stream_lines - x.lines_stored_at_kill for x in k))
        if not quick:
            say("faults: the same on SQLite with velvet_journal=false, for comparison")
            nj = fk.kill9(standin, tmp("kill9-no-journal"), f"sqlite:///{root / 'no-journal.db'}", calls=calls,
                          lines=lines, journal=False, wait=5)
            out.update(kill9_calls_lost_no_journal=nj.calls_lost,
                       kill9_stream_lines_lost_no_journal=nj.stream_lines_lost)

        say(f"faults: poison values ({len(fk.POISONS)} calls, {fk.POISONED_LINES} batch lines) then normal calls")
        p = each("poison", lambda d, url: fk.poison(standin, d, url))
        out.update(poison_values_tried=sum(x.tried for x in p), rows_lost_to_poison=sum(x.rows_lost for x in p),
                   normal_calls_lost_after_poison=sum(x.normal_lost for x in p),
                   poison_cut_without_problem=sum(len(x.uncounted_cuts) for x in p),
                   poison_absurd_figures=sum(len(x.absurd) for x in p),
                   poison_read_side_errors=sum(len(x.read_side_errors) for x in p))

        say(f"faults: {fuzz_n} fuzzed requests and answers per backend through mitmdump")
        f = each("fuzz", lambda d, url: fk.fuzz(standin, d, url, fuzz_n))
        out.update(fuzz_requests=sum(x.requests for x in f), fuzz_rows_missing=sum(x.missing for x in f))

        say("faults: damaged spool and journal files")
        g = []
        for backend in ("sqlite",) if quick else ("sqlite", "postgres"):
            d = tmp(f"damaged-{backend}")
            if backend == "sqlite":
                path = d / "db" / "velvet.db"
                g.append(fk.damaged_spool(standin, d, f"sqlite:///{path}", lambda p=path: p.mkdir(parents=True),
                                          lambda p=path: p.rmdir()))
            else:
                g.append(fk.damaged_spool(standin, d, cluster.fresh_url(), cluster.down, cluster.up))
        out.update(damaged_files=sum(x.damaged for x in g), damaged_files_kept=sum(x.kept for x in g),
                   damaged_files_left_to_replay=sum(len(x.left_pending) for x in g),
                   damaged_files_readable_rows_lost=sum(x.readable_rows_lost for x in g))

        if not quick:
            say("faults: mitmdump stopped while PostgreSQL is down")
            ds = fk.down_at_shutdown(standin, tmp("down-at-shutdown"), cluster.fresh_url(), cluster.down,
                                     cluster.up)
            out.update(down_at_shutdown_calls=ds.calls, down_at_shutdown_lost=ds.lost,
                       down_at_shutdown_lingering=len(ds.lingering))
            if sys.platform == "linux":
                say("faults: a full disk (no file may grow) under traffic, then space again")
                df = fk.disk_full(standin, tmp("disk-full"), calls=60)
                out.update(disk_full_calls=df.calls, disk_full_served=df.served, disk_full_stored=df.stored,
                           disk_full_dead_lettered=df.dead_lettered, disk_full_warned=df.warned)
            say("faults: two proxies on one PostgreSQL (a batch created through one, polled through the other)")
            sh = fk.shared_pg(standin, tmp("shared-postgres"), cluster.fresh_url(), lines=2000)
            out.update(shared_pg_lines_lost=sh.lines_lost + sh.results_lost,
                       shared_pg_proxies_seen=sh.proxies_seen)

        say("faults: velvet prune of old rows while a proxy writes new calls to the same database")
        pr = each("prune", lambda d, url: fk.prune_under_traffic(standin, d, url, old=2000 if quick else 20_000))
        out.update(prune_calls=sum(x.calls for x in pr), prune_calls_lost=sum(x.calls - x.stored for x in pr),
                   prune_old_rows_left=sum(x.old_left for x in pr),
                   prune_rows_per_s=min(x.pruned_rows_per_s for x in pr),
                   prune_max_writer_delay_ms=max(x.longest_prune_transaction_ms for x in pr))
        say("faults: the same on PostgreSQL with calls partitioned by day (velvet migrate --partition day)")
        pp = fk.prune_under_traffic(standin, tmp("prune-partitioned"), cluster.fresh_url(),
                                    old=2000 if quick else 20_000, partition="day")
        out.update(prune_partitioned_calls_lost=pp.calls - pp.stored, prune_partitioned_old_rows_left=pp.old_left,
                   prune_partitioned_max_writer_delay_ms=pp.longest_prune_transaction_ms)

        # what velvet promises about secrets and files: each probe returns figures, merged here (all must be 0)
        security: dict[str, Any] = {}
        say("faults: secrets planted in URL queries and headers, files and modes under umask 022")
        for fig in each("secrets", lambda d, url: privacy.probe(standin, d, url).figures()):
            for k, v in fig.items():
                security[k] = security.get(k, 0) + v
        say("faults: SQL that tries to write, through velvet sql (a read-only role on PostgreSQL)")
        for fig in each("readonly", lambda d, url: readonly_probe(d, url, cluster.base_url)):
            for k, v in fig.items():
                security[k] = security.get(k, 0) + v
        say("faults: pickles planted in the spool and journal folders, a real proxy started over them")
        for fig in each("planted", lambda d, url: planted_probe(standin, d, url)):
            for k, v in fig.items():
                security[k] = security.get(k, 0) + v
        out["security"] = security
        say("faults: the report on hostile labels and numbers (hang and crash hunt)")
        out["report_fuzz"] = report_fuzz(tmp("report-fuzz"), cluster.fresh_url, 12 if quick else 40, say)

        out["dead_lettered"] = fk.dead_letters(root)
        out["writer_processes_lingering"] = len(fk.LINGERED)
        out["tracebacks"] = sum(fk.crashes(p.read_text(errors="replace")) for p in root.rglob("mitmdump.log"))
        out.update(quick=quick, writer=" ".join(fk.EXTRA).removeprefix("--set velvet_writer=") or "auto",
                   machine=f"{platform.machine()}, {os.cpu_count()} cores, "
                                        f"Python {platform.python_version()}, {platform.system()}")
    finally:
        fk.up_quietly(cluster.up)
        cluster.remove()
        standin.stop()
        if os.environ.get("VELVET_FAULTS_KEEP"):
            say(f"faults: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return out


def table(r: dict[str, Any]) -> str:
    def has(*keys: str) -> bool:
        return all(k in r for k in keys)

    rows = [(f"PostgreSQL down {r['outage_s']:.0f} s",
             f"{r['served_during_outage']}/{r['outage_calls']} calls served "
             f"(p99 {r['served_p99_ms_during_outage']} ms), {r['stored_after_outage']}/{r['outage_calls_total']} "
             f"stored after, {r.get('scored_after_outage', '-')} scored by an eval")]
    if has("sqlite_locked_s"):
        rows.append((f"SQLite locked {r['sqlite_locked_s']:.0f} s", f"{r['sqlite_locked_served']}/"
                     f"{r['sqlite_locked_calls']} served, {r['sqlite_locked_calls_lost']} lost"))
    rows.append(("SIGKILL, restart", f"{r['kill9_calls_lost']}/{r['kill9_calls']} answered calls lost, "
                 f"{r['kill9_stream_lines_lost']}/{r['kill9_stream_lines']} streamed lines lost, "
                 f"{r['kill9_cut_uploads_recorded']}/{r['kill9_cut_uploads']} cut uploads recorded alone"))
    if has("kill9_calls_lost_no_journal"):
        rows.append(("  without the journal", f"{r['kill9_calls_lost_no_journal']} calls, "
                     f"{r['kill9_stream_lines_lost_no_journal']} lines lost"))
    rows += [("poison values", f"{r['poison_values_tried']} tried, {r['rows_lost_to_poison']} rows lost, "
              f"{r['poison_cut_without_problem']} cut without a word in problem, "
              f"{r['poison_absurd_figures']} absurd figures"),
             ("fuzzed requests", f"{r['fuzz_rows_missing']}/{r['fuzz_requests']} rows missing"),
             ("damaged spool/journal files", f"{r['damaged_files_kept']}/{r['damaged_files']} kept, "
              f"{r['damaged_files_left_to_replay']} left to replay, {r['damaged_files_readable_rows_lost']} "
              "readable rows lost")]
    if has("down_at_shutdown_calls"):
        rows.append(("stopped while the database is down", f"{r['down_at_shutdown_lost']}/"
                     f"{r['down_at_shutdown_calls']} lost, {r['down_at_shutdown_lingering']} processes lingering"))
    if has("disk_full_calls"):
        rows.append(("full disk", f"{r['disk_full_served']}/{r['disk_full_calls']} served, "
                     f"{r['disk_full_stored']} stored once space is back, "
                     f"{r['disk_full_dead_lettered']} dead-lettered"))
    if has("shared_pg_lines_lost"):
        rows.append(("two proxies, one PostgreSQL", f"{r['shared_pg_lines_lost']} lines lost"))
    if has("prune_calls"):
        rows.append(("velvet prune under traffic", f"{r['prune_calls_lost']}/{r['prune_calls']} new calls lost, "
                     f"{r['prune_old_rows_left']} old rows left, {r['prune_rows_per_s']:,.0f} rows/s, the "
                     f"writer waited at most {r['prune_max_writer_delay_ms']} ms"))
    if has("prune_partitioned_calls_lost"):
        rows.append(("  PostgreSQL, calls partitioned", f"{r['prune_partitioned_calls_lost']} new calls lost, "
                     f"{r['prune_partitioned_old_rows_left']} old rows left, the writer waited at most "
                     f"{r['prune_partitioned_max_writer_delay_ms']} ms"))
    rows += [(f"security: {k}", str(v)) for k, v in r.get("security", {}).items()]
    if has("report_fuzz"):
        rf = r["report_fuzz"]
        rows.append(("report on hostile inputs",
                     f"{rf['cases']} cases, {rf['hangs']} hangs, {rf['crashes']} crashes"))
    rows += [("dead-lettered", str(r["dead_lettered"])), ("tracebacks", str(r["tracebacks"]))]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows) + f"\n\n{r['machine']}{' (quick)' if r['quick'] else ''}"


def planted_probe(standin: StandIn, d: Path, url: str) -> dict[str, int]:
    """A spool file and a journal segment velvet did not write, each running a command if unpickled; a real
    mitmdump started over them serves a call: ``unpickled_foreign`` counts the commands that ran."""
    from support.rig import Proxy

    spool = d / "spool"
    spool.mkdir(mode=0o700)
    markers = planted.plant(spool, url, d)
    p = Proxy(url, standin.url, d).start()
    try:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(p.env())
        call = ("import openai; openai.OpenAI(api_key='sk-test', max_retries=0).chat.completions.create("
                "model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'x'}])")
        subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, timeout=60)
    finally:
        p.stop()
    return {"unpickled_foreign": sum(m.exists() for m in markers), "foreign_files_planted": len(markers)}


def readonly_probe(d: Path, url: str, pg_base: str) -> dict[str, int]:
    """Every write attack of tests/support/attacks.py through the real ``velvet sql``; rows and files checked."""
    from velvet_core.storage.database import open_db
    from velvet_core.storage.ops import CallRow
    from velvet_core.storage.store import Store

    db = open_db(url)
    Store(db).apply([CallRow({"flow_id": f"f{i}", "method": "POST", "host": "api.openai.com", "path": "/v1/x",
                              "endpoint": "chat.completions", "action": "create",
                              "started_at": datetime(2026, 11, 24, 10)}) for i in range(3)])

    def snapshot() -> list[tuple]:
        return sorted(tuple(r) for r in db.execute_sql("SELECT flow_id, model, status_code FROM calls").fetchall())

    before = snapshot()
    through = reader_url(url, pg_base) if url.startswith("postgresql") else url
    velvet = Path(sys.executable).with_name("velvet")
    try:
        got = attacks.probe(through, d / "spot", lambda: snapshot() != before, lambda sql: subprocess.run(
            [str(velvet), "sql", "--db", through, sql], capture_output=True, timeout=60).returncode)
    finally:
        db.close()
    return got.figures()


def main() -> int:
    ap = argparse.ArgumentParser(description="velvet's fault suite, with figures (see docs/benchmarks.md)")
    ap.add_argument("--quick", action="store_true", help="smaller scenarios, about a minute")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--writer", choices=("auto", "thread", "process"), default="auto",
                    help="velvet_writer for every mitmdump (default: velvet's own default, auto)")
    a = ap.parse_args()
    if a.writer != "auto":
        fk.EXTRA[:] = ["--set", f"velvet_writer={a.writer}"]
    for k in [k for k in os.environ if "proxy" in k.lower()]:
        del os.environ[k]
    r = run(a.quick, lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(r, indent=2) if a.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
