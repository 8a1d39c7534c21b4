"""Benchmarks: plain mitmdump against mitmdump + velvet, alternated in one run, everything on loopback.

Run through ``scripts/bench [--quick] [--json]``. Figures are ratios against the plain proxy (or a bare
baseline) measured in the same run, because these machines are noisy. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ROUTE = ROOT / "tests" / "support" / "standin" / "route.py"
STREAMING = ("--set", "stream_large_bodies=1")  # plain mitmdump, streaming every body

CHAT = orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}})
REQ_BODY = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]})
STREAM_BODY = orjson.dumps({"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "Say hello"}]})


# -- the upstream: a small asyncio HTTP/1.1 server (a separate process, never the bottleneck) -------

def batch_input(n: int, size: int) -> bytes:
    pad = "x" * max(0, size - 160)
    return b"".join(orjson.dumps({"custom_id": f"b-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": "gpt-4o-mini", "messages": [
                                      {"role": "user", "content": f"{i} {pad}"}]}}) + b"\n" for i in range(n))


def batch_output(n: int, size: int) -> bytes:
    pad = "y" * max(0, size - 420)
    return b"".join(orjson.dumps({"id": f"batch_req_{i}", "custom_id": f"b-{i}", "error": None, "response": {
        "status_code": 200, "request_id": f"req_{i}", "body": {
            "id": f"chatcmpl-{i}", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": pad}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 900, "completion_tokens": 950, "total_tokens": 1850}}}}) + b"\n"
        for i in range(n))


async def serve(port: int, lines: int, line_size: int) -> None:
    output = gzip.compress(batch_output(lines, line_size), compresslevel=1)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *hdrs = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                h = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in hdrs if x)}
                size, kept = 0, []  # small bodies are kept (to see "stream"), big ones only counted
                left = int(h.get("content-length", 0))
                while left:
                    got = await reader.read(min(left, 1 << 20))
                    if not got:
                        return
                    size += len(got)
                    left -= len(got)
                    if size <= 65536:
                        kept.append(got)
                body = b"".join(kept)
                if path == "/v1/chat/completions" and b'"stream":true' in body:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    for i in range(4):
                        ev = b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",' \
                             b'"choices":[{"index":0,"delta":{"content":"w%d "}}]}\n\n' % i
                        writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                        await writer.drain()
                        await asyncio.sleep(0.02)
                    end = b"data: [DONE]\n\n"
                    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(end), end))
                elif path == "/v1/chat/completions":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req_b\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(CHAT), CHAT))
                elif path == "/v1/files" and method == "POST":
                    f = orjson.dumps({"id": f"file-up{time.monotonic_ns()}", "object": "file", "bytes": size,
                                      "created_at": int(time.time()), "filename": "bench.jsonl",
                                      "purpose": "batch", "status": "processed"})
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(f), f))
                elif path.endswith("/content"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                                 b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(output))
                    for i in range(0, len(output), 1 << 20):
                        writer.write(output[i:i + (1 << 20)])
                        await writer.drain()
                else:
                    writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# -- processes -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEEPALIVE_CHUNK = 100  # calls per proxy's turn in the cache phase's keep-alive reading (keepalive())
CACHE_REPLICAS = 2  # proxies of each kind in the cache phase (cache_phase())
IDLE_SETTLE = 3.0  # seconds for a writer process to write the last flows and go to sleep (writer/child.py)
PROXY_CPUS: set[int] = set()  # when pinning: the proxies' core; the client and upstream get the others


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (threads created later inherit it)."""
    if not cpus:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


def setup_pinning(enabled: bool, upstream_pid: int) -> bool:
    """Proxies on the last core, this client and the upstream on the others: the proxy is then the
    bottleneck being measured. velvet's writer process runs on the other cores too (off the proxy's), in the
    idle scheduling class: it takes what the client and the upstream leave (on two cores, the same core)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not enabled or len(cpus) < 2:
        return False
    PROXY_CPUS.add(cpus[-1])
    rest = set(cpus[:-1])
    pin(os.getpid(), rest)
    pin(upstream_pid, rest)
    return True


class Proc:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = open(log, "ab")  # noqa: SIM115
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(120)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


def mitmdump(tmp: Path, upstream: int, velvet_db: str | None, name: str,
             extra: tuple[str, ...] = ()) -> tuple[Proc, int]:
    port, confdir = free_port(), tmp / "mitmproxy"
    args = [str(BIN / "mitmdump"), "-q", "-p", str(port), "--listen-host", "127.0.0.1",
            "--set", f"confdir={confdir}", "--set", "connection_strategy=lazy", *extra]
    if velvet_db:
        args += ["-s", str(ROOT / "addon" / "velvet.py"), "--set", f"velvet_db={velvet_db}",
                 "--set", f"velvet_spool_dir={tmp / 'spool'}"]
    args += ["-s", str(ROUTE), "--set", f"standin_url=http://127.0.0.1:{upstream}",
             "--map-remote", rf"|https://api\.openai\.com/|http://127.0.0.1:{upstream}/"]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = Proc(args, tmp / f"{name}.log", env)
    pin(proc.p.pid, PROXY_CPUS)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            sys.exit(f"bench: mitmdump exited; see {tmp / (name + '.log')}")
        try:
            if (confdir / "mitmproxy-ca-cert.pem").exists():
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                pin(proc.p.pid, PROXY_CPUS)  # again: its threads exist now
                return proc, port
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit("bench: mitmdump did not start")


def _stat_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, every thread


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (Linux; NaN elsewhere)."""
    try:
        return _stat_cpu(pid)
    except (OSError, ValueError, IndexError):
        return float("nan")


def children_cpu_seconds(pid: int) -> float:
    """CPU time used so far by the running children of ``pid`` (velvet's writer process)."""
    total = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += _stat_cpu(int(child))
    except OSError:
        return float("nan")
    return total


def runs(pid: int) -> tuple[float, int]:
    """CPU seconds and times scheduled (each a wake-up) so far of every thread of ``pid`` and of its children
    (Linux schedstat, to the nanosecond: an idle process uses less than a clock tick)."""
    def tasks(p: int | str) -> list[Path]:
        try:
            return list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            return []

    kids = [k for t in tasks(pid) for k in _read(t / "children").split()]
    cpu, slices = 0.0, 0
    for task in [t for p in (pid, *kids) for t in tasks(p)]:
        with contextlib.suppress(ValueError, IndexError):
            ns, _, n = _read(task / "schedstat").split()[:3]
            cpu, slices = cpu + int(ns) / 1e9, slices + int(n)
    return cpu, slices


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def idle_phase(procs: dict[str, int], seconds: float) -> dict[str, float]:
    """What idle proxies cost (no traffic, all at once): CPU ms and wake-ups per second, each with its children
    (velvet's writer process); ``idle_cpu_ms_per_s_<name>``, ``idle_wakeups_per_s_<name>``."""
    before = {name: runs(pid) for name, pid in procs.items()}
    time.sleep(seconds)
    out = {}
    for name, pid in procs.items():
        (c0, n0), (c1, n1) = before[name], runs(pid)
        out[f"idle_cpu_ms_per_s_{name}"] = round((c1 - c0) * 1e3 / seconds, 3)
        out[f"idle_wakeups_per_s_{name}"] = round((n1 - n0) / seconds, 1)
    return out


# -- figures -----------------------------------------------------------------------------------------

def paired(base: list[float], other: list[float]) -> list[float]:
    """Each round's ``other`` against ``base`` of the same round (the machine's drift cancels out)."""
    return [o / b for b, o in zip(base, other, strict=True)]


def median_ci(values: list[float], resamples: int = 2000, seed: int = 23) -> list[float]:
    """A 95 % interval for the median of ``values``: a percentile bootstrap, seeded (the same rounds give the same
    interval). On this machine one round's ratio ranges over 0.63-1.40 and the median of 32 still moves by about
    two points from run to run: a figure a point or two from its target says little without it."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [round(meds[int(0.025 * resamples)], 3), round(meds[int(0.975 * resamples) - 1], 3)]


# -- clients ---------------------------------------------------------------------------------------

async def tunnel(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    await writer.start_tls(ctx, server_hostname="api.openai.com")
    return reader, writer


def request(body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-bench-"
            b"0123456789abcdef\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


async def read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
            return
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


async def live(port: int, ctx: ssl.SSLContext, total: int, concurrency: int,
               unique: str = "") -> tuple[float, list[float]]:
    """Many small non-streamed chat calls over keep-alive TLS tunnels: (requests/s, latencies in ms). With
    ``unique``, every request's body differs (a ``user`` field of ``unique`` and a number: a cache miss each)."""
    conns = [await tunnel(port, ctx) for _ in range(concurrency)]
    lat: list[float] = []
    left = [total]
    req = request(REQ_BODY)

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while left[0] > 0:
            left[0] -= 1
            t = time.perf_counter()
            writer.write(request(REQ_BODY[:-1] + b',"user":"%s-%d"}' % (unique.encode(), left[0])) if unique
                         else req)
            await read_response(reader)
            lat.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    elapsed = time.perf_counter() - t0
    for _, w in conns:
        w.close()
    return total / elapsed, lat


async def keepalive(ports: dict[str, list[int]], ctx: ssl.SSLContext, chunks: int, per_chunk: int,
                    concurrency: int, unique: str) -> dict[str, list[float]]:
    """Each kind of proxy's requests/s in ``chunks`` short turns of ``per_chunk`` calls, the kinds in turn (the
    order turning each time; turn ``c`` goes to the ``c``-th of each kind's proxies, in turn), over tunnels
    opened once and kept: no TLS handshake in the measure, and a slower second of the machine falls on
    neighbouring turns of every proxy. On this machine a figure read this way varied about a quarter as much
    from run to run as one read in rounds of 500 calls over new tunnels (session 17, a miss: five runs each,
    standard deviation 0.7 against 3.0 points), and it reads each request's own cost undiluted by handshakes
    (so lower). Every request's body differs (``unique`` and a number)."""
    names = list(ports)
    conns = {n: [[await tunnel(port, ctx) for _ in range(concurrency)] for port in ports[n]] for n in names}
    out: dict[str, list[float]] = {n: [] for n in names}
    seq = [0]

    async def turn(name: str, replica: int) -> float:
        left = [per_chunk]

        async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while left[0] > 0:
                left[0] -= 1
                seq[0] += 1
                writer.write(request(REQ_BODY[:-1] + b',"user":"%s-%d"}' % (unique.encode(), seq[0])))
                await read_response(reader)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(r, w) for r, w in conns[name][replica]))
        return per_chunk / (time.perf_counter() - t0)

    for c in range(chunks):
        for name in names[c % len(names):] + names[:c % len(names)]:
            out[name].append(await turn(name, c % len(ports[name])))
    for n in names:
        for replica in conns[n]:
            for _, w in replica:
                w.close()
    return out


async def ttft(port: int, ctx: ssl.SSLContext, n: int) -> list[float]:
    """Time from sending a streamed chat request to the first SSE bytes at the client, in ms."""
    reader, writer = await tunnel(port, ctx)
    out = []
    req = request(STREAM_BODY)
    for _ in range(n):
        t = time.perf_counter()
        writer.write(req)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"data: ")
        out.append((time.perf_counter() - t) * 1000)
        await reader.readuntil(b"0\r\n\r\n")
    writer.close()
    return out


def sdk(port: int, ca: Path) -> Any:
    import openai

    os.environ.update(HTTPS_PROXY=f"http://127.0.0.1:{port}", SSL_CERT_FILE=str(ca))
    return openai.OpenAI(api_key="sk-bench-0123456789abcdef", max_retries=0, timeout=600)


def wait_lines(db: Path, file_id: str, lines: int, timeout: float = 600) -> float:
    """Poll the velvet database until the upload's file row has all its lines; the time it happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
                row = c.execute("SELECT lines FROM files WHERE id = ?", (file_id,)).fetchone()
            if row and row[0] == lines:
                return time.perf_counter()
        except sqlite3.Error:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{file_id}: lines not stored in {timeout} s")


def baseline_ingest(data: bytes, path: Path) -> float:
    """The bare job: orjson.loads per line + executemany into SQLite (WAL), in 500-row transactions."""
    c = sqlite3.connect(path)
    c.execute("PRAGMA journal_mode=wal")
    c.execute("PRAGMA synchronous=normal")
    c.execute("CREATE TABLE r (id INTEGER PRIMARY KEY, file_id TEXT, line_no INT, custom_id TEXT, method TEXT,"
              " url TEXT, model TEXT, body TEXT, UNIQUE (file_id, line_no))")
    t = time.perf_counter()
    rows = []
    for no, line in enumerate(data.splitlines(), 1):
        o = orjson.loads(line)
        rows.append(("f", no, o["custom_id"], o["method"], o["url"], o["body"]["model"],
                     orjson.dumps(o["body"]).decode()))
        if len(rows) == 500:
            with c:
                c.executemany("INSERT INTO r (file_id, line_no, custom_id, method, url, model, body) "
                              "VALUES (?,?,?,?,?,?,?)", rows)
            rows = []
    with c:
        c.executemany("INSERT INTO r (file_id, line_no, custom_id, method, url, model, body) "
                      "VALUES (?,?,?,?,?,?,?)", rows)
    elapsed = time.perf_counter() - t
    c.close()
    return elapsed


def wait_calls(db: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if count_calls(db) >= n:
                return
        except sqlite3.Error:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{n} calls not stored in {timeout} s")


def count_calls(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return c.execute("SELECT count(*) FROM calls").fetchone()[0]


def wait_lines_pg(url: str, file_id: str, lines: int, timeout: float = 600) -> float:
    """:func:`wait_lines` for a PostgreSQL database."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT lines FROM files WHERE id = %s", (file_id,)).fetchone()
            if row and row[0] == lines:
                return time.perf_counter()
            time.sleep(0.01)
    raise TimeoutError(f"{file_id}: lines not stored in {timeout} s")


def pg_count_calls(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        try:
            row = conn.execute("SELECT count(*) FROM calls").fetchone()
        except psycopg.errors.UndefinedTable:  # the proxy's writer has not made the schema yet
            return 0
        return int(row[0]) if row else 0


def pg_writer_rate(url: str, n: int, spool: Path, count: bool = True, ready: Any = None) -> float:
    """Live calls per second the writer stores into PostgreSQL, fed prepared snapshots straight away.

    The snapshots are what the addon's hooks hand over for a non-streamed chat call (as the tests build
    them); the time runs from the first ``submit`` to the last row committed (``Writer.stop``).
    """
    from velvet_core.parsing.classify import classify
    from velvet_core.processing.processor import Processor
    from velvet_core.storage.snapshot import CallSnapshot
    from velvet_core.writer.writer import Writer

    route = classify("POST", "/v1/chat/completions")
    now = time.time()
    run = os.urandom(4).hex()

    def snap(i: int) -> CallSnapshot:
        t = now + i * 0.001
        return CallSnapshot(
            flow_id=f"pg-{run}-{i}", method="POST", host="api.openai.com", path="/v1/chat/completions",
            route=route,
            key_fingerprint="0123456789ab", tags={}, request_body=REQ_BODY, request_encoding=None,
            request_headers={"content-type": "application/json", "user-agent": "OpenAI/Python 1.99.0"},
            started_at=t, request_end_at=t + 0.0005, status_code=200, first_byte_at=t + 0.02, ended_at=t + 0.021,
            response_headers={"content-type": "application/json", "x-request-id": f"req_{i}",
                              "openai-processing-ms": "20", "x-ratelimit-remaining-requests": "9999"},
            response_body=CHAT, response_encoding=None)

    before = pg_count_calls(url) if count else 0
    processor = Processor()
    writer = Writer(url, processor.operations, spool_dir=spool, queue_size=n + 10, setup=processor.warm)
    writer.start()
    writer.submit(snap(-1))  # connect, migrate and load the prices before the clock starts
    deadline = time.monotonic() + 60
    while writer.written < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    snaps = [snap(i) for i in range(n)]
    if ready is not None:  # (several writers at once: they start together)
        ready.wait()
    t = time.perf_counter()
    for s in snaps:
        writer.submit(s)
    assert writer.stop(timeout=600), "the writer spooled calls: the rate would be wrong"
    elapsed = time.perf_counter() - t
    if count:
        stored = pg_count_calls(url) - before
        assert stored == n + 1, f"{stored} calls stored of {n + 1}"
    return n / elapsed


def pg_writers_rate(url: str, writers: int, n: int, spool: Path) -> float:
    """Calls per second ``writers`` proxies' writers store together into one PostgreSQL (each in its own
    process, fed ``n`` prepared snapshots, started together): the sum of their rates."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=_one_writer, args=(url, n, spool / f"w{i}", ready, results))
             for i in range(writers)]
    for p in procs:
        p.start()
    rates = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(60)
    return sum(rates)


def _one_writer(url: str, n: int, spool: Path, ready: Any, results: Any) -> None:
    results.put(pg_writer_rate(url, n, spool, count=False, ready=ready))


# -- the run ---------------------------------------------------------------------------------------

def cache_phase(tmp: Path, up_port: int, ctx: ssl.SSLContext, rounds: int, per_round: int,
                conc: int, log: Any) -> dict[str, Any]:
    """The response cache: live throughput with velvet_cache=off and with velvet_cache=on where every call is a
    miss (a different body each: a look-up off the event loop, then an entry stored), each against plain mitmdump
    in the same round; then the latency of a hit through the proxy.

    Plain mitmdump is started with them, not the live phase's: a mitmdump process serves calls 1-2.5% faster in
    its first ten thousand or so than once it has served many (session 18: of two plain proxies started together,
    the one that had not first served 8,000 calls served 1.2, 1.9 and 2.4% more per second in three turns of
    6,000 calls each, tunnels kept open; after it had served 16,000 more itself, -2.5 to +0.9%). The live phase's,
    by then some 16,000 calls old, beside new velvet proxies, was in velvet's favour.

    Each kind runs in :data:`CACHE_REPLICAS` processes, round ``r`` (and keep-alive turn ``r``) going to the
    ``r``-th of each kind in turn, as many calls in all: processes started alike differ for good by up to a point
    of throughput (session 22: of four identical proxies, one served 0.2-1.1 points more than the first in each
    of five blocks), which no number of rounds through one process averages out."""
    kinds = {"plain": (None, ()), "off": ("cacheoff", ("--set", "velvet_cache=off")),
             "miss": ("cacheon", ("--set", "velvet_cache=on"))}
    procs: list[Proc] = []
    ports: dict[str, list[int]] = {name: [] for name in kinds}
    try:
        for i in range(CACHE_REPLICAS):  # (started in turn one way, then the other: none always started first)
            for name, (db, extra) in (list(kinds.items()) if i % 2 == 0 else list(kinds.items())[::-1]):
                proc, port = mitmdump(tmp, up_port, db and f"sqlite:///{tmp / f'{db}{i}.db'}", f"cache{name}{i}",
                                      extra)
                procs.append(proc)
                ports[name].append(port)
        log(f"bench: response cache, {rounds} x {per_round:,} calls per kind ({CACHE_REPLICAS} proxies each), "
            f"every call a miss, alternated")
        for kind in ports.values():
            for port in kind:
                asyncio.run(live(port, ctx, 200, conc, unique="warm"))
        res: dict[str, list[float]] = {name: [] for name in ports}
        names = list(ports)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                port = ports[name][r % CACHE_REPLICAS]
                res[name].append(asyncio.run(live(port, ctx, per_round, conc, unique=f"r{r}"))[0])
        off_r, miss_r, own = paired(res["plain"], res["off"]), paired(res["plain"], res["miss"]), \
            paired(res["off"], res["miss"])
        chunks = rounds * per_round // KEEPALIVE_CHUNK
        log(f"bench: the same, {chunks} turns of {KEEPALIVE_CHUNK} calls per kind over tunnels kept open")
        ka = asyncio.run(keepalive(ports, ctx, chunks, KEEPALIVE_CHUNK, conc, "ka"))
        keep = {"cache_off_rps_ratio_keepalive": paired(ka["plain"], ka["off"]),
                "cache_on_miss_rps_ratio_keepalive": paired(ka["plain"], ka["miss"]),
                "cache_miss_over_off_rps_ratio_keepalive": paired(ka["off"], ka["miss"])}
        on_port, plain_port = ports["miss"][0], ports["plain"][0]
        asyncio.run(live(on_port, ctx, 1, 1))  # the answer to repeat, stored by the writer within a second or so
        time.sleep(2.5)
        _, hits = asyncio.run(live(on_port, ctx, 400, 1))
        _, plain_lat = asyncio.run(live(plain_port, ctx, 400, 1))
        return {"cache_off_rps_ratio": round(statistics.median(off_r), 3),
                "cache_on_miss_rps_ratio": round(statistics.median(miss_r), 3),
                "cache_off_rps_ratio_ci95": median_ci(off_r), "cache_on_miss_rps_ratio_ci95": median_ci(miss_r),
                # the cache's own cost: a miss against the cache off, round by round
                "cache_miss_over_off_rps_ratio": round(statistics.median(own), 3),
                "cache_miss_over_off_rps_ratio_ci95": median_ci(own),
                **{k: round(statistics.median(v), 3) for k, v in keep.items()},
                **{f"{k}_ci95": median_ci(v) for k, v in keep.items()},
                "cache_replicas": CACHE_REPLICAS,
                "cache_hit_p50_ms": round(statistics.median(hits), 3),
                "plain_p50_ms_one_client": round(statistics.median(plain_lat), 3),
                "cache_hits_logged": hits_logged(tmp / "cacheon0.db")}
    finally:
        for proc in procs:
            proc.stop()


EVAL_RULES = """
[[eval]]
name = "json"
check = "json_valid"

[[eval]]
name = "mentions"
check = "contains"
text = "hello"
ignore_case = true

[[eval]]
name = "short"
check = "max_chars"
chars = 2000
"""


def evals_phase(tmp: Path, up_port: int, ctx: ssl.SSLContext, rounds: int, per_round: int,
                conc: int, log: Any) -> dict[str, Any]:
    """velvet_evals with three model-free checks at sample 1: live throughput against plain mitmdump in the same
    round (the eval process scores every answer meanwhile); then the same checks run over the stored calls as a
    backfill would (``Evaluator.take``), answers per second on SQLite."""
    rules = tmp / "evals.toml"
    rules.write_text(EVAL_RULES)
    db = tmp / "evals.db"
    plain, plain_port = mitmdump(tmp, up_port, None, "evalsplain")  # (started with it: see cache_phase)
    ev, ev_port = mitmdump(tmp, up_port, f"sqlite:///{db}", "evals", ("--set", f"velvet_evals={rules}"))
    try:
        log(f"bench: velvet_evals (3 checks, every answer), {rounds} x {per_round:,} calls, alternated")
        for port in (plain_port, ev_port):
            asyncio.run(live(port, ctx, 200, conc))
        res: dict[str, list[float]] = {"plain": [], "evals": []}
        ports = {"plain": plain_port, "evals": ev_port}
        names = list(ports)
        for r in range(rounds):
            for name in names[r % 2:] + names[:r % 2]:
                res[name].append(asyncio.run(live(ports[name], ctx, per_round, conc))[0])
        ratios = paired(res["plain"], res["evals"])
    finally:
        ev.stop()
        plain.stop()
    from datetime import datetime

    from velvet_core.evals.engine import Evaluator
    from velvet_core.evals.rules import load_evals
    from velvet_core.storage.database import open_db

    again = tmp / "backfill.toml"  # new names: nothing scored yet
    again.write_text(EVAL_RULES.replace('name = "', 'name = "backfill '))
    conn = open_db(f"sqlite:///{db}")
    try:
        n = int(conn.execute_sql("SELECT COUNT(*) FROM calls").fetchone()[0])
        started = time.perf_counter()
        Evaluator(conn, load_evals(again)).take(since=datetime(2000, 1, 1))
        elapsed = time.perf_counter() - started
        scored = int(conn.execute_sql("SELECT COUNT(*) FROM scores WHERE eval LIKE 'backfill %'").fetchone()[0])
        live_scored = int(conn.execute_sql("SELECT COUNT(*) FROM scores WHERE eval = 'json'").fetchone()[0])
    finally:
        conn.close()
    return {"evals_live_rps_ratio": round(statistics.median(ratios), 3),
            "evals_live_rps_ratio_ci95": median_ci(ratios), "evals_live_scored": live_scored,
            "evals_backfill_answers": n, "evals_backfill_per_s": round(scored / 3 / elapsed, 1)}


def hits_logged(db: Path) -> int:
    time.sleep(1.5)
    with contextlib.closing(sqlite3.connect(db)) as c:
        return int(c.execute("SELECT COUNT(*) FROM calls WHERE cache_hit").fetchone()[0])


def run(quick: bool, log: Any, pinned: bool = True, pg: str | None = None,
        rounds: int | None = None, keep: bool = False) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="velvet-bench-"))
    lines, line_size = (5_000, 4_000) if quick else (50_000, 4_000)
    requests_per_round, default_rounds, conc = (300, 4, 16) if quick else (500, 32, 16)
    rounds = rounds or default_rounds
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--serve", str(up_port), "--lines", str(lines),
                                 "--line-size", str(line_size)], stdout=subprocess.PIPE)
    assert upstream.stdout is not None and upstream.stdout.readline().strip() == b"ready"
    pinned = setup_pinning(pinned, upstream.pid)
    db = tmp / "velvet.db"
    url = f"sqlite:///{db}"
    made = 0
    out: dict[str, Any] = {}
    try:
        plain, plain_port = mitmdump(tmp, up_port, None, "plain")
        velvet, velvet_port = mitmdump(tmp, up_port, url, "velvet")
        # velvet's writer in a thread (as with one core, or in mitmweb), with and without the journal:
        # what the writer process saves the event loop, and what crash safety costs per call
        thread, thread_port = mitmdump(tmp, up_port, f"sqlite:///{tmp / 'thread.db'}", "thread",
                                       ("--set", "velvet_writer=thread"))
        nojournal, nojournal_port = mitmdump(tmp, up_port, f"sqlite:///{tmp / 'nojournal.db'}", "nojournal",
                                             ("--set", "velvet_writer=thread", "--set", "velvet_journal=false"))
        # plain mitmdump buffers SSE; with stream_large_bodies it streams: the fair TTFT baseline
        streaming, streaming_port = mitmdump(tmp, up_port, None, "streaming", STREAMING)
        ctx = ssl.create_default_context(cafile=str(tmp / "mitmproxy" / "mitmproxy-ca-cert.pem"))
        log(f"bench: live calls, {rounds} x {requests_per_round:,} per proxy, {conc} concurrent, alternated")
        res: dict[str, list] = {"plain": [], "velvet": [], "thread": [], "nojournal": []}
        ports = {"plain": plain_port, "velvet": velvet_port, "thread": thread_port, "nojournal": nojournal_port}
        pids = {"plain": plain.p.pid, "velvet": velvet.p.pid, "thread": thread.p.pid, "nojournal": nojournal.p.pid}
        cpu: dict[str, list[float]] = {name: [] for name in ports}  # proxy CPU seconds per call, each round
        writer_cpu: list[float] = []  # velvet's writer process (its child), CPU seconds per call
        for port in ports.values():  # warm up all
            asyncio.run(live(port, ctx, 200, conc))
        made += 200
        names = list(ports)
        for r in range(rounds):
            # the order turns each round, so that no proxy always runs first or right after another (drift)
            for name in names[r % len(names):] + names[:r % len(names)]:
                before, kids = cpu_seconds(pids[name]), children_cpu_seconds(pids[name])
                rps, lat = asyncio.run(live(ports[name], ctx, requests_per_round, conc))
                res[name].append((rps, lat))
                cpu[name].append((cpu_seconds(pids[name]) - before) / requests_per_round)
                if name == "velvet":
                    made += requests_per_round
                    time.sleep(0.2)  # the writer process catches up: its CPU for this round is all counted
                    writer_cpu.append((children_cpu_seconds(pids[name]) - kids) / requests_per_round)
        rps_p = statistics.median(r for r, _ in res["plain"])
        rps_v = statistics.median(r for r, _ in res["velvet"])
        # each velvet round against the plain one of the same round: the machine's drift cancels out
        live_r = paired([p for p, _ in res["plain"]], [v for v, _ in res["velvet"]])
        pair = statistics.median(live_r)
        pair_th = statistics.median(v[0] / p[0] for p, v in zip(res["plain"], res["thread"], strict=True))
        pair_nj = statistics.median(v[0] / p[0] for p, v in zip(res["plain"], res["nojournal"], strict=True))
        journal = statistics.median(v[0] / n[0] for v, n in zip(res["thread"], res["nojournal"], strict=True))
        us = lambda name: statistics.median(cpu[name]) * 1e6  # noqa: E731
        out.update(live_cpu_us_plain=round(us("plain"), 1), live_cpu_us_velvet=round(us("velvet"), 1),
                   live_cpu_ratio=round(statistics.median(
                       v / p for p, v in zip(cpu["plain"], cpu["velvet"], strict=True)), 3),
                   live_cpu_us_thread=round(us("thread"), 1),
                   writer_cpu_us_per_call=round(statistics.median(writer_cpu) * 1e6, 1))
        lat_p = [x for _, lat in res["plain"] for x in lat]
        lat_v = [x for _, lat in res["velvet"] for x in lat]
        q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1]  # noqa: E731
        out.update(live_rps_plain=round(rps_p, 1), live_rps_velvet=round(rps_v, 1),
                   live_rps_ratio=round(pair, 3), live_rps_ratio_ci95=median_ci(live_r),
                   live_p50_ms_ratio=round(q(lat_v, 50) / q(lat_p, 50), 3),
                   live_p95_ms_ratio=round(q(lat_v, 95) / q(lat_p, 95), 3),
                   live_rps_ratio_thread=round(pair_th, 3),  # velvet_writer=thread (journal on)
                   live_rps_ratio_no_journal=round(pair_nj, 3),  # velvet_writer=thread, velvet_journal=false
                   journal_cost=round(1 - journal, 3))  # share of throughput the journal costs (thread writers)
        log("bench: streamed TTFT")
        tt_p, tt_v, tt_s = [], [], []
        for _ in range(3):
            tt_p += asyncio.run(ttft(plain_port, ctx, 10))
            tt_s += asyncio.run(ttft(streaming_port, ctx, 10))
            tt_v += asyncio.run(ttft(velvet_port, ctx, 10))
        made += 30
        out.update(stream_ttft_ms_plain=round(statistics.median(tt_p), 2),
                   stream_ttft_ms_plain_streaming=round(statistics.median(tt_s), 2),
                   stream_ttft_ms_velvet=round(statistics.median(tt_v), 2))
        idle_s = 3.0 if quick else 10.0
        log(f"bench: idle proxies, {idle_s:.0f} s")
        time.sleep(IDLE_SETTLE)  # (the writer process has written the last round, and gone to sleep)
        out.update(idle_phase({"plain": plain.p.pid, "velvet": velvet.p.pid}, idle_s))
        # the live phase's proxies stop here: idle, they still woke on the proxies' core (writer threads)
        for proc in (plain, velvet, thread, nojournal, streaming):
            proc.stop()
        out.update(cache_phase(tmp, up_port, ctx, rounds, requests_per_round, conc, log))
        out.update(evals_phase(tmp, up_port, ctx, rounds, requests_per_round, conc, log))

        data = batch_input(lines, line_size)
        ca = tmp / "mitmproxy" / "mitmproxy-ca-cert.pem"
        log(f"bench: upload of {len(data) / 1e6:.0f} MB / {lines:,} lines, each proxy fresh (peak RSS)")
        for name in ("plain", "plain_streaming", "velvet"):
            proc, port = mitmdump(tmp, up_port, url if name == "velvet" else None, f"up-{name}",
                                  STREAMING if name == "plain_streaming" else ())
            client = sdk(port, ca)
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "warm"}])
            if name == "velvet":  # timed from an idle writer (one busy parsing competes for the GIL)
                made += 1
                wait_calls(db, made)
            cpu0 = children_cpu_seconds(proc.p.pid)
            t = time.perf_counter()
            f = client.files.create(file=("bench.jsonl", io.BytesIO(data)), purpose="batch")
            end = time.perf_counter()
            out[f"upload_s_{name}"] = round(end - t, 3)
            if name == "velvet":
                made += 1
                done = wait_lines(db, f.id, lines)
                out["ingest_s"] = round(done - end, 3)
                # the writer process's CPU for parsing and storing it (0 with a writer thread); what ingest_s has
                # beyond it is waiting: the disk (SQLite's WAL and its checkpoints) and the journal's poll
                out["ingest_writer_cpu_s"] = round(children_cpu_seconds(proc.p.pid) - cpu0, 3)
                ours = lines / (done - end)  # velvet parses a streamed body once its flow is over
            out[f"upload_rss_mb_{name}"] = round(proc.peak_rss_mb(), 1)
            proc.stop()
        out.update(upload_mb=round(len(data) / 1e6, 1), upload_lines=lines)
        from scale import pg_schema, postgres

        with postgres(pg, log) as pg_base, pg_schema(pg_base, keep=False) as pg_url:
            log("bench: the same upload through mitmdump + velvet writing to PostgreSQL")
            proc, port = mitmdump(tmp, up_port, pg_url, "up-velvet-pg")
            try:
                client = sdk(port, ca)
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "warm"}])
                deadline = time.monotonic() + 60
                while pg_count_calls(pg_url) < 1 and time.monotonic() < deadline:  # an idle writer, as above
                    time.sleep(0.02)
                t = time.perf_counter()
                f = client.files.create(file=("bench.jsonl", io.BytesIO(data)), purpose="batch")
                end = time.perf_counter()
                out["upload_s_velvet_pg"] = round(end - t, 3)
                out["ingest_s_pg"] = round(wait_lines_pg(pg_url, f.id, lines) - end, 3)
            finally:
                proc.stop()
            n = 5_000 if quick else 20_000
            log(f"bench: the writer alone, {n:,} prepared live-call snapshots into PostgreSQL")
            out["pg_calls_per_s"] = round(pg_writer_rate(pg_url, n, tmp / "spool-pg"), 1)
            log(f"bench: the writer alone, {n:,} snapshots into a PostgreSQL database with calls partitioned")
            os.environ["VELVET_PG_PARTITIONS"] = "month"  # (velvet_pg_partitions, as the proxy passes it on)
            try:
                with pg_schema(pg_base, keep=False) as parted:
                    out["pg_calls_per_s_partitioned"] = round(pg_writer_rate(parted, n, tmp / "spool-parted"), 1)
            finally:
                del os.environ["VELVET_PG_PARTITIONS"]
            for k in (2, 4):  # several proxies on one PostgreSQL: the sum of their writers' rates
                log(f"bench: {k} writers at once, {n:,} snapshots each, into one PostgreSQL")
                with pg_schema(pg_base, keep=False) as shared:
                    rate = pg_writers_rate(shared, k, n, tmp / f"spool-{k}")
                out[f"pg_calls_per_s_{k}_writers"] = round(rate, 1)
            with pg_schema(pg_base, keep=False) as small_pg:
                log("bench: velvet commands end to end, median of 10 runs each, beside a bare python")
                out.update(cli_ms({"sqlite": f"sqlite:///{tmp / 'small.db'}", "pg": small_pg}))
        base = baseline_ingest(data, tmp / "baseline.db")
        out["ingest_lines_per_s_ratio"] = round(ours / (lines / base), 3)
        out["ingest_baseline_s"] = round(base, 3)
        del data

        log("bench: download of the gzip output file, 3 times through each proxy (median; fresh proxies)")
        for name in ("plain", "velvet"):
            proc, port = mitmdump(tmp, up_port, url if name == "velvet" else None, f"down-{name}")
            client = sdk(port, ca)
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "warm"}])
            times = []
            for _ in range(3):
                if name == "velvet":  # each timed from an idle writer (the last download parsed)
                    made += 1
                    wait_calls(db, made)
                t = time.perf_counter()
                body = client.files.content("file-out").read()
                times.append(time.perf_counter() - t)
            out[f"download_s_{name}"] = round(statistics.median(times), 3)
            if name == "velvet":
                made += 1
                wait_calls(db, made)
                out["download_rss_mb_velvet"] = round(proc.peak_rss_mb(), 1)
            proc.stop()
        out["download_mb"] = round(len(body) / 1e6, 1)
        out["rows_lost"] = made - count_calls(db)
        out["calls_made"] = made
    finally:
        upstream.terminate()
        upstream.wait()
        if keep:
            log(f"bench: kept {tmp}")
        else:  # (a full run leaves about 700 MB: the databases, the uploads' spill files, the proxies' logs)
            shutil.rmtree(tmp, ignore_errors=True)
    out["machine"] = f"{os.cpu_count()} cores, {_mem_gb():.0f} GB, Python {sys.version.split()[0]}"
    out["quick"] = quick
    out["live_rounds"] = rounds
    out["pinned"] = pinned
    return out


def cli_ms(urls: dict[str, str], runs: int = 10) -> dict[str, float]:
    """What a user waits for a command (start-up included): medians in ms of ``runs`` runs, each command's
    figure beside a bare ``python -c pass`` of the same venv, alternated in the same loop."""
    from velvet_core.storage.database import open_db
    from velvet_core.storage.models import Call, use

    velvet = str(Path(sys.executable).parent / "velvet")
    for url in urls.values():  # a small database: the schema and a handful of calls
        with use(open_db(url)) as db, db.atomic():
            Call.insert_many([{"flow_id": f"bench-{i}", "started_at": datetime(2026, 12, 1 + i % 5, 10),
                               "method": "POST", "host": "api.openai.com", "path": "/v1/chat/completions",
                               "endpoint": "chat.completions", "action": "create", "model": "gpt-4o-mini",
                               "status_code": 200} for i in range(20)]).execute()
        db.close()
    # the package's bytecode, as pip writes it on install: where PYTHONDONTWRITEBYTECODE is set (this machine sets
    # it) a checkout's modules were compiled again by every command, 48 of them for `stats`: about 30 ms
    import compileall

    import velvet_core

    compileall.compile_dir(str(Path(velvet_core.__file__).parent), quiet=1)
    commands = {"bare_python": [sys.executable, "-c", "pass"], "version": [velvet, "--version"]}
    for backend, url in urls.items():
        for cmd in ("batches", "stats"):
            commands[f"{cmd}_{backend}"] = [velvet, "--db", url, cmd, "--json"]
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            t = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            times[name].append((time.perf_counter() - t) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {f"cli_ms_{k}": round(v, 1) for k, v in med.items()}
    out.update({f"cli_ms_{k}_over_bare": round(v - med["bare_python"], 1) for k, v in med.items()
                if k != "bare_python"})
    return out


def _mem_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _ci(r: dict[str, Any], key: str) -> str:
    lo, hi = r[f"{key}_ci95"]
    return f"{r[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _idle(r: dict[str, Any], name: str) -> str:
    return f"{r[f'idle_cpu_ms_per_s_{name}']} / {r[f'idle_wakeups_per_s_{name}']}"


def table(r: dict[str, Any]) -> str:
    rows = [
        ("live calls/s", r["live_rps_plain"], r["live_rps_velvet"], f"ratio {r['live_rps_ratio']:.2f}"),
        ("live calls/s ratio, 95 % interval", "", "", _ci(r, "live_rps_ratio")),
        ("cache off / a miss, calls/s ratio", "", "",
         f"{_ci(r, 'cache_off_rps_ratio')}; {_ci(r, 'cache_on_miss_rps_ratio')}"),
        ("the same, over tunnels kept open", "", "",
         f"{_ci(r, 'cache_off_rps_ratio_keepalive')}; {_ci(r, 'cache_on_miss_rps_ratio_keepalive')}"),
        ("cache hit through the proxy, p50 ms", r["plain_p50_ms_one_client"], r["cache_hit_p50_ms"],
         f"{r['cache_hits_logged']} hits logged"),
        ("velvet_evals (3 checks), calls/s ratio", "", "", _ci(r, "evals_live_rps_ratio")),
        ("live latency p50 / p95", "", "", f"ratios {r['live_p50_ms_ratio']:.2f} / {r['live_p95_ms_ratio']:.2f}"),
        ("proxy CPU per live call, µs", r["live_cpu_us_plain"], r["live_cpu_us_velvet"],
         f"ratio {r['live_cpu_ratio']:.2f}; writer process {r['writer_cpu_us_per_call']} µs on the other core"),
        ("idle proxy: CPU ms / wake-ups per s", _idle(r, "plain"), _idle(r, "velvet"),
         "velvet's with its writer process"),
        ("stream TTFT ms (median)", r["stream_ttft_ms_plain"], r["stream_ttft_ms_velvet"],
         f"plain streaming {r['stream_ttft_ms_plain_streaming']} ms"),
        (f"upload {r['upload_mb']} MB / {r['upload_lines']:,} lines, s", r["upload_s_plain"], r["upload_s_velvet"],
         f"ratio {r['upload_s_velvet'] / r['upload_s_plain']:.2f}"),
        ("upload peak RSS MB", r["upload_rss_mb_plain"], r["upload_rss_mb_velvet"],
         f"plain streaming {r['upload_s_plain_streaming']} s, {r['upload_rss_mb_plain_streaming']} MB"),
        ("ingest after upload end, s", "", r["ingest_s"],
         f"rate ratio {r['ingest_lines_per_s_ratio']:.2f} vs bare ({r['ingest_baseline_s']} s); "
         f"writer CPU {r['ingest_writer_cpu_s']} s"),
        (f"download {r['download_mb']} MB (gzip), s", r["download_s_plain"], r["download_s_velvet"],
         f"velvet peak RSS {r['download_rss_mb_velvet']} MB"),
        ("ingest into PostgreSQL, s", "", r["ingest_s_pg"], f"upload {r['upload_s_velvet_pg']} s"),
        ("writer into PostgreSQL, calls/s", "", r["pg_calls_per_s"], "prepared snapshots, writer alone"),
        ("rows lost", "", r["rows_lost"], f"of {r['calls_made']:,} calls"),
        ("velvet --version, ms over bare python", "", r["cli_ms_version_over_bare"],
         f"bare python {r['cli_ms_bare_python']} ms (medians of 10)"),
        ("velvet batches / stats --json, ms over bare", "",
         f"{r['cli_ms_batches_sqlite_over_bare']} / {r['cli_ms_stats_sqlite_over_bare']}",
         f"SQLite; PostgreSQL {r['cli_ms_batches_pg_over_bare']} / {r['cli_ms_stats_pg_over_bare']}"),
    ]
    w = max(len(x[0]) for x in rows)
    lines = [f"{'':<{w}}  {'plain':>10}  {'velvet':>10}", ""]
    lines += [f"{a:<{w}}  {b!s:>10}  {c!s:>10}  {d}" for a, b, c, d in rows]
    return "\n".join(lines) + (f"\n\n{r['machine']}{' (quick)' if r['quick'] else ''}"
                               f"{', proxies pinned to their own core' if r.get('pinned') else ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description="velvet benchmarks (see docs/benchmarks.md)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    ap.add_argument("--rounds", type=int, help="live rounds per proxy (default 32; --quick 4): more for a tighter "
                                               "median on a noisy machine")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the proxies to their own core (default: pinned when there are 2+ cores)")
    ap.add_argument("--scale", action="store_true",
                    help="query times on a big database (10 M batch lines, 1 M calls) on SQLite and PostgreSQL")
    ap.add_argument("--lines", type=int, help="with --scale: batch lines (default 10,000,000; --quick 60,000)")
    ap.add_argument("--calls", type=int,
                    help="with --scale: live calls (default a tenth of --lines; --quick 25,000)")
    ap.add_argument("--pg", metavar="URL",
                    help="PostgreSQL to use (default $VELVET_TEST_PG, else a throwaway one)")
    ap.add_argument("--keep", action="store_true", help="keep the databases built (and a run's logs and files)")
    ap.add_argument("--bodies", choices=("none", "small", "real"), default="small",
                    help="with --scale: request and answer bodies: none, small (100-300 bytes, the default) or "
                         "real (a 1.5 kB prompt, an 800-byte answer)")
    ap.add_argument("--backend", choices=("both", "sqlite", "pg"), default="both",
                    help="with --scale: which backends to build and time (default both)")
    ap.add_argument("--partition", choices=("month", "week", "day"),
                    help="with --scale: convert the PostgreSQL database's calls to partitions (velvet migrate "
                         "--partition) after the build, and time it")
    ap.add_argument("--partitioned", choices=("month", "week", "day"),
                    help="with --scale: build the PostgreSQL database partitioned by this period from the start "
                         "(velvet_pg_partitions: no conversion, no second copy on disk)")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--line-size", type=int, default=4_000, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        asyncio.run(serve(a.serve, a.lines or 50_000, a.line_size))
        return 0
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.scale:
        from scale import run_scale

        # --quick: small enough for the test suite, big enough that stats reads the rollups (> EXACT_CALLS)
        lines = a.lines or (60_000 if a.quick else 10_000_000)
        calls = a.calls if a.calls is not None else 25_000 if a.quick and not a.lines else lines // 10
        r = run_scale(lines, calls, a.pg, a.keep, log, a.bodies, a.backend, a.partition, a.partitioned)
        print(json.dumps(r, indent=2) if a.json else "\n".join(f"{k:<28} {v}" for k, v in r.items()))
        return 0
    for k in [k for k in os.environ if "proxy" in k.lower()]:
        del os.environ[k]
    r = run(a.quick, log, pinned=not a.no_pin, pg=a.pg, rounds=a.rounds, keep=a.keep)
    print(json.dumps(r, indent=2) if a.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
