"""``velvet report``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_commands(command: Callable[..., argparse.ArgumentParser], since: Callable[[str], Any]) -> None:
    pass
