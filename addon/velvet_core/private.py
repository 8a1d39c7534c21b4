"""Files and folders private to their owner: every file velvet writes is created 0600, every folder 0700.

Prompts and answers are in the database, its WAL, the journal, the spool and every export: with the usual umask
022 they would be readable by every local user. Modes are given at creation (``os.open``/``os.mkdir``), never by a
later chmod, so no moment exists when a file is open to others; an existing file or folder keeps the mode its
owner gave it (:func:`loose` finds those for ``velvet status``).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

FILE_MODE = 0o600
DIR_MODE = 0o700
OTHERS = 0o044  # read by the group or by everyone: what :func:`loose` reports

_WRITE = {"w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
          "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL}


def private_dir(path: Path | str) -> Path:
    """``path`` and its missing parents made 0700 (``mkdir -p``; folders that exist are left as they are)."""
    path = Path(path)
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise
    return path


def open_private(path: Path | str, mode: str = "wb", *, follow: bool = False, **kw: Any) -> IO[Any]:
    """``open(path, mode)`` for writing, a new file created 0600.

    ``follow=False`` (velvet's own files, in its own folders) refuses a symbolic link in the file's place:
    nobody can point velvet's writes elsewhere; a path the user names (``-o FILE``) may be one (/dev/stdout).
    """
    flags = _WRITE[mode[0]] | getattr(os, "O_CLOEXEC", 0)
    if "+" in mode:
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, FILE_MODE)
    try:
        return os.fdopen(fd, mode, **kw)
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path | str, data: bytes, *, follow: bool = False) -> None:
    """Write ``data`` to ``path`` (replaced), a new file created 0600."""
    with open_private(path, "wb", follow=follow) as f:
        f.write(data)


def touch_private(path: Path | str) -> None:
    """Create ``path`` empty and 0600 unless it exists (before a library creates it with the umask's mode:
    SQLite gives its -wal and -shm the database file's mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE))


def loose(paths: Iterable[Path]) -> list[dict[str, str]]:
    """The paths among ``paths`` that the group or everyone may read: ``{"path", "mode"}`` (octal)."""
    out = []
    for p in paths:
        try:
            mode = stat.S_IMODE(p.lstat().st_mode)
        except OSError:
            continue
        if mode & OTHERS and not p.is_symlink():
            out.append({"path": str(p), "mode": f"{mode:04o}"})
    return out


def unsafe_dir(path: Path | str) -> str | None:
    """Why velvet must not read what lies in folder ``path`` (None when it may, or when it does not exist): owned
    by another user, or writable by the group or everyone, so that someone else could have put a file there."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return None
    if st.st_uid != os.geteuid():
        return f"{p} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        who = "everyone" if st.st_mode & 0o002 else "its group"
        return f"{p} is writable by {who} (mode {st.st_mode & 0o7777:04o})"
    return None
