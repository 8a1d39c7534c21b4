"""Take the mitmweb screenshot (docs/mitmweb.png): the demo's traffic through ``mitmweb -s addon/velvet.py``.

Needs Chromium (Debian package ``chromium``; ``fonts-noto-color-emoji`` for the markers). Usage:
``.venv/bin/python scripts/screenshot.py docs/mitmweb.png``
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import orjson
from demo import free_port, start_proxy, workload
from support.standin import StandIn

PASSWORD = "velvet-demo"


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/mitmweb.png").resolve()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("screenshot: needs chromium (apt install chromium fonts-noto-color-emoji)")
    workdir = Path(tempfile.mkdtemp(prefix="velvet-shot-"))
    web = free_port()
    standin = StandIn().start()
    columns = ("icon", "method", "path", "status", "time", "comment")
    proc, port, ca = start_proxy(workdir, f"sqlite:///{workdir / 'velvet.db'}", standin.url, "mitmweb", (
        "--web-host", "127.0.0.1", "--web-port", str(web), "--no-web-open-browser",
        "--set", f"web_password={PASSWORD}", *[a for c in columns for a in ("--set", f"web_columns={c}")]))
    try:
        os.environ.update(HTTPS_PROXY=f"http://127.0.0.1:{port}", SSL_CERT_FILE=str(ca))
        workload(openai.OpenAI(api_key="sk-demo-not-a-real-key", max_retries=0))
        time.sleep(1.5)  # the comments arrive once the writer has processed each flow
        req = urllib.request.Request(f"http://127.0.0.1:{web}/flows",
                                     headers={"Authorization": f"Bearer {PASSWORD}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        flows = orjson.loads(opener.open(req, timeout=30).read())
        output = next(f["id"] for f in flows if f["request"]["path"].endswith("/content")
                      and f["comment"].startswith("batch output"))
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1400,1000", "--virtual-time-budget=8000", f"--screenshot={out}",
                        f"http://127.0.0.1:{web}/?token={PASSWORD}#/flows/{output}/response"],
                       check=True, capture_output=True, timeout=120)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        standin.stop()
    print(f"screenshot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
