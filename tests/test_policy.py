"""writer/policy.py: which errors are worth retrying."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ROOT = Path(__file__).resolve().parent.parent


def test_a_full_disk_is_never_taken_for_bad_data():
    import peewee
    from velvet_core.writer.policy import exhausted, transient

    full = peewee.OperationalError("database or disk is full")
    assert transient(full) and exhausted(full)
    hidden = peewee.OperationalError("cannot rollback - no transaction is active")  # SQLite full, as it shows
    assert exhausted(hidden)
    assert not exhausted(peewee.IntegrityError("NOT NULL constraint failed: calls.started_at"))
