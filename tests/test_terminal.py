"""Values from traffic never reach the terminal as control sequences (issue 24 item 7): through the real
``velvet`` CLI on a database of each backend holding escape, C1, DEL and bidi characters."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
from hypothesis import given
from hypothesis import strategies as st
from velvet_core.humanize import CUT_FLOOR, fit, printable
from velvet_core.storage.database import open_db

VELVET = Path(sys.executable).with_name("velvet")
EVIL = "gpt\x1b]0;pwned\x07\x1b[2J\x9b31m\x7f\u202etxt.exe\u2066x\r"
# bytes a terminal would act on: ESC, BEL, CR, DEL, C1 CSI (U+009B as UTF-8) and the bidi controls
FORBIDDEN = [b"\x1b", b"\x07", b"\r", b"\x7f", "\x9b".encode(), "\u202e".encode(), "\u2066".encode()]


def evil_call(url: str) -> None:
    db = open_db(url)
    now = datetime.now(UTC).replace(tzinfo=None)
    p = db.param
    body = orjson.dumps({"model": EVIL, "messages": [{"role": "user", "content": "hi\n" + EVIL}]}).decode()
    db.execute_sql(
        f"INSERT INTO calls (flow_id, request_id, started_at, method, host, path, endpoint, action, model, "
        f"status_code, error_message, problem, stream, complete, request_body, response_body, response_text) "
        f"VALUES ({', '.join([p] * 17)})",
        ("f-evil", "req_evil", now if "postgres" in url else now.isoformat(" "), "POST", "api.openai.com",
         "/v1/chat/completions", "chat.completions", "create", EVIL, 400, "bad " + EVIL, EVIL, False, True,
         body, None, "line one\n" + EVIL))
    db.close()


def velvet(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(VELVET), "--db", url, *args], capture_output=True, timeout=120)


def clean(out: bytes) -> bool:
    return not any(b in out for b in FORBIDDEN)


def test_traffic_text_is_made_inert_for_the_terminal(db_url):
    open_db(db_url).close()
    evil_call(db_url)
    for args in (["calls"], ["show", "req_evil"], ["stats", "--by", "model"], ["status"]):
        r = velvet(db_url, *args)
        assert r.returncode in (0, 1) and clean(r.stdout) and clean(r.stderr), (args, r.stdout, r.stderr)
    r = velvet(db_url, "calls")
    assert r.returncode == 0 and b"gpt\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\x7f\\u202etxt.exe" in r.stdout
    show = velvet(db_url, "show", "req_evil").stdout.decode()
    assert "line one\n" in show or '"hi\\n' in show  # multi-line text keeps its newlines
    assert "bad gpt\\x1b]0;pwned" in show and "problem" in show
    r = velvet(db_url, "show", EVIL)  # an error message quoting the argument
    assert r.returncode == 1 and clean(r.stderr) and b"\\x1b" in r.stderr
    # --json is untouched: JSON escapes control characters and keeps the exact text
    (row,) = orjson.loads(velvet(db_url, "calls", "--json").stdout)
    assert row["model"] == EVIL


def test_printable():
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb" and printable(None) == ""
    assert printable("x\ty\nz") == "x\\x09y\\x0az"
    assert printable("x\ty\r\nz\x85\u202a", multiline=True) == "x\ty\nz\\x85\\u202a"
    assert printable("żółć 漢字 🙂") == "żółć 漢字 🙂"  # printable Unicode stays as it is


def test_without_images_replaces_base64_images_only():
    import base64
    import hashlib

    from velvet_core.humanize import without_images

    png = b"\x89PNG" + bytes(1000)
    b64 = base64.b64encode(png).decode()
    digest = hashlib.sha256(png).hexdigest()[:16]
    note = f"<image: {len(png):,} bytes, sha256 {digest}>"
    value = {"data": [{"b64_json": b64, "revised_prompt": "x" * 500}, {"url": "https://example.com/a.png"}],
             "output": [{"type": "image_generation_call", "result": b64}],
             "input": [{"type": "input_image", "image_url": f"data:image/jpeg;base64,{b64}"}],
             "short": {"b64_json": "AAAA"}, "text": "A" * 300, "bad": {"b64_json": "!" * 300}}
    out = without_images(value)
    assert out["data"][0] == {"b64_json": note, "revised_prompt": "x" * 500} and out["data"][1] == value["data"][1]
    assert out["output"][0]["result"] == note
    assert out["input"][0]["image_url"] == f"<image/jpeg: {len(png):,} bytes, sha256 {digest}>"
    assert out["short"] == {"b64_json": "AAAA"} and out["text"] == "A" * 300  # short, or not an image's key
    assert out["bad"] == {"b64_json": "!" * 300}  # not base64: shown as it is
    assert without_images(None) is None and without_images([1, "x"]) == [1, "x"]


# -- tables narrowed to the terminal -------------------------------------------------------------------------

LONG_MODEL = "ft:gpt-4o-mini-2024-07-18:acme-research-and-development:support-triage-v12:AbCdEf12"
BATCH_ID = "batch_" + "0123456789abcdef" * 2


def long_values(url: str) -> None:
    db = open_db(url)
    now = datetime.now(UTC).replace(tzinfo=None)
    at = now if "postgres" in url else now.isoformat(" ")
    p = db.param
    db.execute_sql(
        f"INSERT INTO calls (flow_id, request_id, started_at, method, host, path, endpoint, action, model, "
        f"status_code, stream, complete) VALUES ({', '.join([p] * 12)})",
        ("f-long", "req_long", at, "POST", "api.openai.com", "/v1/chat/completions", "chat.completions", "create",
         LONG_MODEL, 200, False, True))
    db.execute_sql(f"INSERT INTO batches (id, status, endpoint, model, created_at, first_seen_at, last_seen_at) "
                   f"VALUES ({', '.join([p] * 7)})",
                   (BATCH_ID, "in_progress", "/v1/chat/completions", LONG_MODEL, at, at, at))
    db.close()


def in_terminal(url: str, columns: int, *args: str, env_columns: str | None = None) -> list[str]:
    """``velvet --db url args`` in a pseudo-terminal ``columns`` wide (and ``COLUMNS`` if given): its lines."""
    fd, tty = pty.openpty()
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if env_columns is not None:
        env["COLUMNS"] = env_columns
    proc = subprocess.Popen([str(VELVET), "--db", url, *args], stdin=subprocess.DEVNULL, stdout=tty, stderr=tty,
                            env=env)
    os.close(tty)
    out, end = b"", time.monotonic() + 60
    try:
        while time.monotonic() < end and select.select([fd], [], [], end - time.monotonic())[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # (EIO: the command has ended and closed the terminal)
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(60) == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(fd)
    return out.decode().replace("\r\n", "\n").splitlines()


def test_tables_fit_the_terminal_and_stay_whole_elsewhere(db_url):
    open_db(db_url).close()
    for args in (["batches"], ["calls"], ["stats", "--by", "model"]):  # an empty database: headings only
        assert all(len(line) <= 80 for line in in_terminal(db_url, 80, *args)), args
    long_values(db_url)
    # each as wide as its numbers, ids and dates take, and some room for the text (batches: 138 at the floors)
    for columns, args in ((160, ["batches"]), (100, ["calls"]), (100, ["stats", "--by", "model"])):
        lines = in_terminal(db_url, columns, *args)
        assert lines and all(len(line) <= columns for line in lines), (args, lines)
        assert any("…" in line for line in lines) and not any(LONG_MODEL in line for line in lines), (args, lines)
    wide = "\n".join(in_terminal(db_url, 160, "batches"))
    assert BATCH_ID in wide and datetime.now(UTC).strftime("%Y-%m-") in wide  # the id and the date stay whole
    # too narrow for the floors: each text column keeps its first characters, the line is as short as it can be
    narrow = in_terminal(db_url, 80, "batches")
    assert BATCH_ID in narrow[-1] and "ft:gpt-4o…" in narrow[-1] and "in_progre…" in narrow[-1]
    # the rule under the headings: the id, three text columns at CUT_FLOOR, the date, the numbers' headings
    assert len(narrow[1]) == len(BATCH_ID) + 3 * CUT_FLOOR + len("2026-12-07 04:53:03") + len(
        "LINESANSWEREDFAILEDTURNAROUNDCOST") + 2 * 9
    # COLUMNS wins over the terminal's size, as for shutil.get_terminal_size(); one that is not a width does not
    assert LONG_MODEL in "\n".join(in_terminal(db_url, 80, "batches", env_columns="400"))
    for junk in ("abc", "-5", "0", ""):
        assert all(len(line) <= 160 for line in in_terminal(db_url, 160, "batches", env_columns=junk)), junk
    # through a pipe (a file, grep, another program) every value is whole
    for args in (["batches"], ["calls"]):
        out = velvet(db_url, *args).stdout.decode()
        assert LONG_MODEL in out and "…" not in out


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40), st.booleans()), min_size=1, max_size=12),
       st.integers(1, 400))
def test_fit_narrows_only_what_it_may_and_never_under_a_floor(columns, limit):
    widths = [w for w, _, _ in columns]
    floors = [min(w, f) for w, f, _ in columns]
    cuttable = [i for i, (_, _, c) in enumerate(columns) if c]
    got = fit(widths, cuttable, floors, limit)
    assert all(got[i] == widths[i] for i in range(len(widths)) if i not in cuttable)
    assert all(floors[i] <= got[i] <= widths[i] for i in cuttable)
    line = sum(got) + 2 * (len(got) - 1)
    if sum(widths) + 2 * (len(widths) - 1) <= limit:
        assert got == widths
    else:  # it fits exactly, or every column it may narrow is at its floor
        assert line == limit or (line > limit and all(got[i] == floors[i] for i in cuttable))


def test_fit_narrows_the_widest_first_and_evenly():
    assert fit([30, 10, 5], [0, 1], [10, 10], 30) == [11, 10, 5]
    assert fit([30, 30], [0, 1], [5, 5], 32) == [15, 15]
    assert fit([30, 40], [0], [12, 0], 20) == [12, 40]
