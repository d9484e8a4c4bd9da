"""The gate's own files: root-only directories, files written whole or not at all.

The gate runs as root for every crash on the host, so a path it trusts (a directory it writes
into, a file it reads or runs) must be one that no one but root can change: the path and every
directory on the way to it root's and writable by no one else (:func:`not_root_only`). Install
checks everything the handler will use with it; the handler checks its own directories again
for each dump (:func:`private_dir`), a few ``lstat`` calls each.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Collection
from pathlib import Path
from typing import Any

from signer._internal.files import write_atomic
from signer.errors import GateError

ROOT_ONLY = frozenset({0})
# Symbolic links followed on the way to one path before it is refused (the kernel's limit).
MAX_LINKS = 40


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """``doc`` at ``path``, 0600, whole or not at all (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(doc, indent=2) + "\n")


def not_root_only(
    path: Path, *, sticky: bool = False, make: bool = False, owners: Collection[int] = ROOT_ONLY
) -> str | None:
    """Why someone other than root could change what ``path`` names, or None.

    Each entry on the way to ``path`` is looked at as the kernel resolves it: every directory
    passed through, every symbolic link (its own owner too: in a sticky directory the owner of
    a link may replace it) and every directory or file a link leads through, up to the entry
    ``path`` finally names. Each must belong to root (``owners``) and be writable by no group
    and no one else, except that a directory passed through may be sticky (/tmp: no one else
    may rename or remove root's entries in it). ``path`` itself may be sticky only when
    ``sticky`` (a release directory such as /var/crash, 1777: others add their own entries,
    root's stay root's).

    A missing entry is fine (root makes it) unless the directory it would be made in lets
    others make it first (a sticky one): then only with ``make``, for a caller that makes it
    and checks again (:func:`private_dir`: one made first by someone else is theirs, refused).
    Checking the path as given and then its realpath would miss a link
    along the way whose owner may change it; this walk does not.
    """
    todo = list(reversed(_parts(path)))
    cur = Path("/")
    why = _entry(cur, os.lstat(cur), owners, final=False, sticky=sticky)
    links = 0
    while todo and not why:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            cur = cur.parent
            continue
        q = cur / name
        try:
            st = os.lstat(q)
        except FileNotFoundError:
            mode = stat.S_IMODE(os.stat(cur).st_mode)
            if mode & 0o022 and not make:
                return (
                    f"{q} does not exist and {cur}, where root would make it, is writable by "
                    f"group or others (mode {mode:o})"
                )
            return None  # made by root, in a directory only root can write
        except NotADirectoryError:
            return f"{cur} is not a directory"
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in owners:
                return f"{q} (a symbolic link) belongs to uid {st.st_uid}"
            links += 1
            if links > MAX_LINKS:
                return f"more than {MAX_LINKS} symbolic links on the way to {path}"
            target = os.readlink(q)
            if target.startswith("/"):
                cur = Path("/")
            todo += reversed(Path(target).parts[1 if target.startswith("/") else 0 :])
            continue
        why = _entry(q, st, owners, final=False, sticky=sticky)
        cur = q
    # What the path finally names, which may not be sticky-and-open (unless ``sticky``).
    return why or _entry(cur, os.lstat(cur), owners, final=True, sticky=sticky) or None


def _parts(path: Path) -> list[str]:
    """``path``'s names from /, ``..`` kept: it is resolved after the links before it, as the
    kernel does, not by erasing the name before it."""
    p = path if path.is_absolute() else Path.cwd() / path
    return list(p.parts[1:])


def _entry(q: Path, st: os.stat_result, owners: Collection[int], final: bool, sticky: bool) -> str:
    """Why the entry ``q`` (not a link) is not root's alone, or ""."""
    if st.st_uid not in owners:
        return f"{q} belongs to uid {st.st_uid}"
    if st.st_mode & 0o022:
        is_sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if not (is_sticky and (sticky or not final)):
            return f"{q} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def private_dir(path: Path) -> Path:
    """``path`` (and its parents) made if missing, owner-only (0700); one found more open (but
    writable by no one else) is closed up. Refused (GateError naming the path and why) when
    ``path`` or anything on the way to it is not root's alone (:func:`not_root_only`; the
    gate's own uid when it is not root), when ``path`` is a symbolic link, or not a directory.

    Checked before the directories are made (none is made in a place others control) and
    after (a directory someone else made first, in a sticky parent, is theirs and refused). No
    one but root can change what was checked in between: that is what was checked.
    """
    owners = ROOT_ONLY | {os.geteuid()}
    why = not_root_only(path, make=True, owners=owners)
    if why is None:
        with contextlib.suppress(FileExistsError):  # not a directory: said below
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = not_root_only(path, owners=owners)
    if why is not None:
        raise GateError(f"{path} is not root's alone ({why}): the gate does not use it")
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise GateError(f"{path} is a symbolic link: the gate does not follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise GateError(f"{path} is not a directory")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
