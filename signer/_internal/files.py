"""Owner-only state: the files and directories the service writes are its own.

Key names, scopes, labels, live import tokens, every audit record and every grant are in these
files; readable by any local user, they bypassed ListKeys' and GetJWKS' filtering (issue 11). So
each is created owner-only from the start (no window between create and chmod), and one found
more open, from an older version, is closed up when the service opens it.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
# A state directory others may pass through (to a socket or a certificate it holds, when the
# entry's own mode lets them) but not list.
DIR_MODE = 0o711


def private_file(path: str | Path) -> Path:
    """``path`` created empty if missing, owner-only either way; returns it."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def private_database(path: str | Path) -> None:
    """An SQLite database owner-only, with its journal files if they exist (SQLite gives new
    ones the database's own mode)."""
    private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        if Path(f"{path}{suffix}").exists():
            private_file(f"{path}{suffix}")


def write_private(path: str | Path, text: str) -> None:
    """Replaces ``path``'s contents with ``text``, owner-only."""
    private_file(path).write_text(text)


def write_atomic(path: str | Path, data: bytes | str, mode: int = FILE_MODE) -> None:
    """``data`` in ``path`` with ``mode``, whole or not at all, durably: written to a file beside
    it (never through a link) and synced, renamed over it, and the directory synced. A crash
    leaves the old file or the new one, never a part (at most the temporary file, overwritten
    next time). The audit pin, the gate's state, wrapper and reports are written so."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # one left behind by another umask or hand
            view = memoryview(data.encode() if isinstance(data, str) else data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def state_dir(path: str | Path, mode: int = DIR_MODE) -> Path:
    """``path`` (and its parents) created if missing, its own mode set to ``mode``."""
    path = Path(path)
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def share_with_group(path: str | Path, gid: int, mode: int) -> None:
    """``path`` given to group ``gid`` with ``mode``: how the front's own user reaches the few
    things it needs (its socket, the TLS token's socket and PIN, the certificates) and nothing
    beside them."""
    os.chown(path, -1, gid)
    os.chmod(path, mode)
