"""The offline demo: stand-in OpenAI API + mitmdump with velvet + the official SDK, then ``velvet`` reports.

Run it through ``scripts/demo`` (which prepares .venv). No API key and no internet needed.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import orjson
from support.standin import StandIn
from velvet_core.cli import main as velvet

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_proxy(workdir: Path, db_url: str, upstream: str, program: str = "mitmdump",
                extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], int, Path]:
    port, confdir = free_port(), workdir / "mitmproxy"
    log = open(workdir / f"{program}.log", "wb")  # noqa: SIM115 - lives as long as the process
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.Popen(
        [str(BIN / program), "-q", "-p", str(port), "--listen-host", "127.0.0.1", "--set", f"confdir={confdir}",
         *extra,
         "-s", str(ROOT / "addon" / "velvet.py"), "--set", f"velvet_db={db_url}",
         "--set", f"velvet_spool_dir={workdir / 'spool'}", "--set", "connection_strategy=lazy",
         "--map-remote", rf"|https://api\.openai\.com/|{upstream}/",
         "-s", str(ROOT / "tests" / "support" / "standin" / "route.py"), "--set", f"standin_url={upstream}"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"demo: {program} exited; see {workdir / (program + '.log')}")
        try:
            if (confdir / "mitmproxy-ca-cert.pem").exists():
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return proc, port, confdir / "mitmproxy-ca-cert.pem"
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("demo: mitmdump did not start in 60 s")


def workload(client: openai.OpenAI) -> None:
    """What an app would do: a few live calls and one small batch, start to finish."""
    ask = [{"role": "user", "content": "Summarise the plot of Hamlet in one line."}]
    client.chat.completions.create(model="gpt-4o-mini", messages=ask)
    client.chat.completions.create(model="gpt-4o", messages=ask)
    for _ in client.chat.completions.create(model="gpt-4o-mini", messages=ask, stream=True,
                                            stream_options={"include_usage": True}):
        pass
    client.embeddings.create(model="text-embedding-3-small", input=["velvet", "proxy"])
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=ask,
                                       extra_headers={"x-standin-scenario": "429"})
    except openai.RateLimitError:
        print("  (one call was rate limited, as planned)")
    lines = b"".join(orjson.dumps({
        "custom_id": f"review-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "bad-model" if i in (7, 13) else "gpt-4o-mini",
                 "messages": [{"role": "user", "content": f"Classify review #{i}: 'great product'"}]}}) + b"\n"
        for i in range(1, 21))
    f = client.files.create(file=("reviews.jsonl", io.BytesIO(lines)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"job": "review-classifier"})
    print(f"  batch {b.id}: {b.status}", end="", flush=True)
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        b = client.batches.retrieve(b.id)
        print(f" → {b.status}", end="", flush=True)
    print()
    if b.output_file_id:
        client.files.content(b.output_file_id).read()
    if b.error_file_id:
        client.files.content(b.error_file_id).read()


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, help="where to keep the database and logs (default: a new temp dir)")
    args = ap.parse_args()
    workdir = (args.dir or Path(tempfile.mkdtemp(prefix="velvet-demo-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{workdir / 'velvet.db'}"
    standin = StandIn().start()
    proc, port, ca = start_proxy(workdir, db_url, standin.url)
    print(f"demo: stand-in OpenAI API at {standin.url}; mitmdump -s addon/velvet.py on port {port}")
    try:
        for k in [k for k in os.environ if "proxy" in k.lower()]:
            del os.environ[k]
        os.environ.update(HTTPS_PROXY=f"http://127.0.0.1:{port}", SSL_CERT_FILE=str(ca))
        print("demo: the official openai SDK makes 5 live calls and runs a 20-line batch through the proxy")
        with openai.OpenAI(api_key="sk-demo-not-a-real-key", max_retries=0) as client:
            workload(client)  # (its connections closed before mitmdump stops: none is cut at shutdown)
    finally:
        proc.send_signal(signal.SIGINT)  # velvet writes everything queued before mitmdump exits
        proc.wait(60)
        standin.stop()
    print(f"\n$ velvet --db {db_url} batches")
    velvet(["--db", db_url, "batches"])
    print(f"\n$ velvet --db {db_url} stats")
    velvet(["--db", db_url, "stats"])
    print(f"\nThe database is {workdir / 'velvet.db'}. Try:\n"
          f"  .venv/bin/velvet --db {db_url} lines BATCH_ID --failed\n"
          f"  .venv/bin/velvet --db {db_url} show BATCH_ID review-3\n"
          f"  .venv/bin/velvet --db {db_url} calls")
    return 0


if __name__ == "__main__":
    sys.exit(run())
