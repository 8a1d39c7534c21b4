"""The fault suite: poison values, a database outage, SIGKILL, a damaged spool file, a full disk, fuzzed
bodies and two proxies on one PostgreSQL, against real processes on SQLite and PostgreSQL.

The scenarios themselves are in :mod:`faultkit` (``scripts/faults`` runs the same ones for figures);
these tests assert what issue 10 promises: every call served, every answered call and line stored,
damaged files kept, no traceback in mitmdump's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils
from support import attacks
from support import faultkit as fk
from support.helpers import multipart_body
from support.pg import fresh_pg_url
from support.rig import ROOT, bound
from velvet_core.addon import Velvet
from velvet_core.storage import models


@pytest.fixture(scope="module")
def cluster() -> Iterator[fk.Cluster]:
    """A PostgreSQL cluster of this module's own: its server is stopped and started by the tests."""
    c = fk.Cluster()
    yield c
    c.remove()


Switch = tuple[str, Callable[[], None], Callable[[], None]]  # url, take the database down, bring it up


@pytest.fixture(params=["sqlite", "postgres"])
def outage_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Switch]:
    """A database and how to make it unavailable: PostgreSQL's server stopped, SQLite's write lock held."""
    if request.param == "postgres":
        c: fk.Cluster = request.getfixturevalue("cluster")
        yield c.fresh_url(), c.down, c.up
        fk.up_quietly(c.up)
    else:
        url = f"sqlite:///{tmp_path / 'velvet.db'}"
        lock = fk.SqliteLock(url)
        yield url, lock.down, lock.up
        lock.up()


@pytest.fixture(params=["sqlite", "postgres"])
def gone_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Switch]:
    """A database that cannot be opened at all, then can: PostgreSQL stopped; SQLite's path a directory."""
    if request.param == "postgres":
        c: fk.Cluster = request.getfixturevalue("cluster")
        yield c.fresh_url(), c.down, c.up
        fk.up_quietly(c.up)
    else:
        path = tmp_path / "db" / "velvet.db"
        yield f"sqlite:///{path}", lambda: path.mkdir(parents=True), path.rmdir


def test_poison_values_never_stop_logging(standin, db_url, tmp_path):
    """Each poison call, a batch whose lines carry poisons, then normal calls: every call has its row,
    every line too, a value that had to be cut is named in the row's ``problem``, and the ``velvet``
    commands read the rows."""
    r = fk.poison(standin, tmp_path, db_url)
    wrong = {  # all checked at once: one run says everything that is wrong
        "calls without a row (by request id)": r.missing,
        "rows without a request id": r.anonymous,
        "values changed that problem does not name": r.uncounted_cuts,
        "figures computed from a value that had to be cut": r.absurd,
        "velvet commands failing on the poisoned rows": r.read_side_errors,
        "lines of the poisoned batch file without a row": 20 - r.batch_lines_stored,
        "answers of the poisoned batch without a row": r.batch_results_expected - r.batch_results_stored,
        "batch with absurd timestamps not stored": not r.poison_batch_row,
        "tracebacks in mitmdump's output": r.tracebacks,
    }
    assert r.batch_results_expected == 19
    assert not any(wrong.values()), {k: v for k, v in wrong.items() if v}
    assert r.rows_lost == 0 and r.normal_lost == 0


def test_database_outage_under_traffic(standin, outage_db, tmp_path):
    """The database goes away for a few seconds while calls go through: all served, all stored after."""
    url, down, up = outage_db
    pg = url.startswith("postgresql")
    # (PostgreSQL down longer than the 5 s after which the writer warns)
    r = fk.outage(standin, tmp_path, url, down, up, seconds=7 if pg else 5)
    assert r.during >= 10, "calls were made while the database was unavailable"
    assert r.served == r.calls, "every call was served"
    assert r.missing == [] and r.stored == r.calls
    if pg:  # (SQLite's writer waits on the lock, busy_timeout: not a failure)
        assert r.warned and r.recovered, "the log says when writes fail for seconds, and when they recover"
    assert r.tracebacks == 0


@pytest.mark.parametrize("everything", [False, True], ids=["mitmdump", "mitmdump+writer"])
def test_sigkill_then_restart(standin, db_url, tmp_path, everything):
    """SIGKILL right after live calls and a streamed upload were answered, with another upload half-way,
    of mitmdump alone (as the OOM killer does) or of all its processes (a container or machine going): the
    next mitmdump on the same database and spool dir stores every answered call and line, and records the
    cut upload, and only it, as an incomplete row."""
    r = fk.kill9(standin, tmp_path, db_url, calls=40, lines=2000, everything=everything)
    assert r.missing_calls == [], f"{r.calls_lost} of {r.calls} answered calls lost (incomplete rows: " \
        f"{r.incomplete_rows})"
    assert r.stream_lines_lost == 0, f"{r.stream_lines_lost} of {r.stream_lines} lines of the answered upload lost"
    assert r.incomplete_recorded, f"one incomplete row, the cut upload's: {r.incomplete_rows}"
    (row,) = r.incomplete_rows
    assert row["method"] == "POST" and row["endpoint"] == "files" and row["problem"]
    assert r.half_lines == 0, "the cut upload's lines are not taken as a file's"
    assert r.tracebacks == 0


def test_shutdown_while_the_database_is_down(standin, cluster, tmp_path):
    """mitmdump stopped while PostgreSQL is down: no process of it goes on after velvet_flush_timeout,
    and what it accepted is written at the next start."""
    r = fk.down_at_shutdown(standin, tmp_path, cluster.fresh_url(), cluster.down, cluster.up)
    assert r.lingering == []
    assert r.lost == 0


def test_damaged_spool_and_journal_files_are_quarantined(standin, gone_db, tmp_path):
    """A spool file with garbage appended, one cut mid-record and a journal with a damaged entry are renamed
    and kept, not deleted, logged, counted, and what can be read of them is written."""
    url, down, up = gone_db
    r = fk.damaged_spool(standin, tmp_path, url, down, up)
    assert r.kept == r.damaged == 3, "the damaged files are still in the spool dir"
    assert r.left_pending == [], "damaged files are renamed (not replayed at every start)"
    assert r.logged, r.log[-3000:]
    assert r.counted == 3, "velvet status --json lists the quarantined files"
    assert r.readable_rows_lost == 0, "the readable records before the damage are written"
    assert r.tracebacks == 0, r.log[-3000:]


@pytest.mark.skipif(sys.platform != "linux", reason="sets RLIMIT_FSIZE of other processes (prlimit)")
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_full_disk(standin, tmp_path, writer):
    """No file may grow (the disk is full: the database, the journal, spill files) while calls go through,
    long enough for the writer to fail five attempts; once space is back, every call is stored."""
    r = fk.disk_full(standin, tmp_path, calls=30, writer=writer)
    assert r.served == r.calls, "a full disk never fails the user's calls"
    assert r.upload_served, "a streamed upload is passed on even when velvet cannot keep it"
    assert r.warned and r.recovered, "the log says writes failed (the disk was full) and recovered"
    assert r.stored == r.calls, f"{r.calls - r.stored} of {r.calls} calls lost"
    assert "could not keep the body" in (r.upload_row_says or ""), r.upload_row_says
    assert r.dead_lettered == 0, "a full disk is not bad data"
    assert r.tracebacks == 0


def test_two_proxies_share_postgres(standin, tmp_path):
    """A batch created through one proxy and polled and downloaded through another: everything stored."""
    r = fk.shared_pg(standin, tmp_path, fresh_pg_url())
    assert (r.lines_lost, r.results_lost) == (0, 0)
    assert r.status == "completed"
    assert r.events == ["validating", "in_progress", "finalizing", "completed"]
    assert r.proxies_seen == 2, "each proxy has its health row in velvet_proxies"
    assert r.tracebacks == 0


# -- fuzzed bodies through the hooks (mitmproxy's test helpers, a real database) ------------------------

FIELDS = st.sampled_from(fk.FIELDS)
LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
          | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(fk.POISON_NUMBERS)
          | st.text(max_size=30) | st.sampled_from(fk.POISON_STRINGS))
VALUES = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=4)
                      | st.dictionaries(FIELDS | st.text(max_size=6), kids, max_size=6), max_leaves=25)
OBJECTS = st.dictionaries(FIELDS, VALUES, max_size=8)
BODIES = OBJECTS.map(fk.json_bytes) | st.binary(max_size=200) | VALUES.map(fk.json_bytes)
HEADER_VALUES = st.binary(min_size=1, max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b) | \
    st.sampled_from([b"99999999999999999999999", b"1e999", b"-1", b"nan", b"inf", b"\xff\xfe", b"12ms"])
HEADER_NAMES = st.sampled_from([b"openai-organization", b"openai-project", b"x-ratelimit-limit-requests",
                                b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-requests",
                                b"openai-processing-ms", b"velvet-metadata-team", b"content-encoding"])


def multipart(lines: bytes) -> tuple[bytes, str]:
    b = "fuzzboundary"
    return (multipart_body(b, [("purpose", None, b"batch"), ("file", "f.jsonl", lines)], content_type=False),
            f"multipart/form-data; boundary={b}")


@st.composite
def fuzzed_flows(draw: st.DrawFn) -> http.HTTPFlow:
    kind = draw(st.sampled_from(["call", "call", "call", "sse", "error", "upload", "download"]))
    method, path = draw(st.sampled_from(fk.FUZZ_PATHS))
    req_body, req_ct = draw(BODIES), "application/json"
    resp_body, resp_ct = draw(BODIES), "application/json"
    if kind in ("upload", "download"):
        lines = b"\n".join(draw(st.lists(BODIES, max_size=12)))
        if kind == "upload":
            method, path = "POST", "/v1/files"
            req_body, req_ct = multipart(lines)
            resp_body = fk.json_bytes({"id": draw(st.sampled_from(["file-fz", "\x00", ""])), "purpose": "batch",
                                       "object": "file", **draw(OBJECTS)})
        else:
            method, path = "GET", "/v1/files/file-fz/content"
            resp_body, resp_ct = lines, "application/octet-stream"
    elif kind == "sse":
        method, path = "POST", draw(st.sampled_from(["/v1/chat/completions", "/v1/responses"]))
        resp_ct = "text/event-stream"
        resp_body = b"".join(b"data: " + b + b"\n\n" for b in draw(st.lists(BODIES, max_size=6)))
    rh = [(b"host", b"api.openai.com"), (b"authorization", b"Bearer sk-fuzz-0123456789"),
          (b"content-type", req_ct.encode())]
    req = tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=method.encode(),
                      path=path.encode(), content=req_body, headers=http.Headers(rh))
    # fuzzed headers (a content-encoding too) added after the body, which stays as it is on the wire
    req.headers.fields += tuple(draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=3)))
    if kind == "error":
        return tflow.tflow(req=req, err=True)
    sh = [(b"content-type", resp_ct.encode()), (b"x-request-id", b"req_fuzz")]
    resp = tutils.tresp(status_code=draw(st.sampled_from([200, 200, 400, 429, 500])), content=resp_body,
                        headers=http.Headers(sh))
    resp.headers.fields += tuple(draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=3)))
    return tflow.tflow(req=req, resp=resp)


def replay(addon: Velvet, f: http.HTTPFlow) -> None:
    """The hooks mitmproxy runs for a flow; an event stream goes through the recorder chunk by chunk."""
    addon.requestheaders(f)
    if f.error is not None:
        addon.error(f)
        return
    body = (f.response.raw_content if f.response else None) or b""
    addon.responseheaders(f)
    if f.response is not None and callable(f.response.stream):
        for i in range(0, len(body), 7):
            f.response.stream(body[i:i + 7])
        f.response.stream(b"")
    addon.response(f)


def test_fuzzed_bodies_through_the_hooks(db_url, tmp_path, caplog):
    """150 fuzzed flows (bodies, headers, event streams, batch files, connection errors) through the
    addon's hooks: each gets its row, and nothing logs a traceback."""
    seen: list[str] = []
    v = Velvet()
    with taddons.context(v) as tctx:
        tctx.configure(v, velvet_db=db_url, velvet_spool_dir=str(tmp_path / "spool"))
        v.running()

        @settings(max_examples=150, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(fuzzed_flows())
        def one(f: http.HTTPFlow) -> None:
            seen.append(f.id)
            replay(v, f)

        one()
        v.done()
    with bound(db_url):
        stored = {r.flow_id for r in models.Call.select(models.Call.flow_id)}
    missing = [i for i in seen if i not in stored]
    assert len(seen) >= 100
    assert missing == [], f"{len(missing)} of {len(seen)} fuzzed flows have no row"
    errors = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert errors == [], caplog.text[-5000:]


# -- scripts/faults ----------------------------------------------------------------------------------

KEYS = {"outage_s", "served_during_outage", "stored_after_outage", "scored_after_outage", "kill9_calls_lost",
        "kill9_stream_lines_lost",
        "poison_values_tried", "rows_lost_to_poison", "fuzz_requests", "fuzz_rows_missing", "tracebacks",
        "prune_calls", "prune_calls_lost", "prune_old_rows_left", "prune_rows_per_s", "prune_max_writer_delay_ms",
        "prune_partitioned_calls_lost", "prune_partitioned_old_rows_left"}


def test_faults_script_quick_json():
    """``scripts/faults --quick --json`` runs every scenario and prints every key (figures not asserted,
    apart from what is deterministic: how much was tried)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    r = subprocess.run([str(ROOT / "scripts" / "faults"), "--quick", "--json"], capture_output=True, text=True,
                       env=env, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert set(out) >= KEYS, KEYS - set(out)
    assert all(isinstance(out[k], int | float) for k in KEYS)
    assert out["poison_values_tried"] == 2 * (len(fk.POISONS) + fk.POISONED_LINES)
    assert out["fuzz_requests"] > 0 and out["outage_s"] > 0
    assert out["scored_after_outage"] == out["stored_after_outage"]  # the eval scored every call once back
    assert out["prune_calls"] > 0 and out["prune_old_rows_left"] == 0  # every old row went, in both backends
    assert out["prune_partitioned_old_rows_left"] == 0
    sec = out["security"]  # what velvet promises (docs/security.md): each figure 0
    assert {"sql_writes_blocked", "files_written_by_readonly", "secrets_found", "world_readable_files",
            "unpickled_foreign"} <= set(sec) and sec["foreign_files_planted"] == 4
    assert sec["sql_attacks_tried"] == 2 * len(attacks.ATTACKS) + len(attacks.SQLITE_ATTACKS) + len(
        attacks.PG_ATTACKS)
    assert {k: v for k, v in sec.items() if k not in ("sql_attacks_tried", "foreign_files_planted") and v} == {}
    assert out["report_fuzz"] == {"cases": 24, "hangs": 0, "crashes": 0}  # 12 hostile databases per backend
    orjson.dumps(out)  # plain JSON values only
