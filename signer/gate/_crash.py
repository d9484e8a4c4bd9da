"""The crashed process, as the kernel describes it to the gate and as ``/proc`` still shows it.

The kernel runs the gate with ``%P %I %u %g %s %t %c %h %E`` and keeps ``/proc/PID`` until the
gate exits (``core_pipe_limit`` > 0): what the arguments lack (the pid in the process's own
namespace, the thread's name, its working directory) is read there.

A number is not a process. If the crashing process is killed while the kernel dumps it, the
kernel stops waiting for the gate, the process goes and its pid may be given to another one
(another user's) before the gate, still starting, reads ``/proc/PID``. So the gate opens
``/proc/PID`` once, first, checks that what it opened is the process dumping core (``CoreDumping:
1``, the pid its thread group's, the kernel's uid), and reads everything through that directory
descriptor afterwards: a descriptor of a process that has gone reads nothing (ESRCH), never
another process's files (review).
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import time as _time
from dataclasses import dataclass, field, replace
from pathlib import Path

from signer.errors import CoreFormatError

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")
KERNEL_ARGS = (
    *("PID", "TID", "UID", "GID", "SIGNAL", "TIME", "CORE_LIMIT", "DUMP_MODE"),
    *("HOSTNAME", "EXE"),
)
"""What core_pattern gives the handler, in order: ``%P %I %u %g %s %t %c %d %h %E``."""
_NUMBERS = 8  # the leading numeric ones
AT_NULL, AT_UID, AT_EUID, AT_GID, AT_EGID, AT_SECURE = 0, 11, 12, 13, 14, 23
MAX_HEAD = 64 << 20
"""The most of a core's first bytes read for its notes (they come first; a few KiB in practice)."""


class ProcessDir:
    """``/proc/PID`` held open: every read goes through the descriptor, so it names the
    process that was opened or nothing. Made by :meth:`Crash.attached` (checked) or
    :meth:`open` (not checked: for tests of a live process that is not dumping core)."""

    def __init__(self, fd: int, pid: int) -> None:
        self.fd, self.pid = fd, pid

    @classmethod
    def open(cls, pid: int) -> ProcessDir:
        return cls(os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), pid)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def read_bytes(self, name: str) -> bytes | None:
        """The file ``name`` under the directory; None when the process is gone or it cannot
        be read."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                return f.read(1 << 16)
        except OSError:
            return None

    def read(self, name: str) -> str | None:
        """As :meth:`read_bytes`, as text."""
        data = self.read_bytes(name)
        try:
            return None if data is None else data.decode()
        except UnicodeDecodeError:
            return None

    def status(self, name: str, thread: int | None = None) -> list[str] | None:
        """A field of ``status`` (the thread's when ``thread``), split at white space."""
        text = self.read("status" if thread is None else f"task/{thread}/status")
        for line in (text or "").splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value.split()
        return None

    def open_dir(self, name: str) -> int:
        """An O_PATH descriptor of the directory ``name`` (``root``, ``cwd``) leads to. Raises
        OSError when the process is gone."""
        return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)

    def owner(self) -> int | None:
        """The uid that owns the directory (root's when the process is not dumpable)."""
        try:
            return os.fstat(self.fd).st_uid
        except OSError:
            return None

    def dumping(self) -> bool:
        """Whether the process is still there and still being dumped."""
        return self.status("CoreDumping") == ["1"]


@dataclass(frozen=True)
class Crash:
    """What core_pattern gave the gate. ``pid`` is %P and ``tid`` %I (the initial pid
    namespace's: the names under ``/proc`` here); ``exe_escaped`` is %E as given ('/' written
    '!'); ``dump_mode`` is %d (1: an ordinary dump; 0 or 2: a process made non-dumpable or
    running with other ids, dumped only because of suid_dumpable). ``process`` is
    ``/proc/PID`` held open once checked (:meth:`attached`); None when it could not be shown to
    be the crashing process: nothing is read from ``/proc`` then."""

    pid: int
    tid: int
    uid: int
    gid: int
    signal: int
    time: int
    core_limit: int
    hostname: str
    exe_escaped: str
    dump_mode: int = 1
    process: ProcessDir | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_kernel(cls, args: list[str]) -> tuple[Crash, str | None]:
        """The crash from the pattern's arguments (``%P %I %u %g %s %t %c %h %E``, after a
        leading ``--``), and what is wrong with them: None, or why the dump must stay in
        quarantine. Never fails: the numbers it can read are kept, the rest made up (pid 0,
        now, 'unknown'), so the dump still gets a quarantine entry and a record. Read here, not
        by argparse: a container's root chooses its hostname, and argparse takes a hostname
        '--' or '-h' for its own (review)."""
        values = args[1:] if args[:1] == ["--"] else list(args)
        numbers: list[int] = []
        for v in values[:_NUMBERS]:
            try:
                numbers.append(int(v))
            except ValueError:
                break
        problem = None
        if len(values) != len(KERNEL_ARGS) or len(numbers) != _NUMBERS:
            shown = " ".join(repr(v[:64]) for v in values[:12])
            problem = (
                f"the kernel's arguments are not {' '.join(KERNEL_ARGS)} ({len(values)} "
                f"given: {shown}): is core_pattern the gate's?"
            )
        numbers += [0, 0, 0, 0, 0, int(_time.time()), 0, 0][len(numbers) :]
        rest = values[_NUMBERS:] + ["unknown", "!unknown"][len(values[_NUMBERS:]) :]
        pid, tid, uid, gid, sig, when, limit, mode = numbers
        return cls(pid, tid, uid, gid, sig, when, limit, rest[0], rest[1], mode), problem

    @property
    def exe(self) -> str:
        return self.exe_escaped.replace("!", "/")

    @property
    def exe_name(self) -> str:
        return self.exe.rsplit("/", 1)[-1]

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
            "dump_mode": self.dump_mode,
        }

    def attached(self) -> tuple[Crash, str | None]:
        """This crash with ``/proc/PID`` held open if it is the process the kernel is dumping,
        and otherwise (and why) without: gone, not dumping core (a pid given to another
        process), another thread group's pid, or another real uid than the kernel said."""
        try:
            proc = ProcessDir.open(self.pid)
        except OSError as exc:
            return self, f"/proc/{self.pid} cannot be opened ({exc.strerror}): the process is gone"
        tgid, uids = proc.status("Tgid"), proc.status("Uid")
        why = None
        if not proc.dumping():
            why = "is not dumping core: the process has gone and its pid is another's"
        elif tgid != [str(self.pid)]:
            why = f"is thread group {tgid}, not the process {self.pid} the kernel named"
        elif not uids or uids[0] != str(self.uid):
            why = f"runs as uid {uids[0] if uids else '?'}, not the kernel's {self.uid}"
        if why is not None:
            proc.close()
            return self, f"/proc/{self.pid} {why}; nothing is read there"
        return replace(self, process=proc), None


def namespace_pid(crash: Crash, thread: bool = False) -> int | None:
    """The process's (``thread``: the thread's) id in its own pid namespace (%p, %i), from
    ``NSpid``; None when ``/proc`` cannot say."""
    if crash.process is None:
        return None
    ids = crash.process.status("NSpid", crash.tid if thread else None)
    return int(ids[-1]) if ids else None


def file_owner(crash: Crash) -> tuple[int, int]:
    """The uid and gid a core file of the process is created with (its filesystem ids, as the
    initial user namespace sees them); the kernel's %u and %g when ``/proc`` cannot say."""
    p = crash.process
    uids = p.status("Uid") if p else None
    gids = p.status("Gid") if p else None
    uid = int(uids[3]) if uids and len(uids) == 4 else crash.uid
    gid = int(gids[3]) if gids and len(gids) == 4 else crash.gid
    return uid, gid


def changed_ids(crash: Crash) -> bool:
    """Whether the process runs with ids other than its real one (set-user-ID or set-group-ID,
    file capabilities, or made non-dumpable: /proc/PID is then root's), or ``/proc`` cannot say.
    The kernel writes such a dump only to an absolute path, as root (suid_dumpable 2); a gate
    that wrote it as that id into the working directory the caller chose would hand an
    unprivileged user a root-owned file anywhere (review)."""
    p = crash.process
    if p is None or crash.dump_mode != 1:
        return True
    uids, gids, owner = p.status("Uid"), p.status("Gid"), p.owner()
    if not uids or not gids or len(uids) != 4 or len(gids) != 4 or owner is None:
        return True
    return len(set(uids)) != 1 or len(set(gids)) != 1 or owner != int(uids[0])


def thread_name(crash: Crash) -> str | None:
    """The crashing thread's name (%e), None when ``/proc`` cannot say."""
    if crash.process is None:
        return None
    for where in (f"task/{crash.tid}/comm", "comm"):
        name = crash.process.read(where)
        if name is not None:
            return name.rstrip("\n")
    return None


def _auxv(data: bytes, word: str) -> dict[int, int]:
    """An auxiliary vector's entries up to AT_NULL (``word``: the struct format of one entry)."""
    out: dict[int, int] = {}
    whole = len(data) - len(data) % struct.calcsize(word)
    for key, value in struct.iter_unpack(word, data[:whole]):
        if key == AT_NULL:
            break
        out.setdefault(key, value)
    return out


def core_auxv(core: Path) -> tuple[dict[int, int], str] | None:
    """The auxiliary vector the core's NT_AUXV note holds, with its entry format; None when the
    core has none (not an ELF core, or cut before its notes)."""
    from signer.scan._elf import NeedMore, parse_core

    with open(core, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(1 << 20)
        while True:
            try:
                layout = parse_core(head, size)
                break
            except NeedMore as more:
                if more.needed > MAX_HEAD:
                    return None
                f.seek(0)
                head = f.read(more.needed)
            except CoreFormatError:
                return None
    if layout is None:
        return None
    word = ("<" if head[5] == 1 else ">") + ("QQ" if head[4] == 2 else "II")
    for note in layout.notes:
        if note.name == "NT_AUXV":
            return _auxv(head[note.start : note.end], word), word
    return None


def same_process(crash: Crash, core: Path) -> str | None:
    """Why the process ``/proc/PID`` holds may not be the one whose core this is, or None. The
    core's own auxiliary vector must be the held process's (it holds the addresses of the
    process's random bytes, entry point and vDSO: another exec differs, and no unprivileged
    process can set its own), and must not say the process ran with other ids (AT_SECURE, a
    uid or gid other than its effective one). Without this, a user who killed a set-user-ID
    process during its dump and crashed a process of their own under the freed pid would have
    the gate write the set-user-ID core as themselves (review)."""
    if crash.process is None:
        return "/proc does not show the crashing process"
    found = core_auxv(core)
    if found is None:
        return "the core has no auxiliary vector (NT_AUXV) to tell its process by"
    theirs, word = found
    if theirs.get(AT_SECURE) or theirs.get(AT_UID) != theirs.get(AT_EUID):
        return "the core's process ran with other ids than its own (AT_SECURE)"
    if theirs.get(AT_GID) != theirs.get(AT_EGID):
        return "the core's process ran with another group id than its own"
    held = crash.process.read_bytes("auxv")
    if held is None or _auxv(held, word) != theirs:
        return f"/proc/{crash.pid} is another process than the one this core is of"
    return None
