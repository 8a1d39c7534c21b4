"""The proxy's background process: answer checks and judges (``velvet_evals``) and open batches kept current
(``velvet_refresh``), in a process of its own at the lowest priority (as the writer's): this work never competes
with the proxy's event loop, and a backlog never delays logging. Its API requests go through the proxy itself, so
they are logged like any other. It stops when the proxy closes its stdin (at shutdown, or when the proxy dies).

Run by the addon as ``python -m velvet_core.jobs.worker``; not a command for people. The database URL comes in the
environment (a command line, password included, is visible to every user); API keys are read from the variables
named, when needed, and never stored.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ENV_DB = "VELVET_JOBS_DB"
STEP = 1.0  # seconds between two looks for new answers
log = logging.getLogger("velvet")


class JobsProcess:
    """The proxy's side: start the process, and stop it (stdin closed)."""

    def __init__(self, url: str, args: list[str]) -> None:
        self.url = url
        self.args = [sys.executable, "-m", "velvet_core.jobs.worker", "--parent", str(os.getpid()), *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        package = str(Path(__file__).resolve().parent.parent.parent)
        paths = [package, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), ENV_DB: self.url}
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, env=env)
        # reaped as soon as it ends (with nothing to do, at once): never a zombie beside the proxy until it stops
        threading.Thread(target=self.proc.wait, name="velvet-jobs-reaper", daemon=True).start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def route_args(options: Any) -> list[str]:
    """How the background process reaches the API through this proxy: its base URL in reverse mode, else the
    proxy's address and the CA it signs with."""
    from mitmproxy.proxy import mode_specs

    try:
        mode = mode_specs.ProxyMode.parse((options.mode or ["regular"])[0])
    except ValueError:
        return []
    host = mode.custom_listen_host or options.listen_host or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    port = mode.listen_port(options.listen_port)
    if isinstance(mode, mode_specs.ReverseMode):
        return ["--base-url", f"http://{host}:{port}/v1"]
    if isinstance(mode, mode_specs.RegularMode):
        ca = Path(options.confdir).expanduser() / "mitmproxy-ca-cert.pem"
        return ["--proxy", f"http://{host}:{port}", "--ca", str(ca)]
    return []


def _refresh_state(db: Any, state: dict[str, Any]) -> None:
    """What ``velvet status`` shows of the refresh (``velvet_meta`` key ``refresh``)."""
    import orjson

    from velvet_core.storage.sql import set_meta

    set_meta(db, "refresh", orjson.dumps(state).decode())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="velvet-jobs", description=__doc__)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--rules", help="velvet_evals: the [[eval]] rules file")
    ap.add_argument("--interval", type=float, default=60.0, help="velvet_eval_interval")
    ap.add_argument("--key-env", default="OPENAI_API_KEY", help="velvet_eval_key_env")
    ap.add_argument("--refresh", type=float, default=0.0, help="velvet_refresh (0: off)")
    ap.add_argument("--refresh-key-env", default="OPENAI_API_KEY")
    ap.add_argument("--refresh-download", action="store_true")
    ap.add_argument("--prices", default="")
    ap.add_argument("--base-url")
    ap.add_argument("--proxy")
    ap.add_argument("--ca")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from velvet_core import clock
    from velvet_core.api.client import Client
    from velvet_core.cost.prices import Pricer
    from velvet_core.evals.engine import Evaluator, Route
    from velvet_core.evals.rules import load_evals
    from velvet_core.pids import until_stdin_ends
    from velvet_core.redact import redact
    from velvet_core.storage.database import open_db
    from velvet_core.sync.refresh import Refresher
    from velvet_core.writer.child import give_way

    give_way(a.parent)
    url = os.environ[ENV_DB]
    evals = load_evals(a.rules) if a.rules else None
    proxy = f"{socket.gethostname()}:{a.parent}"
    refresh_key = os.environ.get(a.refresh_key_env) if a.refresh > 0 else None
    if a.refresh > 0 and not refresh_key:
        log.warning("velvet: velvet_refresh is off: $%s is not set", a.refresh_key_env)
    off = {"proxy": proxy, "state": "off", "interval": a.refresh, "at": clock.now().isoformat(timespec="seconds")
           + "Z", "why": "velvet_refresh is 0" if a.refresh <= 0 else f"${a.refresh_key_env} is not set"}
    stopping = threading.Event()

    until_stdin_ends(stopping)  # (the proxy is stopping, or gone)
    route = Route(a.base_url, a.proxy, a.ca)
    ev: Evaluator | None = None
    refresher: Refresher | None = None
    db: Any = None
    failing = False
    while not stopping.is_set():
        try:
            if db is None:
                db = open_db(url)
                if not refresh_key:
                    _refresh_state(db, off)
                    if evals is None:
                        break  # nothing else to do
            if evals is not None:
                if ev is None:
                    ev = Evaluator(db, evals, Pricer.from_file(a.prices or None), route, a.key_env, a.interval)
                ev.take()
                ev.judge_step()
            if refresh_key:
                if refresher is None:
                    refresher = Refresher(db, Client(refresh_key, base_url=route.base_url, max_retries=1,
                                                     timeout=300.0, proxy=route.proxy, ca_file=route.ca_file),
                                          a.refresh, a.refresh_download)
                if refresher.due():
                    try:
                        last = refresher.step()  # (its next round is set, whatever happens)
                    except Exception as e:  # the API unreachable, say: the next round will tell
                        log.warning("velvet: refresh: %s: %s", type(e).__name__, redact(str(e))[:300])
                        last = {"error": redact(str(e))[:300]}
                    _refresh_state(db, {"proxy": proxy, "state": "on", "interval": a.refresh,
                                        "download": a.refresh_download, **last})
            if failing:
                log.info("velvet: background jobs: the database answers again")
            failing = False
        except Exception as e:  # an outage (or the API down): try again at the next step, with a new connection
            if not failing:
                log.warning("velvet: background jobs: %s: %s (retrying)", type(e).__name__, redact(str(e))[:300])
            failing = True
            if ev is not None:
                ev.close()
            if refresher is not None:
                refresher.client.close()
            with contextlib.suppress(Exception):
                if db is not None:
                    db.close()
            ev, refresher, db = None, None, None
        stopping.wait(STEP)
    if ev is not None:
        ev.close()
    if refresher is not None:
        refresher.client.close()
    if db is not None:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
