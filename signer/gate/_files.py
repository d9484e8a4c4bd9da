"""The gate's own files: root-only directories, files written whole or not at all."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from signer.errors import GateError


def write_private(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically (a temporary file renamed over it), 0600, synced."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    write_private(path, json.dumps(doc, indent=2) + "\n")


def private_dir(path: Path) -> Path:
    """``path`` (and its parents) made if missing, owner-only (0700); one found more open is
    closed up; one owned by another user, or not a directory, is refused."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise GateError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise GateError(f"{path} is owned by uid {st.st_uid}, not by the gate's ({os.geteuid()})")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
