"""The proxy's eval process: checks each new answer within seconds of its row, and runs the judges, in a process of
its own at the lowest priority (as the writer's): scoring never competes with the proxy's event loop, and a backlog
never delays logging. It stops when the proxy closes its stdin (at shutdown, or when the proxy dies).

Run by the addon as ``python -m velvet_core.evals.worker``; not a command for people. The database URL comes in
the environment (a command line, password included, is visible to every user).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ENV_DB = "VELVET_EVALS_DB"
STEP = 1.0  # seconds between two looks for new answers
log = logging.getLogger("velvet")


class EvalProcess:
    """The proxy's side: start the process, and stop it (stdin closed)."""

    def __init__(self, url: str, args: list[str]) -> None:
        self.url = url
        self.args = [sys.executable, "-m", "velvet_core.evals.worker", "--parent", str(os.getpid()), *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        package = str(Path(__file__).resolve().parent.parent.parent)
        paths = [package, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), ENV_DB: self.url}
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, env=env)

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
    """How the eval process reaches the API through this proxy: its base URL in reverse mode, else the proxy's
    address and the CA it signs with."""
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="velvet-evals", description=__doc__)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--rules", required=True)
    ap.add_argument("--interval", type=float, default=60.0)
    ap.add_argument("--key-env", default="OPENAI_API_KEY")
    ap.add_argument("--prices", default="")
    ap.add_argument("--base-url")
    ap.add_argument("--proxy")
    ap.add_argument("--ca")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from velvet_core.cost.prices import Pricer
    from velvet_core.evals.engine import Evaluator, Route
    from velvet_core.evals.rules import load_evals
    from velvet_core.redact import redact
    from velvet_core.storage.database import open_db
    from velvet_core.writer.child import give_way

    give_way(a.parent)
    url = os.environ[ENV_DB]
    evals = load_evals(a.rules)
    stopping = threading.Event()

    def watch_stdin() -> None:
        with contextlib.suppress(Exception):
            sys.stdin.buffer.read()
        stopping.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    route = Route(a.base_url, a.proxy, a.ca)
    ev: Evaluator | None = None
    failing = False
    while not stopping.is_set():
        try:
            if ev is None:
                ev = Evaluator(open_db(url), evals, Pricer.from_file(a.prices or None), route, a.key_env,
                               a.interval)
            ev.take()
            ev.judge_step()
            if failing:
                log.info("velvet: evals: the database answers again")
            failing = False
        except Exception as e:  # an outage: try again (a new connection) at the next step
            if not failing:
                log.warning("velvet: evals: %s: %s (retrying)", type(e).__name__, redact(str(e))[:300])
            failing = True
            if ev is not None:
                with contextlib.suppress(Exception):
                    ev.db.close()
                ev.close()
                ev = None
        stopping.wait(STEP)
    if ev is not None:
        ev.close()
        ev.db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
