"""Values from traffic never reach the terminal as control sequences (issue 24 item 7): through the real
``velvet`` CLI on a database of each backend holding escape, C1, DEL and bidi characters."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
from velvet_core.humanize import printable
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
