"""The gate's own files: root-only directories, files written whole or not at all."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from signer._internal.files import write_atomic
from signer.errors import GateError


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """``doc`` at ``path``, 0600, whole or not at all (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(doc, indent=2) + "\n")


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
