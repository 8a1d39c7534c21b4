"""Hostile report inputs: a small report database whose models, tags and costs are chosen text and numbers,
and ``velvet report`` run on it in a child process held to a memory and time limit (a hang is a finding, not a
stuck test). Used by tests/test_report.py (with hypothesis) and scripts/faults.py (seeded cases).
"""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from peewee import PostgresqlDatabase
from velvet_core.storage.database import open_db

from support.reportdb import fill

MEMORY_MB = 1024
# the child sets its own address-space limit, then runs the report as the CLI would
CHILD = ("import resource, sys\n"
         "resource.setrlimit(resource.RLIMIT_AS, ({0} << 20, {0} << 20))\n"
         "from velvet_core.cli import main\n"
         "main(sys.argv[1:])\n")

# the kinds of text that broke or could break a chart library: long, wide, combining, right-to-left, control
NASTY = ("x" * 150, "m" * 200, "word " * 60, "界" * 120, "e\u0301" * 90, "\u202eevil\u202c" * 20, "עברית " * 40,
         "\x00\x01\x1b]0;t\x07\x1b[2J", "", " ", "\n" * 30, "a\tb\rc", "🦜" * 80,
         "<svg onload=x>&amp;", "\ud7ff" * 70)


def prepare(url: str, text: str, number: float, age_days: float = 0) -> None:
    """A few calls and batches written `age_days` ago, every model and tag set to `text`, costs to `number`."""
    fill(url, batches=3, calls=4, days=1, lines=2, seed=3, now=datetime.now(UTC).replace(tzinfo=None)
         - timedelta(days=age_days))
    db = open_db(url)
    if isinstance(db, PostgresqlDatabase):  # what PostgreSQL can hold: no NUL in text, REAL up to 3.4e38
        text, number = text.replace("\x00", "\ufffd"), min(number, 3e38)
    p = db.param
    tags = orjson.dumps({"team": text, text[:60] or "k": "v"}).decode()
    try:
        with db.atomic():
            db.execute_sql(f"UPDATE calls SET model = {p}, tags = {p}, cost_usd = {p}", (text, tags, number))
            db.execute_sql(f"UPDATE batches SET model = {p}, metadata = {p}", (text, tags))
            db.execute_sql(f"UPDATE batch_requests SET model = {p}", (text,))
            db.execute_sql(f"UPDATE batch_results SET model = {p}, cost_usd = {p}, failed = {p}, "
                           f"error_code = {p}", (text, number, True, text[:200]))
    finally:
        db.close()


def run_report(url: str, out: Path, timeout: float = 90, memory_mb: int = MEMORY_MB) -> str:
    """``ok``, ``hang`` (time or memory limit reached) or ``crash: <last line of stderr>``."""
    try:
        r = subprocess.run([sys.executable, "-c", CHILD.format(memory_mb), "report", "--db", url, "-o", str(out)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hang"
    if r.returncode == 0 and out.exists() and "</html>" in out.read_text(encoding="utf-8"):
        return "ok"
    last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    return "hang" if "MemoryError" in r.stderr else f"crash: {last[:200]}"


def cases(seed: int, n: int) -> list[tuple[str, float, float]]:
    """`n` seeded (text, number, age in days) cases: the NASTY texts first, then random mixtures of them."""
    rnd = random.Random(seed)
    numbers = (0.0, 1e-9, 8e-05, 1e12, 1e300, 123456789.123)
    out: list[tuple[str, float, float]] = [(t, rnd.choice(numbers), rnd.choice((0.0, 0.0, 30.0))) for t in NASTY]
    while len(out) < n:
        text = "".join(rnd.choice(NASTY)[:rnd.randint(0, 80)] for _ in range(rnd.randint(1, 4)))
        out.append((text, rnd.choice(numbers), rnd.choice((0.0, 30.0))))
    return out[:n]
