"""Faults injected from outside into real processes, for tests/test_faults.py and scripts/faults.py.

Each scenario runs a real ``mitmdump -s addon/velvet.py`` (:mod:`rig`) at the stand-in API, injects one
fault (a stopped database, SIGKILL, poison values, a damaged spool file, fuzzed bodies, a full disk)
and returns what it saw: figures for ``scripts/faults --json`` and details for the tests' messages.
Faults come from outside; results are read from the database, the spool dir and mitmdump's log (the
journal's frame format is used once, to damage a journal's second entry).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import ssl
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import orjson
from velvet_core.storage import models
from velvet_core.storage.models import BatchRequest, BatchResult, Call, File

from support.helpers import jsonl
from support.rig import API_KEY, ROOT, Proxy, bound
from support.standin import StandIn

Raw = openai.DefaultHttpxClient  # the SDK's own HTTP client class (httpx's API)
LOW = ["--set", "velvet_stream_threshold=1024"]  # every batch body over 1 KiB takes the streamed path
QUIET = ["--set", "flow_detail=0"]  # mitmdump's log: velvet's messages, not one line per flow
EXTRA: list[str] = []  # options for every mitmdump of the scenarios (scripts/faults --writer)
FLUSH_TIMEOUT = 5  # a bounded wait at shutdown when writes fail


def start_proxy(url: str, standin: StandIn, tmp: Path, extra: list[str] | None = None,
                flush_timeout: int = FLUSH_TIMEOUT) -> Proxy:
    """A started mitmdump for a scenario."""
    tmp.mkdir(parents=True, exist_ok=True)
    args = [*QUIET, *EXTRA, "--set", f"velvet_flush_timeout={flush_timeout}", *(extra or [])]
    return Proxy(url, standin.url, tmp, extra=last_set_wins(args)).start()


def last_set_wins(args: list[str]) -> list[str]:
    """``--set name=value`` pairs, each name once (its last value, as velvet itself would take, with a
    warning in the output the scenarios read)."""
    pairs = dict(args[i + 1].split("=", 1) for i in range(0, len(args), 2) if args[i] == "--set")
    rest = [a for i in range(0, len(args), 2) if args[i] != "--set" for a in args[i:i + 2]]
    return [*rest, *(x for k, v in pairs.items() for x in ("--set", f"{k}={v}"))]


# -- waiting and reading ---------------------------------------------------------------------------

def settle[T](fn: Callable[[], T], done: Callable[[T], bool], timeout: float) -> T:
    """Poll ``fn`` until ``done(value)`` or the timeout; the last value either way (never raises on time)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except Exception:  # the table may not exist yet, the database may be down
            value = None  # type: ignore[assignment]
        if value is not None and done(value):
            return value
        if time.monotonic() >= deadline:
            return value
        time.sleep(0.1)


def calls_by_request_id(url: str, ids: list[str]) -> dict[str, Call]:
    with bound(url):
        out: dict[str, Call] = {}
        for i in range(0, len(ids), 500):
            for c in Call.select().where(Call.request_id.in_(ids[i:i + 500])):
                out[c.request_id] = c
        return out


def stored_ids(url: str, ids: list[str], timeout: float = 30) -> dict[str, Call]:
    """The calls rows of ``ids`` once all are there (or what is there at the timeout)."""
    want = set(ids)
    return settle(lambda: calls_by_request_id(url, ids), lambda got: set(got) >= want, timeout) or {}


def scored_calls(url: str, call_ids: set[int]) -> set[int]:
    """Which of ``call_ids`` have a score (any eval)."""
    with bound(url):
        db = models.Call._meta.database
        return {r[0] for r in db.execute_sql("SELECT call_id FROM scores").fetchall() if r[0] in call_ids}


def count_rows(url: str, model: type[models.Base], *where: Any) -> int:
    with bound(url):
        q = model.select()
        return (q.where(*where) if where else q).count()


def crashes(text: str) -> int:
    """Python tracebacks and interpreter deaths ("Fatal Python error", which prints no traceback) in a log."""
    return text.count("Traceback") + text.count("Fatal Python error")


def tracebacks(*proxies: Proxy) -> int:
    return sum(crashes(p.log_path.read_text(errors="replace")) for p in proxies if p.log_path.exists())


# -- clients ---------------------------------------------------------------------------------------

def _hooks(seen: list[str] | None) -> dict[str, list[Callable[[Any], None]]]:
    """Note the request id of every answer (the stand-in gives each one), to find its row later."""
    if seen is None:
        return {}
    return {"response": [lambda r: seen.append(r.headers.get("x-request-id", "?"))]}


_clients: dict[int, list[Raw]] = {}  # per proxy, closed before it stops (see stop_proxy)


def _trust(proxy: Proxy) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(proxy.ca))


def sdk(proxy: Proxy, timeout: float = 30, seen: list[str] | None = None) -> openai.OpenAI:
    """The official SDK through ``proxy`` (an app configured with an explicit proxy and CA)."""
    http = openai.DefaultHttpxClient(proxy=f"http://127.0.0.1:{proxy.port}", verify=_trust(proxy),
                                     event_hooks=_hooks(seen))
    _clients.setdefault(id(proxy), []).append(http)
    return openai.OpenAI(api_key=API_KEY, base_url="https://api.openai.com/v1", max_retries=0,
                         timeout=timeout, http_client=http)


def raw_client(proxy: Proxy, timeout: float = 30, seen: list[str] | None = None) -> Raw:
    """A plain HTTP client through ``proxy``, for bodies and headers no SDK would send."""
    http = openai.DefaultHttpxClient(proxy=f"http://127.0.0.1:{proxy.port}", verify=_trust(proxy),
                                     timeout=timeout, base_url="https://api.openai.com",
                                     headers={"authorization": f"Bearer {API_KEY}"}, event_hooks=_hooks(seen))
    _clients.setdefault(id(proxy), []).append(http)
    return http


LINGERED: list[str] = []  # writer processes still running well after their mitmdump stopped (then killed)


def stop_proxy(proxy: Proxy, linger: float = 15) -> None:
    """Stop mitmdump, and make sure no process of it outlives the scenario (a writer process still there
    ``linger`` s later is noted in ``LINGERED`` and killed). The clients' connections are closed first:
    mitmproxy logs a traceback for each one still open when it stops (its own, not velvet's), which
    would blur the ``tracebacks`` count."""
    for c in _clients.pop(id(proxy), []):
        with contextlib.suppress(Exception):
            c.close()
    kids = descendants(proxy.proc.pid) if proxy.proc is not None else []
    proxy.stop()
    reap(kids, linger)


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started (and theirs), from /proc (Linux)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for kid in map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split()):
                    out += [kid, *descendants(kid)]
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def reap(pids: list[int], linger: float) -> None:
    """Wait up to ``linger`` s for ``pids`` to end; kill (and note) the ones that do not."""
    deadline = time.monotonic() + linger
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in pids:
        if alive(p):
            LINGERED.append(f"pid {p} still running {linger:.0f} s after its mitmdump stopped")
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


def kill(proxy: Proxy, everything: bool) -> list[int]:
    """SIGKILL mitmdump, and with ``everything`` its writer process too, at the same moment (as when the
    machine or the container goes); the survivors, if any, are returned."""
    assert proxy.proc is not None
    kids = descendants(proxy.proc.pid)
    for pid in kids if everything else []:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    proxy.proc.kill()
    proxy.proc.wait()
    return [] if everything else kids


def request_id(call: Callable[[], Any]) -> tuple[int, str]:
    """Make a call (``with_raw_response``): its status and the ``x-request-id`` the stand-in gave it."""
    try:
        raw = call()
    except openai.APIStatusError as e:
        return e.status_code, e.response.headers["x-request-id"]
    return raw.status_code, raw.headers["x-request-id"]


def chat(client: openai.OpenAI, **kw: Any) -> tuple[int, str]:
    kw.setdefault("model", "gpt-4o-mini")
    kw.setdefault("messages", [{"role": "user", "content": "hello"}])
    return request_id(lambda: client.chat.completions.with_raw_response.create(**kw))



def batch_lines(n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]}}
            for i in range(1, n + 1)]


def run_batch(client: openai.OpenAI, file_id: str, poller: openai.OpenAI | None = None) -> Any:
    """Create a batch and poll it (through ``poller`` if given) until the stand-in completes it."""
    b = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    for _ in range(10):
        b = (poller or client).batches.retrieve(b.id)
        if b.status == "completed":
            break
    return b


class HalfUpload:
    """A streamed multipart upload cut off after half its body: the connection stays open, the flow unfinished."""

    def __init__(self, proxy: Proxy, lines: int = 400) -> None:
        body_lines = jsonl(batch_lines(lines, "half"))
        boundary = "halfboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"half.jsonl\"\r\n\r\n"
                ).encode() + body_lines + f"\r\n--{boundary}--\r\n".encode()
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        raw.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
        assert b" 200 " in raw.recv(4096)
        self.sock = ssl.create_default_context(cafile=str(proxy.ca)).wrap_socket(
            raw, server_hostname="api.openai.com")
        self.sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer " +
                          API_KEY.encode() + b"\r\nContent-Type: multipart/form-data; boundary=" +
                          boundary.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                          b"\r\n\r\n" + body[: len(body) // 2])
        self.size = len(body)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- a PostgreSQL cluster of our own, which a scenario may stop and start ---------------------------

def pg_bindir() -> Path:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout
        d = Path(out.strip())
        if (d / "pg_ctl").exists():
            return d
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "pg_ctl").exists():
            return d
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise RuntimeError("no PostgreSQL server binaries (pg_ctl) found")


class Cluster:
    """``scripts/pg-throwaway start``, with ``down()`` / ``up()`` stopping and starting its server."""

    def __init__(self) -> None:
        out = subprocess.run([str(ROOT / "scripts" / "pg-throwaway"), "start"], capture_output=True, text=True,
                             check=True).stdout.split()
        self.base_url, self.dir = out[0], Path(out[1])
        self.port = int(self.base_url.rsplit(":", 1)[1].split("/")[0])
        self.bin = pg_bindir()

    def _ctl(self, *args: str) -> None:
        cmd = [str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), *args]
        if os.getuid() == 0:  # the cluster belongs to postgres (initdb refuses root)
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True)

    def down(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")

    def up(self) -> None:
        self._ctl("-l", str(self.dir / "server.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c full_page_writes=off", "start")

    def fresh_url(self) -> str:
        """A new schema in the cluster's database (so scenarios sharing the cluster do not mix)."""
        import psycopg

        schema = f"f_{os.urandom(5).hex()}"
        with psycopg.connect(self.base_url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return f"{self.base_url}?options=-csearch_path%3D{schema}"

    def remove(self) -> None:
        subprocess.run([str(ROOT / "scripts" / "pg-throwaway"), "stop", str(self.dir)], check=False,
                       capture_output=True)


class SqliteLock:
    """The SQLite database made unwritable from outside: another process holds its write lock."""

    def __init__(self, url: str) -> None:
        self.path = url.removeprefix("sqlite:///")
        self.conn: sqlite3.Connection | None = None

    def down(self) -> None:
        self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def up(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


# -- scenario: the database goes away under traffic -------------------------------------------------

@dataclass
class Outage:
    outage_s: float
    calls: int = 0  # made in the whole scenario
    during: int = 0  # made while the database was down
    served_during: int = 0
    served: int = 0
    stored: int = 0
    p99_ms_during: float | None = None
    missing: list[str] = field(default_factory=list)
    scored: int = 0  # stored calls scored by the eval (velvet_evals: json_valid on every answer)
    warned: bool = False  # the log said at WARN level that writes were failing
    recovered: bool = False  # and that they recovered
    tracebacks: int = 0


def outage(standin: StandIn, tmp: Path, url: str, down: Callable[[], None], up: Callable[[], None],
           seconds: float, pace: float = 0.05) -> Outage:
    """Calls every ``pace`` s from a client thread; the database is taken ``down`` for ``seconds``, then ``up``.
    An eval (json_valid) scores every answer meanwhile: its scores are counted once the database is back."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "evals.toml").write_text('[[eval]]\nname = "outage"\ncheck = "json_valid"\n')
    proxy = start_proxy(url, standin, tmp, extra=["--set", f"velvet_evals={tmp / 'evals.toml'}"])
    result = Outage(outage_s=seconds)
    made: list[tuple[float, float, int, str]] = []  # start, latency ms, status, request id
    stop = threading.Event()

    def client() -> None:
        with sdk(proxy) as c:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    status, rid = chat(c)
                except openai.APIError:
                    status, rid = 0, ""
                made.append((t, (time.monotonic() - t) * 1000, status, rid))
                time.sleep(max(0.0, pace - (time.monotonic() - t)))

    try:
        worker = threading.Thread(target=client, daemon=True)
        worker.start()
        time.sleep(1.0)
        t_down = time.monotonic()
        down()
        time.sleep(max(0.0, seconds - (time.monotonic() - t_down)))
        up()
        t_up = time.monotonic()
        time.sleep(1.0)
        stop.set()
        worker.join(30)
        ids = [rid for *_, rid in made if rid]
        got = stored_ids(url, ids, timeout=90)  # the writer's back-off may have grown during the outage
        during = [m for m in made if t_down <= m[0] < t_up]
        lat = sorted(m[1] for m in during if m[2] == 200)
        result.calls, result.during = len(made), len(during)
        result.served = sum(m[2] == 200 for m in made)
        result.served_during = len(lat)
        result.p99_ms_during = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None
        result.stored = len(got)
        result.missing = [i for i in ids if i not in got]
        want = {c.id for c in got.values()}
        result.scored = len(settle(lambda: scored_calls(url, want), lambda s: s >= want, 60) or set())
    finally:
        stop.set()
        up_quietly(up)
        stop_proxy(proxy)
    log = proxy.log_path.read_text(errors="replace")
    result.warned, result.recovered = "writes have failed for" in log, "writes recovered" in log
    result.tracebacks = tracebacks(proxy)
    return result


def up_quietly(up: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        up()


# -- scenario: SIGKILL right after answered calls and a streamed upload, and during another upload --

@dataclass
class Kill9:
    calls: int = 0
    calls_lost: int = 0
    calls_stored_at_kill: int = 0
    lines_stored_at_kill: int = 0
    stream_lines: int = 0
    stream_lines_lost: int = 0
    incomplete_recorded: bool = False
    incomplete_rows: list[dict[str, Any]] = field(default_factory=list)
    missing_calls: list[str] = field(default_factory=list)
    half_lines: int = 0  # lines of the cut upload taken as a file's (must be 0)
    tracebacks: int = 0


def kill9(standin: StandIn, tmp: Path, url: str, calls: int = 50, lines: int = 3000, everything: bool = True,
          journal: bool = True, wait: float = 30) -> Kill9:
    """Live calls, a streamed upload (answered) and a streamed upload cut half-way, then SIGKILL at once
    after the last answer, of mitmdump alone or (``everything``) of its writer process too; a new
    mitmdump on the same database and spool dir must finish the work."""
    result = Kill9(calls=calls + 1, stream_lines=lines)
    opts = [*LOW, "--set", f"velvet_journal={str(journal).lower()}"]
    proxy = start_proxy(url, standin, tmp, opts)
    half = HalfUpload(proxy)
    survivors: list[int] = []
    try:
        client = sdk(proxy)
        ids = [chat(client, messages=[{"role": "user", "content": f"call {i}"}])[1] for i in range(calls)]
        data = jsonl(batch_lines(lines, "k9"))
        raw = client.files.with_raw_response.create(file=("k9.jsonl", io.BytesIO(data)), purpose="batch")
        ids.append(raw.headers["x-request-id"])
        file_id = raw.parse().id
        survivors = kill(proxy, everything)  # right after the upload's answer
    finally:
        half.close()
        stop_proxy(proxy)
    # what the killed proxy had written itself: the rest is the restart's work
    with contextlib.suppress(Exception):  # (the tables may not even exist yet)
        result.calls_stored_at_kill = len(calls_by_request_id(url, ids))
        result.lines_stored_at_kill = count_rows(url, BatchRequest, BatchRequest.file_id == file_id)
    again = start_proxy(url, standin, tmp, opts)
    try:
        got = stored_ids(url, ids, timeout=wait)
        result.missing_calls = [i for i in ids if i not in got]
        result.calls_lost = len(result.missing_calls)
        stored = settle(lambda: count_rows(url, BatchRequest, BatchRequest.file_id == file_id),
                        lambda n: n >= lines, wait) or 0
        result.stream_lines_lost = lines - stored

        def cut() -> list[Call]:
            with bound(url):
                return list(Call.select().where(Call.path == "/v1/files", Call.complete == False))  # noqa: E712
        rows = settle(cut, bool, wait / 2) or []
        result.incomplete_rows = [{k: getattr(row, k) for k in ("method", "path", "endpoint", "action", "complete",
                                                               "problem", "request_bytes", "request_id")}
                                  for row in rows]
        result.incomplete_recorded = len(rows) == 1  # the half upload's, and only it
        with bound(url):  # the half upload's lines must not be taken as a file
            result.half_lines = BatchRequest.select().where(BatchRequest.custom_id.startswith("half-")).count()
    finally:
        stop_proxy(again)
        reap(survivors, 0)
    result.tracebacks = tracebacks(again) + tracebacks(proxy)
    return result


@dataclass
class DownAtShutdown:
    calls: int = 0
    lost: int = 0
    lingering: list[str] = field(default_factory=list)


def down_at_shutdown(standin: StandIn, tmp: Path, url: str, down: Callable[[], None], up: Callable[[], None],
                     calls: int = 5, flush_timeout: int = 2) -> DownAtShutdown:
    """mitmdump stopped (SIGINT) while the database is down: within ``velvet_flush_timeout`` (and a few
    seconds of grace) nothing of it may still run; what it accepted is written at the next start."""
    res = DownAtShutdown(calls=calls)
    down()
    try:
        p = start_proxy(url, standin, tmp, flush_timeout=flush_timeout)
        ids = [chat(sdk(p))[1] for _ in range(calls)]
        before = len(LINGERED)
        stop_proxy(p, linger=flush_timeout + 5)
        res.lingering = LINGERED[before:]
    finally:
        up()
    p = start_proxy(url, standin, tmp)
    try:
        res.lost = calls - len(stored_ids(url, ids, timeout=20))
    finally:
        stop_proxy(p)
    return res


# -- scenario: poison values -----------------------------------------------------------------------

RNG_LETTERS = string.ascii_letters + string.digits


def random_text(n: int, seed: int) -> str:
    """Incompressible text (a long repeated letter would compress below PostgreSQL's index limits)."""
    rng = random.Random(seed)
    return "".join(rng.choices(RNG_LETTERS, k=n))


M300 = "m" * 300
M8K = random_text(8000, 1)
BIG = 2**64 - 1  # orjson keeps it an int: beyond BIGINT's signed 64 bits
HUGE = 10**30  # beyond 64 bits: orjson reads it as a float


def chat_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-poison", "object": "chat.completion", "created": int(time.time()), "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    body.update(over)
    return body


def json_bytes(obj: Any) -> bytes:
    """JSON as Python writes it: lone surrogates become ``\\ud800`` escapes, big integers stay integers."""
    return json.dumps(obj).encode()


@dataclass
class Poison:
    """One poison call: ``make`` sends it and returns its request id; ``columns`` are the ``calls``
    columns the poison lands in, with the value sent: stored otherwise, ``problem`` must name the column."""

    name: str
    make: Callable[[openai.OpenAI, Raw, StandIn], str]
    columns: dict[str, Any] = field(default_factory=dict)


def _canned(body: bytes, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None,
            path: str = "/v1/chat/completions", method: str = "POST",
            request: bytes = b'{"model":"gpt-4o-mini","messages":[]}') -> Callable[..., str]:
    """A call the stand-in answers with exactly ``body`` and ``headers``."""

    def make(client: openai.OpenAI, raw: Raw, standin: StandIn) -> str:
        key = standin.can(body, status, headers)
        r = raw.request(method, path, content=request if method == "POST" else None,
                        headers={"content-type": "application/json", "x-standin-canned": key})
        return r.headers["x-request-id"]

    return make


def _sdk_chat(**kw: Any) -> Callable[..., str]:
    def make(client: openai.OpenAI, raw: Raw, standin: StandIn) -> str:
        return chat(client, **kw)[1]

    return make


def _raw_post(body: bytes, path: str = "/v1/chat/completions") -> Callable[..., str]:
    def make(client: openai.OpenAI, raw: Raw, standin: StandIn) -> str:
        r = raw.post(path, content=body, headers={"content-type": "application/json"})
        return r.headers["x-request-id"]

    return make


def _nul_stream(client: openai.OpenAI, raw: Raw, standin: StandIn) -> str:
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini\x00stream", stream=True, messages=[{"role": "user", "content": "a\x00b"}]) as r:
        rid = r.headers["x-request-id"]
        for _ in r.iter_lines():
            pass
    return rid


def _header_bytes(client: openai.OpenAI, raw: Raw, standin: StandIn) -> str:
    # non-UTF-8 request header bytes: mitmproxy decodes them with surrogateescape (lone surrogates)
    r = raw.post("/v1/chat/completions", content=b'{"model":"gpt-4o-mini","messages":[]}',
                 headers=[(b"content-type", b"application/json"), (b"openai-organization", b"org-\xff\xfe"),
                          (b"velvet-metadata-team", b"t\xed\xa0\x80m")])
    return r.headers["x-request-id"]


def _batch_timestamps(client: openai.OpenAI, raw: Raw, standin: StandIn) -> str:
    body = json_bytes({
        "id": "batch_poisontimes", "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
        "input_file_id": "file-poison", "completion_window": "24h", "status": "in_progress",
        "created_at": 10**15, "in_progress_at": -(10**15), "expires_at": BIG, "finalizing_at": 1e300,
        "completed_at": -1, "failed_at": "yesterday", "cancelled_at": None,
        "request_counts": {"total": HUGE, "completed": BIG, "failed": -(10**20)}, "metadata": {"k": "v\x00"},
        "usage": {"input_tokens": BIG, "output_tokens": HUGE, "total_tokens": 1}})
    return _canned(body, path="/v1/batches/batch_poisontimes", method="GET")(client, raw, standin)


POISONS: list[Poison] = [
    Poison("model of 300 characters", _sdk_chat(model=M300),
           {"model_requested": M300, "model": M300}),
    Poison("model of 8,000 random characters (over PostgreSQL's index entry limit)", _sdk_chat(model=M8K),
           {"model_requested": M8K, "model": M8K}),
    Poison("NUL bytes in request strings", _sdk_chat(model="gpt-4o-mini\x00evil",
                                                     messages=[{"role": "user", "content": "a\x00b"}]),
           {"model_requested": "gpt-4o-mini\x00evil", "model": "gpt-4o-mini\x00evil"}),
    Poison("NUL bytes in a streamed answer", _nul_stream,
           {"model_requested": "gpt-4o-mini\x00stream", "model": "gpt-4o-mini\x00stream"}),
    Poison("lone surrogate escapes in the request", _raw_post(json_bytes(  # (the SDK cannot encode them)
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x\ud800y"}]}))),
    Poison("integer beyond 64 bits in the request", _sdk_chat(max_tokens=HUGE)),
    Poison("NUL bytes in response strings", _canned(json_bytes(chat_body(
        model="gpt\x00x", choices=[{"index": 0, "finish_reason": "st\x00op",
                                    "message": {"role": "assistant", "content": "a\x00b"}}]))),
           {"model": "gpt\x00x", "finish_reason": "st\x00op"}),
    Poison("lone surrogate escapes in the response", _canned(json_bytes(chat_body(model="\ud800x")))),
    Poison("token counts beyond 64 bits", _canned(json_bytes(chat_body(
        usage={"prompt_tokens": BIG, "completion_tokens": HUGE, "total_tokens": -(10**20)}))),
           {"input_tokens": BIG, "output_tokens": HUGE}),
    Poison("rate-limit headers beyond 64 bits", _canned(json_bytes(chat_body()), headers=[
        (b"x-ratelimit-limit-requests", b"99999999999999999999999"),
        (b"x-ratelimit-remaining-tokens", b"18446744073709551615"), (b"x-ratelimit-limit-tokens", b"1e999")]),
           {"rl_limit_requests": 99999999999999999999999}),
    Poison("non-UTF-8 response header bytes", _canned(json_bytes(chat_body()), headers=[
        (b"openai-organization", b"org-\xff\xfe\xed\xa0\x80"), (b"openai-project", b"proj-\x80")])),
    Poison("non-UTF-8 request header bytes", _header_bytes),
    Poison("absurd timestamps and counts in a batch object", _batch_timestamps),
    Poison("a huge prompt (3 MB)", _sdk_chat(messages=[{"role": "user", "content": random_text(3_000_000, 2)}])),
    Poison("a huge error message (2 MB) and error code (3,000 characters)", _canned(json_bytes(
        {"error": {"message": random_text(2_000_000, 3), "type": "invalid_request_error",
                   "code": random_text(3000, 4), "param": None}}), status=400)),
]
POISONED_LINES = 7  # in poisoned_batch_file


def poisoned_batch_file() -> bytes:
    """A batch input file whose lines carry the same poisons (the stand-in echoes model and custom_id)."""
    lines = batch_lines(20, "pb")
    lines[2]["custom_id"] = "pb-\x00-3"
    lines[4]["body"]["model"] = M300
    lines[6]["body"]["max_tokens"] = BIG
    lines[8]["body"]["model"] = "gpt-4o-mini\x00x"
    lines[10]["custom_id"] = M8K
    lines[12]["body"]["messages"][0]["content"] = "lone \ud800"  # not valid JSON for orjson: a bad line
    lines[14]["body"]["max_tokens"] = HUGE
    return b"".join(json_bytes(x) + b"\n" for x in lines)


@dataclass
class PoisonRun:
    tried: int = 0  # poison calls and poisoned batch lines
    calls: int = 0  # every call made (poison, batch and normal)
    rows_lost: int = 0  # calls without a row, batch lines without their row
    normal_lost: int = 0  # normal calls after the poison without a row
    uncounted_cuts: list[str] = field(default_factory=list)  # values changed with no word of it in problem
    absurd: list[str] = field(default_factory=list)  # figures computed from values that were cut
    read_side_errors: list[str] = field(default_factory=list)  # velvet commands failing on the poison rows
    missing: list[str] = field(default_factory=list)
    anonymous: list[tuple[str, str]] = field(default_factory=list)  # rows without a request id
    batch_lines_stored: int = 0
    batch_results_stored: int = 0
    batch_results_expected: int = 0
    poison_batch_row: bool = False
    tracebacks: int = 0
    dead_lettered: int = 0


def poison(standin: StandIn, tmp: Path, url: str, normal: int = 5) -> PoisonRun:
    """Every poison call, a batch whose file carries poisons, then ``normal`` plain calls."""
    res = PoisonRun()
    proxy = start_proxy(url, standin, tmp)
    seen: list[str] = []  # every call's request id
    try:
        client, raw = sdk(proxy, timeout=60, seen=seen), raw_client(proxy, timeout=60, seen=seen)
        made, fid, b, normal_ids = _poison_calls(standin, client, raw, normal)
        res.batch_results_expected = b.request_counts.completed if b.request_counts else 0
        res.tried = len(POISONS) + POISONED_LINES
        ids = seen
        got = stored_ids(url, ids, timeout=30)
        res.missing = [made[i].name if i in made else f"call {i}" for i in ids if i not in got]
        if res.missing:  # say what became of them: rows that lost their request id?
            with bound(url):
                res.anonymous = [(c.path, c.problem) for c in Call.select().where(Call.request_id.is_null())]
        res.normal_lost = sum(i not in got for i in normal_ids)
        for rid, p in made.items():
            row = got.get(rid)
            if row is None:
                continue
            for col, sent in p.columns.items():
                stored = getattr(row, col)
                if stored != sent and col not in (row.problem or ""):
                    res.uncounted_cuts.append(f"{p.name}: {col} stored as {str(stored)[:40]!r}, "
                                              f"problem {str(row.problem)[:300]!r} does not name it")
            if row.cost_usd is not None and row.cost_usd > 1:  # a few tokens at most: no absurd figure
                res.absurd.append(f"{p.name}: cost_usd {row.cost_usd}")
        res.read_side_errors = read_side(url, list(made))
        res.batch_lines_stored = settle(lambda: count_rows(url, BatchRequest, BatchRequest.file_id == fid),
                                        lambda n: n >= 20, 30) or 0
        res.batch_results_stored = settle(
            lambda: count_rows(url, BatchResult, BatchResult.file_id == b.output_file_id),
            lambda n: n >= res.batch_results_expected, 30) or 0
        with bound(url):
            res.poison_batch_row = models.Batch.get_or_none(models.Batch.id == "batch_poisontimes") is not None
        res.calls = len(ids)
        res.rows_lost = (len(ids) - len(got)) + (20 - res.batch_lines_stored) + (
            res.batch_results_expected - res.batch_results_stored)
    finally:
        stop_proxy(proxy)
    res.tracebacks = tracebacks(proxy)
    res.dead_lettered = dead_letters(tmp / "spool")
    return res


def _poison_calls(standin: StandIn, client: openai.OpenAI, raw: Raw,
                  normal: int) -> tuple[dict[str, Poison], str, Any, list[str]]:
    made: dict[str, Poison] = {}
    for p in POISONS:
        made[p.make(client, raw, standin)] = p
    up = client.files.create(file=("poison.jsonl", io.BytesIO(poisoned_batch_file())), purpose="batch")
    b = run_batch(client, up.id)
    client.files.content(b.output_file_id).read()
    return made, up.id, b, [chat(client)[1] for _ in range(normal)]


def read_side(url: str, request_ids: list[str]) -> list[str]:
    """Run the ``velvet`` commands people read with over the poisoned rows: each must succeed."""
    from velvet_core.cli import main as velvet

    commands = [["calls", "--json", "--limit", "0"], ["stats", "--json"], ["batches", "--json"],
                ["export", "--format", "jsonl"], ["export", "--lines", "--format", "csv"],
                *(["show", rid, "--json"] for rid in request_ids)]
    failed = []
    for cmd in commands:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = velvet(["--db", url, *cmd])
        except BaseException as e:  # SystemExit from argparse included
            rc = f"{type(e).__name__}: {e}"
        if rc not in (0, None):
            failed.append(f"velvet {' '.join(cmd)}: {rc} {err.getvalue()[-300:]}")
    return failed


def dead_letters(spool: Path) -> int:
    """Records in the dead-letter files under ``spool`` (JSON lines, never deleted), a cut last one too."""
    if not spool.is_dir():
        return 0
    return sum(len(p.read_bytes().splitlines()) for p in spool.rglob("*dead*") if p.is_file())


# -- scenario: fuzzed bodies through the real proxy --------------------------------------------------

POISON_STRINGS = ["\x00", "a\x00b", "\ud800", "\udfff", "x\udcff", "\ufffe", "\u2028", "é", "😀", "",
                  "m" * 300, " " * 5000, "'; DROP TABLE calls; --", "\\u0000"]
POISON_NUMBERS = [0, -1, 2**31, 2**63 - 1, 2**63, BIG, 2**64, HUGE, -(10**30), 1e300, -1e-300, 0.5, 10**15,
                  -(10**15)]
FUZZ_PATHS = [("POST", "/v1/chat/completions"), ("POST", "/v1/responses"), ("POST", "/v1/embeddings"),
              ("POST", "/v1/completions"), ("POST", "/v1/batches"), ("GET", "/v1/batches/batch_fuzz"),
              ("GET", "/v1/batches"), ("GET", "/v1/files/file-fuzz"), ("POST", "/v1/uploads"),
              ("POST", "/v1/moderations"), ("POST", "/v1/images/generations"), ("GET", "/v1/models")]
FIELDS = ["model", "messages", "usage", "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
          "total_tokens", "choices", "finish_reason", "created_at", "in_progress_at", "completed_at",
          "expires_at", "status", "id", "error", "code", "message", "request_counts", "data", "object",
          "custom_id", "stream", "service_tier", "input_file_id", "output_file_id", "bytes", "purpose"]


def fuzz_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 4)
    if kind == 0:
        return rng.choice(POISON_STRINGS) + "".join(rng.choices(RNG_LETTERS, k=rng.randrange(8)))
    if kind == 1:
        return rng.choice(POISON_NUMBERS)
    if kind == 2:
        return rng.choice([None, True, False])
    if kind == 3:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 12)))
    if kind in (4, 5, 6):
        keys = [rng.choice(FIELDS) if rng.random() < 0.8 else rng.choice(POISON_STRINGS)
                for _ in range(rng.randrange(6))]
        return {k: fuzz_value(rng, depth + 1) for k in keys}
    return [fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def fuzz_body(rng: random.Random) -> bytes:
    """A body: mostly JSON objects with the API's field names and poison values, sometimes raw bytes."""
    r = rng.random()
    if r < 0.1:
        return rng.randbytes(rng.randrange(200))
    if r < 0.15:
        return b'{"model": "gpt-4o-mini", "messages": [' * rng.randrange(1, 50)  # truncated, nested
    obj = fuzz_value(rng)
    if not isinstance(obj, dict):
        obj = {"model": obj}
    return json.dumps(obj).encode(errors="surrogatepass")


@dataclass
class FuzzRun:
    requests: int = 0
    rows: int = 0
    missing: int = 0
    tracebacks: int = 0


def fuzz(standin: StandIn, tmp: Path, url: str, n: int, seed: int = 10) -> FuzzRun:
    """``n`` requests with fuzzed bodies, each answered with a fuzzed body (status 200, 400 or 500)."""
    rng = random.Random(seed)
    res = FuzzRun()
    proxy = start_proxy(url, standin, tmp)
    try:
        raw = raw_client(proxy)
        for _ in range(n):
            method, path = rng.choice(FUZZ_PATHS)
            key = standin.can(fuzz_body(rng), rng.choice([200, 200, 200, 400, 500]))
            raw.request(method, path, content=fuzz_body(rng) if method == "POST" else None,
                        headers={"content-type": "application/json", "x-standin-canned": key})
            res.requests += 1
        res.rows = settle(lambda: count_rows(url, Call), lambda c: c >= n, 60) or 0
        res.missing = n - res.rows
    finally:
        stop_proxy(proxy)
    res.tracebacks = tracebacks(proxy)
    return res


# -- scenario: a damaged spool file ------------------------------------------------------------------

def file_digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def spool_files(spool: Path) -> set[Path]:
    """The spool files (not spill files of streamed bodies) in ``spool``."""
    if not spool.is_dir():
        return set()
    return {p for p in spool.iterdir() if p.is_file() and p.suffix == ".pkl"}


@dataclass
class DamagedSpool:
    damaged: int = 0  # files damaged: a spool file with garbage appended, one cut mid-record, a journal
    kept: int = 0  # of those, whose bytes are still in the spool dir after the restart
    left_pending: list[str] = field(default_factory=list)  # still under their name, to be replayed again
    logged: bool = False
    counted: int = 0  # quarantined files ``velvet status --json`` lists
    readable_rows_lost: int = 0  # calls before the damage (in the spool file, the journal), not stored
    tracebacks: int = 0
    log: str = ""


def damaged_spool(standin: StandIn, tmp: Path, url: str, down: Callable[[], None], up: Callable[[], None],
                  calls: int = 3) -> DamagedSpool:
    """While the database is down, a run that stops leaves a spool file, and a run killed with SIGKILL
    leaves its journal. The spool file gets garbage appended, a copy of it is cut mid-record, the
    journal's second entry is damaged. A run with the database up must write what can be read and keep
    the three files (renamed, counted in ``velvet status``, logged), never delete them."""
    from velvet_core.writer.journal import FRAME

    res = DamagedSpool()
    spool = tmp / "spool"
    down()
    try:
        p = start_proxy(url, standin, tmp, ["--set", "velvet_writer=thread"], flush_timeout=1)
        try:  # its writer spools at shutdown what it could not write
            readable = [chat(sdk(p))[1] for _ in range(calls)]
        finally:
            stop_proxy(p)
        p = start_proxy(url, standin, tmp)
        try:
            journaled = [chat(sdk(p))[1] for _ in range(calls)]
            kill(p, everything=True)
        finally:
            stop_proxy(p)
    finally:
        up()
    new = spool_files(spool)
    assert len(new) == 1, f"expected one spool file after a run with the database down: {new}"
    appended = new.pop()
    cut = appended.with_name(appended.name.replace(".pkl", "0.pkl"))  # as if from another run
    data = appended.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with open(appended, "ab") as f:
        f.write(b"\x80\x05garbage that is not a pickle" + os.urandom(64))
    segments = sorted((spool / "journal").glob("journal-*.log"))
    assert len(segments) == 1, f"expected the killed run's journal: {segments}"
    journal = segments[0]
    data = bytearray(journal.read_bytes())
    second = FRAME.size + FRAME.unpack_from(data)[0]  # where the second entry's frame starts
    data[second + FRAME.size: second + FRAME.size + 2] = b"\xff\xff"  # its pickle no longer loads
    journal.write_bytes(bytes(data))
    damaged = (appended, cut, journal)
    digests = {file_digest(p) for p in damaged}
    res.damaged = len(damaged)
    proxy = start_proxy(url, standin, tmp)
    try:
        after = chat(sdk(proxy))[1]
        stored_ids(url, [after], timeout=30)
        want = [*readable, journaled[0]]  # (the journal's entries after the damaged one may be lost)
        got = stored_ids(url, want, timeout=15)
        res.readable_rows_lost = len(want) - len(got)
    finally:
        stop_proxy(proxy)
    held = {file_digest(p) for p in spool.rglob("*") if p.is_file()}
    res.kept = len(digests & held)
    res.left_pending = sorted(p.name for p in damaged if p.exists())
    res.log = proxy.log_path.read_text(errors="replace")
    res.logged = all(p.name in res.log for p in damaged)
    res.counted = len(velvet_status(url, spool).get("quarantined", []))
    res.tracebacks = tracebacks(proxy)
    return res


def velvet_status(url: str, spool: Path) -> dict[str, Any]:
    """``velvet status --json`` for ``url`` and the spool dir ``spool``."""
    cmd = [str(Path(sys.executable).with_name("velvet")), "--db", url, "status", "--spool-dir", str(spool),
           "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    try:
        return json.loads(r.stdout)  # type: ignore[no-any-return]
    except json.JSONDecodeError:
        return {"error": r.stderr[-2000:]}


# -- scenario: a full disk -----------------------------------------------------------------------------

@dataclass
class DiskFull:
    calls: int = 0
    served: int = 0
    stored: int = 0
    upload_served: bool = False
    upload_row_says: str | None = None
    warned: bool = False  # the log said at WARN level that writes were failing
    recovered: bool = False  # and that they recovered
    dead_lettered: int = 0  # a full disk is not bad data: nothing may go to the dead-letter file
    tracebacks: int = 0


def disk_full(standin: StandIn, tmp: Path, calls: int = 40, limit: int = 64 << 10, writer: str = "auto",
              seconds: float = 12) -> DiskFull:
    """SQLite on a "full disk": mitmdump and its writer process may not grow any file past ``limit`` bytes
    (RLIMIT_FSIZE, set from outside; the database is larger already) for ``seconds`` while calls with
    100 kB prompts go through; then space comes back. Long enough for the writer to warn (5 s) and to
    fail five attempts (backoff 0.5, 1, 2, 4 s: 7.5 s after the first), so the outcome does not depend
    on timing."""
    res = DiskFull()
    url = f"sqlite:///{tmp / 'velvet.db'}"
    proxy = start_proxy(url, standin, tmp, [*LOW, "--set", f"velvet_writer={writer}"])
    assert proxy.proc is not None
    limited: dict[int, tuple[int, int]] = {}
    try:
        client = sdk(proxy)
        chat(client)  # the schema is there, the log has started
        for pid in [proxy.proc.pid, *descendants(proxy.proc.pid)]:
            free = resource.prlimit(pid, resource.RLIMIT_FSIZE)
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, free[1]))  # the soft limit: raised again later
            limited[pid] = free
        t_full = time.monotonic()
        ids = []
        for i in range(calls):
            status, rid = chat(client, messages=[{"role": "user", "content": random_text(100_000, 100 + i)}])
            res.served += status == 200
            ids.append(rid)
        try:
            raw = client.files.with_raw_response.create(
                file=("full.jsonl", io.BytesIO(jsonl(batch_lines(20_000, "df")))), purpose="batch")
            ids.append(raw.headers["x-request-id"])
            res.upload_served = bool(raw.parse().id)
            res.served += res.upload_served
        except openai.APIError:
            res.upload_served = False
        res.calls = len(ids)
        time.sleep(max(1.0, seconds - (time.monotonic() - t_full)))
        for pid, free in limited.items():
            with contextlib.suppress(OSError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, free)
        got = stored_ids(url, ids, timeout=30)
        res.stored = len(got)
        row = got.get(ids[-1]) if res.upload_served else None
        res.upload_row_says = row.problem if row else None
    finally:
        for pid, free in limited.items():
            with contextlib.suppress(OSError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, free)
        stop_proxy(proxy)
    log = proxy.log_path.read_text(errors="replace")
    res.warned, res.recovered = "writes have failed for" in log, "writes recovered" in log
    res.dead_lettered = dead_letters(tmp / "spool")
    res.tracebacks = tracebacks(proxy)
    return res


# -- scenario: two proxies sharing one PostgreSQL ---------------------------------------------------------

@dataclass
class Shared:
    lines: int = 0
    lines_lost: int = 0
    results_lost: int = 0
    events: list[str] = field(default_factory=list)
    status: str | None = None
    proxies_seen: int = 0
    tracebacks: int = 0


def shared_pg(standin: StandIn, tmp: Path, url: str, lines: int = 200) -> Shared:
    """A batch uploaded and created through one proxy, polled and downloaded through the other."""
    res = Shared(lines=lines)
    a = start_proxy(url, standin, tmp / "a")
    b = start_proxy(url, standin, tmp / "b")
    try:
        ca, cb = sdk(a), sdk(b)
        f = ca.files.create(file=("shared.jsonl", io.BytesIO(jsonl(batch_lines(lines, "sh")))), purpose="batch")
        batch = run_batch(ca, f.id, poller=cb)
        out = cb.files.content(batch.output_file_id).read()
        n_out = len(out.splitlines())
        res.lines_lost = lines - (settle(lambda: count_rows(url, BatchRequest, BatchRequest.file_id == f.id),
                                         lambda n: n >= lines, 30) or 0)
        res.results_lost = n_out - (settle(
            lambda: count_rows(url, BatchResult, BatchResult.batch_id == batch.id,
                               BatchResult.request.is_null(False)), lambda n: n >= n_out, 30) or 0)

        def seen() -> tuple[str | None, list[str]]:
            with bound(url):
                row = models.Batch.get_or_none(models.Batch.id == batch.id)
                ev = [e.status for e in models.BatchEvent.select().where(models.BatchEvent.batch_id == batch.id)
                      .order_by(models.BatchEvent.id)]
                return (row.status if row else None), ev
        res.status, res.events = settle(seen, lambda s: s[0] == "completed", 30) or (None, [])
        with bound(url), contextlib.suppress(Exception):
            res.proxies_seen = models.ProxyStatus.select().count()
        with bound(url):
            assert File.get_or_none(File.id == f.id) is not None
    finally:
        stop_proxy(a)
        stop_proxy(b)
    res.tracebacks = tracebacks(a, b)
    return res


@dataclass
class PruneUnderTraffic:
    calls: int = 0  # made through the proxy while pruning ran
    stored: int = 0
    old_rows: int = 0  # seeded before: older than the cutoff
    old_left: int = 0
    pruned_rows_per_s: float = 0.0
    longest_prune_transaction_ms: float = 0.0
    tracebacks: int = 0


def _old_batch(db: Any, then: datetime, lines: int) -> int:
    """A batch that ended at ``then``, its input and output lines stored through the store; returns its lines."""
    from velvet_core.storage.ops import BatchSeen, FileSeen, InputDone, OutputDone, RequestLines, ResultLines
    from velvet_core.storage.store import Store

    store = Store(db)
    store.apply([FileSeen({"id": "file-old-in", "purpose": "batch", "first_seen_at": then, "updated_at": then}),
                 RequestLines([{"file_id": "file-old-in", "line_no": i, "custom_id": f"o-{i}", "body": '{"n": 1}'}
                               for i in range(1, lines + 1)]), InputDone("file-old-in")])
    store.apply([BatchSeen({"id": "batch_old", "status": "completed", "endpoint": "/v1/chat/completions",
                            "input_file_id": "file-old-in", "output_file_id": "file-old-out", "created_at": then,
                            "completed_at": then + timedelta(hours=1)}, then + timedelta(hours=1), "retrieve")])
    store.apply([ResultLines([{"file_id": "file-old-out", "line_no": i, "custom_id": f"o-{i}", "status_code": 200,
                               "body": '{"ok": true}', "seen_at": then + timedelta(hours=2)}
                              for i in range(1, lines + 1)]), OutputDone("file-old-out")])
    return 2 * lines


def prune_under_traffic(standin: StandIn, tmp: Path, url: str, old: int = 20_000, pace: float = 0.02,
                        extra_seconds: float = 1.0, partition: str | None = None) -> PruneUnderTraffic:
    """``velvet prune --rows-after`` of ``old`` seeded calls (with bodies) while a client makes calls through a
    running proxy on the same database: every new call stored, every old row gone. With ``partition`` (PostgreSQL)
    the database is first converted (``velvet migrate --partition``): the old days go as whole partitions, and
    the proxy's writer makes its partitions ahead meanwhile."""
    from velvet_core import clock
    from velvet_core.storage.database import open_db
    from velvet_core.storage.prune import prune

    result = PruneUnderTraffic(old_rows=old)
    then = clock.now() - timedelta(days=3)
    db = open_db(url)
    body = orjson.dumps({"messages": [{"role": "user", "content": "y" * 1500}]}).decode()
    with models.use(db), db.atomic():
        for start in range(0, old, 1000):
            models.Call.insert_many([{"flow_id": f"old-{i}", "started_at": then + timedelta(seconds=i),
                                      "method": "POST", "host": "api.openai.com", "path": "/v1/chat/completions",
                                      "endpoint": "chat.completions", "action": "create", "request_body": body,
                                      "response_body": body} for i in range(start, min(old, start + 1000))]
                                    ).execute()
    lines = _old_batch(db, then, max(10, old // 10))  # and a batch that ended then: its lines go too, whole
    if partition:
        from velvet_core.storage import partitions

        partitions.partition(db, partition, clock.now())
    db.close()
    proxy = start_proxy(url, standin, tmp)
    made: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with sdk(proxy) as c:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    made.append(chat(c)[1])
                except openai.APIError:
                    made.append("")
                time.sleep(max(0.0, pace - (time.monotonic() - t)))

    try:
        worker = threading.Thread(target=client, daemon=True)
        worker.start()
        time.sleep(0.5)
        db = open_db(url)
        try:
            done = prune(db, rows_before=clock.now() - timedelta(days=1))
        finally:
            db.close()
        time.sleep(extra_seconds)
        stop.set()
        worker.join(30)
        ids = [i for i in made if i]
        result.calls, result.stored = len(made), len(stored_ids(url, ids, timeout=60))
        result.old_left = count_rows(url, models.Call, models.Call.flow_id.startswith("old-")) \
            + count_rows(url, models.BatchRequest, models.BatchRequest.file_id == "file-old-in") \
            + count_rows(url, models.BatchResult, models.BatchResult.file_id == "file-old-out")
        result.old_rows += lines
        result.pruned_rows_per_s = round(done.calls_pruned / max(done.seconds, 1e-9), 1)
        result.longest_prune_transaction_ms = round(done.longest_transaction_ms, 1)
    finally:
        stop.set()
        stop_proxy(proxy)
    result.tracebacks = tracebacks(proxy)
    return result
