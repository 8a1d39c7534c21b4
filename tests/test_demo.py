"""``scripts/demo`` works offline from the repository, as a new user would run it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import orjson
from support.rig import ROOT
from velvet_core.cli import main

DEMO_DIR = re.compile(r"velvet-demo-[a-z0-9_]{8}")  # tempfile.mkdtemp(prefix="velvet-demo-")


def test_demo(tmp_path, capsys):
    """Run as the README says (no --dir: a new temp dir), and the README's paths look like the real one."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "OPENAI_API_KEY"}
    env["TMPDIR"] = str(tmp_path)
    r = subprocess.run([str(ROOT / "scripts" / "demo")], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"batch_\w+: validating → in_progress → finalizing → completed", out)
    row = r"^batch_\w+\s+completed\s+/v1/chat/completions\s+gpt-4o-mini\S*\s+.*\s20\s+18\s+2\s+3m 0s\s+\$"
    assert re.search(row, out, re.M)
    assert "Live calls" in out and "TURNAROUND P50" in out and "Traceback" not in r.stderr

    db = Path(re.search(r"^The database is (\S+)\. Try:$", out, re.M).group(1))
    assert db.parent.parent == tmp_path and DEMO_DIR.fullmatch(db.parent.name) and db.name == "velvet.db"
    url = f"sqlite:///{db}"
    assert f"$ velvet --db {url} batches" in out
    assert main(["--db", url, "sql", "SELECT count(*) AS n FROM calls", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out) == [{"n": 12}]

    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Try it offline")
    demo = readme[start:readme.index("\n## ", start)]
    shown = set(re.findall(r"/tmp/(velvet-demo[^/\s]*)/velvet\.db", demo))
    assert len(shown) == 1 and DEMO_DIR.fullmatch(shown.pop()), shown  # one dir, shaped like the real one


def test_the_stand_in_is_quiet_when_a_client_goes_away(capfd):
    """A proxy stopped while its keep-alive connection to the stand-in is open (the demo's end, every test's end)
    resets it: the stand-in prints nothing for that (the demo's output once ended with a traceback). A broken
    handler still prints its traceback."""
    import socket
    import struct
    import time

    from support.standin.server import StandIn

    s = StandIn().start()
    try:
        port = s.server_address[1]
        for _ in range(5):
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n{")
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
            c.close()
        time.sleep(0.5)
        assert "Traceback" not in capfd.readouterr().err
        for error in (ConnectionResetError(), BrokenPipeError(), ZeroDivisionError()):
            try:
                raise error
            except Exception:
                s.handle_error(None, ("127.0.0.1", 1))
        err = capfd.readouterr().err
        assert "ZeroDivisionError" in err and "ConnectionResetError" not in err and "BrokenPipe" not in err
    finally:
        s.stop()
