"""The end-to-end rig: a real mitmdump subprocess with the addon, and SDK clients through it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import openai
from velvet_core.storage import models
from velvet_core.storage.database import connect

ROOT = Path(__file__).resolve().parents[2]
ADDON = ROOT / "addon" / "velvet.py"
ROUTE = ROOT / "tests" / "support" / "standin" / "route.py"  # streamed requests skip map_remote
MITMDUMP = Path(sys.executable).with_name("mitmdump")
API_KEY = "sk-test-" + "k" * 40
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """``mitmdump -s addon/velvet.py`` with ``map_remote`` from api.openai.com (and any other ``hosts``
    the stand-in plays) to ``upstream``; ``mode`` is mitmproxy's ``--mode`` (regular by default)."""

    def __init__(self, db_url: str, upstream: str, tmp: Path, extra: list[str] | None = None,
                 program: Path = MITMDUMP, mode: str | None = None,
                 hosts: Sequence[str] = ("api.openai.com",)) -> None:
        self.db_url = db_url
        self.upstream = upstream
        self.tmp = tmp
        self.extra = extra or []
        self.program = program
        self.mode = mode
        self.hosts = list(hosts)
        self.port = free_port()
        self.confdir = tmp / "mitmproxy"
        self.log_path = tmp / "mitmdump.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def command(self) -> list[str]:
        return [
            str(self.program), "-p", str(self.port), "--listen-host", "127.0.0.1",
            "--set", f"confdir={self.confdir}", "-s", str(ADDON),
            "--set", f"velvet_db={self.db_url}", "--set", f"velvet_spool_dir={self.tmp / 'spool'}",
            "--set", "connection_strategy=lazy",
            *(["--mode", self.mode] if self.mode else []),
            *[a for h in self.hosts for a in ("--map-remote", f"|https://{re.escape(h)}/|{self.upstream}/")],
            "-s", str(ROUTE), "--set", f"standin_url={self.upstream}",
            *[a for h in self.hosts for a in ("--set", f"standin_hosts={h}")],
            *self.extra,
        ]

    def start(self) -> Proxy:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited: {self.output()}")
            if self.ca.exists():
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                    return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"mitmdump did not start: {self.output()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        self.log.close()
        return rc

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    @property
    def base_url(self) -> str:
        """What a client's ``OPENAI_BASE_URL`` is in reverse mode."""
        return f"http://127.0.0.1:{self.port}/v1"

    def env(self) -> dict[str, str]:
        if self.mode and self.mode.startswith("reverse:"):
            return {"OPENAI_BASE_URL": self.base_url}  # plain HTTP to the proxy: no CA to trust
        return {"HTTPS_PROXY": f"http://127.0.0.1:{self.port}", "SSL_CERT_FILE": str(self.ca)}

    def client(self, monkeypatch: Any, **kw: Any) -> openai.OpenAI:
        """The official SDK, configured only through the environment as a user's app would be."""
        for k in list(os.environ):
            if "proxy" in k.lower() or k.startswith("OPENAI_"):
                monkeypatch.delenv(k)
        for k, v in self.env().items():
            monkeypatch.setenv(k, v)
        kw.setdefault("timeout", 30)
        return openai.OpenAI(api_key=kw.pop("api_key", API_KEY), max_retries=0, **kw)


@contextmanager
def bound(url: str) -> Iterator[None]:
    """Bind the models to a separate connection to ``url`` for assertions."""
    db = connect(url)
    with models.use(db):
        db.connect()
        try:
            yield
        finally:
            db.close()


# How long a test waits for what a proxy writes, at most. Generous: the writer process runs idle-class
# (``writer/child.give_way``), so on a machine whose cores other work keeps busy (the suite runs two files at once)
# it writes nothing until they idle (3 busy loops on 2 cores held a proxy's first rows back 47 s); a passing test
# waits no longer for it.
WAIT = 60.0


def wait_for[T](fn: Callable[[], T], timeout: float = WAIT, what: str = "condition") -> T:
    """Poll ``fn`` until it returns something truthy, for ``timeout`` seconds at most (:data:`WAIT`)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as e:  # the table may not exist yet
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def call_row(url: str, request_id: str, timeout: float = WAIT) -> models.Call:
    def get() -> models.Call | None:
        with bound(url):
            return models.Call.get_or_none(models.Call.request_id == request_id)

    return wait_for(get, timeout, f"call {request_id}")


def stored_batch(url: str, batch_id: str, results: int, timeout: float = WAIT) -> dict[str, Any]:
    """What velvet stored of a batch once ``results`` output/error lines are in, as plain data to compare
    with what a client saw: the input lines' custom_ids in order, the result lines by custom_id."""

    def get() -> dict[str, Any] | None:
        with bound(url):
            b = models.Batch.get_or_none(models.Batch.id == batch_id)
            res = list(models.BatchResult.select().where(models.BatchResult.batch_id == batch_id))
            if b is None or len(res) < results:
                return None
            reqs = list(models.BatchRequest.select().where(models.BatchRequest.file_id == b.input_file_id)
                        .order_by(models.BatchRequest.line_no))
            by_row = {r.id: r.custom_id for r in reqs}
            files = {f.id: f for f in models.File.select().where(
                models.File.id.in_([x for x in (b.input_file_id, b.output_file_id, b.error_file_id) if x]))}
            return {
                "batch": b, "files": files,
                "request_counts": {"total": b.request_total, "completed": b.request_completed,
                                   "failed": b.request_failed},
                "custom_ids": [r.custom_id for r in reqs],
                "results": {r.custom_id: r for r in res},
                # the input line each answer was linked to
                "matched": {r.custom_id: by_row.get(r.request_row_id) for r in res},
                "events": [e.status for e in models.BatchEvent.select().where(
                    models.BatchEvent.batch_id == batch_id).order_by(models.BatchEvent.id)],
            }

    return wait_for(get, timeout, f"batch {batch_id} with {results} result lines")
