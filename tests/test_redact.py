"""redact.py: no secret in any message."""

from __future__ import annotations

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
