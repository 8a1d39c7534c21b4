"""SQL that tries to write, for the read-only door (storage/readonly.py): tests/test_readonly.py and the fault
suite's ``security`` section run it through the real ``velvet sql``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# statements that try to write, each alone (one statement per request is the first rule)
ATTACKS = [
    "DELETE FROM calls",
    "UPDATE calls SET model = 'x'",
    "INSERT INTO calls (flow_id) VALUES ('x')",
    "DROP TABLE calls",
    "WITH x AS (SELECT 1) DELETE FROM calls",
    "WITH x AS (DELETE FROM calls RETURNING 1) SELECT * FROM x",
    "SELECT 1; DELETE FROM calls",
    "SELECT 1\n;\nDELETE FROM calls",
    "SELECT 1;\nDELETE FROM calls;",
    "SET TRANSACTION READ WRITE; DELETE FROM calls",
    "COMMIT; DELETE FROM calls",
    "ROLLBACK; DELETE FROM calls",
    "CREATE TABLE t (x int)",
    "CREATE TEMP TABLE t (x int)",
]
SQLITE_ATTACKS = [
    "VACUUM INTO '{tmp}/copy.db'",
    "VACUUM",
    "ATTACH DATABASE '{tmp}/x1.db' AS x",
    "DETACH DATABASE main",
    "PRAGMA journal_mode = delete",
    "PRAGMA writable_schema = 1",
    "PRAGMA query_only = 0",
    "PRAGMA user_version = 7",
    "SELECT load_extension('{tmp}/evil')",
    "REINDEX",
    "ANALYZE",
    "CREATE TRIGGER t AFTER INSERT ON calls BEGIN DELETE FROM calls; END",
]
PG_ATTACKS = [
    "COPY (SELECT 1) TO PROGRAM 'touch {tmp}/program'",
    "COPY (SELECT 1) TO '{tmp}/copyfile'",
    "SELECT pg_read_file('/etc/hostname')",
    "SELECT lo_import('/etc/hostname')",
    "SELECT lo_export(1, '{tmp}/lo')",
    "SELECT set_config('default_transaction_read_only', 'off', false); DELETE FROM calls",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; DELETE FROM calls",
    "SELECT * FROM pg_ls_dir('.')",
    "CREATE EXTENSION IF NOT EXISTS adminpack",
]


@dataclass
class Probe:
    tried: int = 0
    written: list[str] = field(default_factory=list)  # attacks after which a row had changed
    files: list[str] = field(default_factory=list)  # files found in the spot afterwards

    def figures(self) -> dict[str, int]:
        return {"sql_attacks_tried": self.tried, "sql_writes_blocked": len(self.written),
                "files_written_by_readonly": len(self.files)}


def probe(url: str, spot: Path, changed: Callable[[], bool], velvet_sql: Callable[[str], int]) -> Probe:
    """Run every attack for ``url``'s backend with ``velvet_sql(statement)``; ``changed()`` says whether the
    database's rows changed. ``spot`` is a folder anyone may write (the server's user too): it must stay empty."""
    spot.mkdir(exist_ok=True)
    os.chmod(spot, 0o777)
    out = Probe()
    for attack in ATTACKS + (PG_ATTACKS if url.startswith("postgresql") else SQLITE_ATTACKS):
        out.tried += 1
        velvet_sql(attack.format(tmp=spot))
        if changed():
            out.written.append(attack)
    out.files = sorted(p.name for p in spot.iterdir())
    return out
