"""redact.py: no secret in any message."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text", [
    "postgresql://velvet:s3cret@db:5432/x", "dbname=x password=s3cret host=y", "Bearer sk-abcdefghijkl123",
])
def test_redact(text):
    from velvet_core.redact import redact

    assert "s3cret" not in redact(text) and "abcdefghijkl123" not in redact(text)


def test_redact_keeps_none():
    """An error that is not there (a proxy that never failed) stays None: the alerts' health kind read it so."""
    from velvet_core.redact import redact

    assert redact(None) is None


@pytest.mark.parametrize("text", ["a" * 200_000, "a-" * 100_000, "a." * 100_000, "x://" + "b:" * 100_000,
                                  "sk-" + "a" * 200_000, "bearer " * 30_000, "password=" * 30_000,
                                  "?" + "a" * 200_000, "?a=b" * 50_000, "postgresql://u:pw@h/db " * 10_000])
def test_long_text_is_redacted_in_linear_time(text):
    """Every message goes through redact(): a long one must never hang a command (an unbounded URL scheme made a
    run of letters quadratic: 200 kB took 119 s)."""
    from velvet_core.redact import redact

    started = time.perf_counter()
    out = redact(text)
    assert time.perf_counter() - started < 1.0
    assert "pw@" not in out and ("sk-a" not in out)
