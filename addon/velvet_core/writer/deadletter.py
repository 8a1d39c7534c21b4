"""The dead-letter file: operations the database refused even in their smallest form.

One JSON line each, readable by people and tools, appended and never deleted automatically.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from velvet_core.private import private_dir
from velvet_core.storage.ops import Op

log = logging.getLogger("velvet")


def _default(v: Any) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(v)).decode()}
    return str(v)


class DeadLetters:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0  # written by this process

    def add(self, op: Op, error: str, proxy: str) -> None:
        record = {"at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                  "proxy": proxy, "error": error, "operation": type(op).__name__,
                  "data": dataclasses.asdict(op)}
        # the standard library's encoder: it escapes what orjson refuses (lone surrogates), and speed is moot here
        line = (json.dumps(record, default=_default, ensure_ascii=True) + "\n").encode()
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if os.write(fd, line) != len(line):  # a full disk: no half letter, and the operation stays pending
                os.ftruncate(fd, size)
                raise OSError(f"short write to {self.path}")
        finally:
            os.close(fd)
        self.count += 1
        log.warning("velvet: the database refused a %s even in its smallest form (%s); kept in %s",
                    type(op).__name__, error, self.path)
