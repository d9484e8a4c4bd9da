"""The crashed process, as the kernel describes it to the gate and as ``/proc`` still shows it.

The kernel runs the gate with ``%P %i %u %g %s %t %c %h %E`` and keeps ``/proc/PID`` until the
gate exits (``core_pipe_limit`` > 0): what the arguments lack (the pid in the process's own
namespace, the thread's name, its working directory) is read there.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class Crash:
    """What core_pattern gave the gate. ``pid`` is %P (the initial pid namespace's); ``tid`` the
    crashing thread as the pattern gave it (%i: the same as %I for a process in the initial
    namespace); ``exe_escaped`` is %E as given ('/' written '!')."""

    pid: int
    tid: int
    uid: int
    gid: int
    signal: int
    time: int
    core_limit: int
    hostname: str
    exe_escaped: str

    @property
    def exe(self) -> str:
        return self.exe_escaped.replace("!", "/")

    @property
    def exe_name(self) -> str:
        return self.exe.rsplit("/", 1)[-1]

    @property
    def proc(self) -> Path:
        return Path(f"/proc/{self.pid}")

    def dir_name(self) -> str:
        """``<time>-<pid>-<exe basename>``: the quarantine directory's name (the name made
        safe: an executable's name is whatever its author chose)."""
        name = _SAFE.sub("_", self.exe_name)[:64] or "unknown"
        return f"{self.time}-{self.pid}-{name}"

    def to_dict(self) -> dict[str, int | str]:
        return {
            "pid": self.pid,
            "tid": self.tid,
            "uid": self.uid,
            "gid": self.gid,
            "signal": self.signal,
            "time": self.time,
            "core_limit": self.core_limit,
            "hostname": self.hostname,
            "exe": self.exe,
        }


def _status_field(path: Path, name: str) -> list[str] | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value.split()
    except (OSError, UnicodeDecodeError):
        pass
    return None


def namespace_pid(crash: Crash, thread: bool = False) -> int | None:
    """The process's (``thread``: the thread's) id in its own pid namespace (%p, %i), from
    ``NSpid`` in ``/proc``; None when ``/proc`` no longer shows it."""
    where = crash.proc / "task" / str(crash.tid) if thread else crash.proc
    ids = _status_field(where / "status", "NSpid")
    return int(ids[-1]) if ids else None


def file_owner(crash: Crash) -> tuple[int, int]:
    """The uid and gid a core file of the process is created with (its filesystem ids, as the
    initial user namespace sees them); the kernel's %u and %g when ``/proc`` cannot say."""
    uids = _status_field(crash.proc / "status", "Uid")
    gids = _status_field(crash.proc / "status", "Gid")
    uid = int(uids[3]) if uids and len(uids) == 4 else crash.uid
    gid = int(gids[3]) if gids and len(gids) == 4 else crash.gid
    return uid, gid


def changed_ids(crash: Crash) -> bool:
    """Whether the process runs with ids other than its real one (set-user-ID or set-group-ID,
    file capabilities, or made non-dumpable: /proc/PID is then root's), or ``/proc`` cannot say.
    The kernel writes such a dump only to an absolute path, as root (suid_dumpable 2); a gate
    that wrote it as that id into the working directory the caller chose would hand an
    unprivileged user a root-owned file anywhere (review)."""
    uids = _status_field(crash.proc / "status", "Uid")
    gids = _status_field(crash.proc / "status", "Gid")
    if not uids or not gids or len(uids) != 4 or len(gids) != 4:
        return True
    try:
        owner = os.stat(crash.proc).st_uid
    except OSError:
        return True
    return len(set(uids)) != 1 or len(set(gids)) != 1 or owner != int(uids[0])


def thread_name(crash: Crash) -> str | None:
    """The crashing thread's name (%e), None when ``/proc`` no longer shows it."""
    for where in (crash.proc / "task" / str(crash.tid) / "comm", crash.proc / "comm"):
        try:
            return where.read_text().rstrip("\n")
        except (OSError, UnicodeDecodeError):
            continue
    return None
