"""Release of a clean core: to ``release_dir``, or where the kernel would have put it before the
gate was installed (``state.json``'s ``previous_pattern``).

* A pipe pattern (``|/usr/lib/systemd/systemd-coredump %P %u ...``) is run as the kernel runs it:
  the pattern split at spaces, each argument's % specifiers expanded from what the gate knows,
  the core on its standard input, the kernel's environment. ``/proc/PID`` is still there (the
  kernel holds the process while the gate runs), so systemd-coredump finds what it reads there
  and ``coredumpctl`` keeps working.
* A file pattern (``core``, ``/var/crash/core.%e.%p``) is written as the kernel writes it: inside
  the process's root, relative to its working directory, with its filesystem uid and gid,
  ``O_EXCL | O_NOFOLLOW``, 0600, no more than its core limit (``ulimit -c``: below a page, no file
  at all), ``.PID`` appended when ``core_uses_pid`` is set and the pattern has no ``%p``.

Specifiers the gate cannot know (%d the dump mode, %F a pidfd, %C the CPU) are left out: an
argument that is only one of them is dropped (systemd-coredump takes them as optional trailing
arguments), and the release says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from signer.errors import GateError, SignerError
from signer.gate._crash import (
    Crash,
    changed_ids,
    file_owner,
    namespace_pid,
    same_process,
    thread_name,
)
from signer.gate._files import not_root_only
from signer.gate._receive import CHUNK

KERNEL_ENV = {"HOME": "/", "PATH": "/sbin:/bin:/usr/sbin:/usr/bin"}


def run_as_kernel(argv: list[str], stdin: int) -> subprocess.Popen[bytes]:
    """``argv`` started as the kernel starts a core_pattern helper: from /, with its fixed
    environment, no output, in a session of its own (the chained handler, the notifier)."""
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        env=KERNEL_ENV,
        start_new_session=True,
    )


"""What the kernel gives a usermode helper (and so the gate, and what it chains to)."""
LACKING = {"F": "a pidfd of the process", "C": "the CPU it ran on"}
MIN_COREDUMP = 4096
"""The kernel writes no core file for a core limit below a page (binfmt_elf's min_coredump)."""
_ZERO = bytes(CHUNK)


def release_seconds(budget: float) -> float:
    """How long a release may take: the scan's budget (it is proportional to the core's size),
    and at least a minute."""
    return max(60.0, budget)


class ReleaseError(GateError):
    """The clean core could not be released: it stays in quarantine."""


@dataclass
class Released:
    """Where the core went (``to``), what the operator should know (``notes``)."""

    to: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# --- the pattern -------------------------------------------------------------------------------


def _values(crash: Crash) -> tuple[dict[str, str], list[str]]:
    """The value of each specifier the gate can fill, and notes on those it guessed."""
    notes = []
    ns_pid = namespace_pid(crash)
    ns_tid = namespace_pid(crash, thread=True)
    comm = thread_name(crash)
    if ns_pid is None or ns_tid is None:
        notes.append(
            f"/proc/{crash.pid} does not show the crashing process: %p and %i given as the "
            "initial namespace's ids"
        )
    if comm is None:
        notes.append("the thread's name is unknown: %e given as the executable's name")
    return {
        "%": "%",
        "p": str(crash.pid if ns_pid is None else ns_pid),
        "P": str(crash.pid),
        "i": str(crash.tid if ns_tid is None else ns_tid),
        "I": str(crash.tid),
        "u": str(crash.uid),
        "g": str(crash.gid),
        "s": str(crash.signal),
        "t": str(crash.time),
        "c": str(crash.core_limit),
        "h": crash.hostname.replace("/", "!"),
        "e": (comm if comm is not None else crash.exe_name[:15]).replace("/", "!"),
        "f": crash.exe_name.replace("/", "!"),
        "E": crash.exe_escaped,
        "d": str(crash.dump_mode),
    }, notes


def expand(token: str, values: dict[str, str], lacking: set[str]) -> str | None:
    """One argument (or a file pattern) with its specifiers expanded; None for an argument that
    is nothing but specifiers the gate lacks (``lacking`` collects them). An unknown specifier
    expands to nothing, as in the kernel."""
    out, i, only_lacking, lacked = [], 0, True, False
    while i < len(token):
        ch = token[i]
        if ch != "%" or i + 1 == len(token):
            out.append(ch)
            only_lacking = False
            i += 1
            continue
        spec = token[i + 1]
        i += 2
        if spec in LACKING:
            lacking.add(spec)
            lacked = True
        else:
            out.append(values.get(spec, ""))
            only_lacking = False
    return None if only_lacking and lacked else "".join(out)


def previous_pattern(state_dir: Path) -> str:
    """The core_pattern the gate replaced, from ``state.json`` (written by install)."""
    path = state_dir / "state.json"
    why = not_root_only(path)  # it names what runs as root next
    if why is not None:
        raise ReleaseError(f"{path} is not root's alone: {why}")
    try:
        state = json.loads(path.read_text())
        pattern = state["previous_pattern"]
        gate = state.get("gate_pattern")
    except FileNotFoundError:
        raise ReleaseError(
            f"nowhere to release: release_dir is empty and there is no {path} (is the gate "
            "installed?)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReleaseError(f"{path} does not give the previous pattern: {exc!r}") from None
    if not isinstance(pattern, str):
        raise ReleaseError(f"{path}: previous_pattern is not a string")
    from signer.gate._install import is_gate_pattern

    if pattern.strip() == (gate or "").strip() or is_gate_pattern(pattern):
        raise ReleaseError(f"{path}: the previous pattern is the gate itself: {pattern!r}")
    return pattern


def release(
    crash: Crash, core: Path, name: str, release_dir: Path | None, state_dir: Path, budget: float
) -> Released:
    """Releases ``core``; ``name`` is the quarantine entry's. Any failure is a ReleaseError
    (the caller keeps the core in quarantine)."""
    began = time.monotonic()
    try:
        if release_dir is not None:
            done = to_directory(core, release_dir / f"{name}.core")
        else:
            pattern = previous_pattern(state_dir)
            seconds = release_seconds(budget)
            if pattern.startswith("|"):
                done = to_pipe(crash, core, pattern[1:], seconds)
            else:
                done = to_file(crash, core, pattern or "core", seconds)
    except ReleaseError:
        raise
    except (OSError, SignerError) as exc:
        what = exc.message if isinstance(exc, SignerError) else (exc.strerror or str(exc))
        raise ReleaseError(f"release failed: {what}") from None
    done.seconds = time.monotonic() - began
    return done


# --- a directory -------------------------------------------------------------------------------


def _copy(src: int, dst: int, limit: int | None = None) -> int:
    """``src`` to ``dst`` from where each stands, sparse (zero chunks skipped over), at most
    ``limit`` bytes; synced. Returns the bytes copied."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    try:
        while limit is None or done < limit:
            want = CHUNK if limit is None else min(CHUNK, limit - done)
            n = os.readv(src, [view[:want]])
            if n == 0:
                break
            if (buf if n == CHUNK else bytes(view[:n])) == _ZERO[:n]:
                os.lseek(dst, n, os.SEEK_CUR)
            else:
                written = 0
                while written < n:
                    written += os.write(dst, view[written:n])
            done += n
        os.ftruncate(dst, done)
        os.fsync(dst)
    finally:
        view.release()
    return done


def to_directory(core: Path, dst: Path) -> Released:
    """Moved (renamed, or copied and removed across file systems) to ``dst``, which must not
    exist; root's, 0600. The directory is made 0700 if missing, and left as it is otherwise
    (the operator's: /var/crash is 1777)."""
    why = not_root_only(dst.parent, sticky=True)  # again for each dump: install checked once
    if why is not None:
        raise ReleaseError(f"release_dir {dst.parent}: {why}")
    dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not dst.parent.is_dir():
        raise ReleaseError(f"release_dir {dst.parent} is not a directory")
    dst, out = _claim(dst)
    try:
        if os.stat(core).st_dev == os.fstat(out).st_dev:
            os.replace(core, dst)  # over the empty file just claimed
        else:
            src = os.open(core, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _copy(src, out)
            finally:
                os.close(src)
            core.unlink()
    finally:
        os.close(out)
    return Released(str(dst))


def _claim(dst: Path) -> tuple[Path, int]:
    """``dst`` created (``O_EXCL | O_NOFOLLOW``, 0600) and open; if its name is taken (in a
    sticky directory anyone may take a predictable name first), the name with a random part
    added instead. Raises FileExistsError when five such names are taken too."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for n in range(6):
        path = dst if n == 0 else dst.with_name(f"{dst.stem}.{secrets.token_hex(4)}{dst.suffix}")
        try:
            return path, os.open(path, flags, 0o600)
        except FileExistsError:
            continue
    raise FileExistsError(f"{dst} and five other names for it are taken")


# --- a pipe ------------------------------------------------------------------------------------


def _feed(proc: subprocess.Popen[bytes], core: Path, deadline: float) -> tuple[int, bool]:
    """The core into the handler's stdin before ``deadline``; (bytes written, whether it read
    them all: a handler may stop reading early, as the kernel allows)."""
    assert proc.stdin is not None
    fd = proc.stdin.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    sent = 0
    with open(core, "rb", buffering=0) as src:
        while chunk := src.read(CHUNK):
            view = memoryview(chunk)
            while view:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReleaseError("the chained handler did not read the core in time")
                _, ready, _ = select.select([], [fd], [], left)
                if not ready:
                    continue
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    return sent, False
                view, sent = view[n:], sent + n
    return sent, True


def _still_dumping(crash: Crash, core: Path, why: str) -> None:
    """Refuses a release that needs ``/proc/PID`` unless the directory the gate opened first
    is still the process being dumped (it reads nothing once the process has gone) and is the
    process this core is of (:func:`same_process`)."""
    if crash.process is None or not crash.process.dumping():
        raise ReleaseError(
            f"/proc/{crash.pid} is not (or no longer) the crashing process, and {why}: the "
            "process was killed during its dump, or the gate was not run by the kernel"
        )
    other = same_process(crash, core)
    if other is not None:
        raise ReleaseError(f"{other}, and {why}")


def to_pipe(crash: Crash, core: Path, command: str, seconds: float) -> Released:
    """Runs the previous pipe handler with the core on its stdin; it must read it and exit 0
    within ``seconds``, or it is killed and the core stays in quarantine."""
    _still_dumping(crash, core, "a chained handler reads /proc/PID")
    values, notes = _values(crash)
    lacking: set[str] = set()
    argv = [a for a in (expand(t, values, lacking) for t in command.split(" ") if t) if a]
    if not argv:
        raise ReleaseError("the previous pattern is an empty pipe")
    notes += [f"%{s} ({LACKING[s]}) is not known to the gate: left out" for s in sorted(lacking)]
    deadline = time.monotonic() + seconds
    try:
        proc = run_as_kernel(argv, subprocess.PIPE)
    except OSError as exc:
        raise ReleaseError(f"the chained handler {argv[0]} cannot run: {exc.strerror}") from None
    try:
        sent, whole = _feed(proc, core, deadline)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()  # type: ignore[union-attr]
        rc = proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise ReleaseError(f"the chained handler {argv[0]} did not exit in time") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise ReleaseError(f"the chained handler {argv[0]} exited with status {rc}")
    if not whole:
        notes.append(f"the chained handler stopped reading after {sent} bytes")
    return Released(f"|{' '.join(argv)}", notes=notes)


# --- a file ------------------------------------------------------------------------------------


def _write_as(crash: Crash, core: Path, path: str, limit: int, deadline: float) -> None:
    """In a child: into the process's root and working directory, as its filesystem uid and gid,
    the file created as the kernel creates it; killed at ``deadline`` (a working directory on a
    hung file system must not hold one of the kernel's core_pipe_limit slots for ever). Raises
    ReleaseError with what went wrong."""
    _still_dumping(crash, core, "the file goes into its root and working directory")
    if changed_ids(crash):
        raise ReleaseError(
            "the process ran with other ids than its own (set-user-ID, capabilities, or not "
            "dumpable), or /proc does not show it: its dump is not written into a directory "
            "it chose; it stays in quarantine"
        )
    assert crash.process is not None
    uid, gid = file_owner(crash)
    try:
        root = crash.process.open_dir("root")
        cwd = crash.process.open_dir("cwd")
    except OSError as exc:
        raise ReleaseError(
            f"the process's root or working directory cannot be opened ({exc.strerror}): is "
            f"/proc/{crash.pid} gone?"
        ) from None
    src = os.open(core, os.O_RDONLY | os.O_CLOEXEC)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            # Nothing of root's is kept past the switch to the user's ids: not the kernel's
            # pipe, the gate's log, the quarantine (only what the write needs).
            _keep_only((src, w, root, cwd))
            os.fchdir(root)
            os.chroot(".")
            os.fchdir(cwd)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # as the kernel does: the last crash's core is replaced
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_LARGEFILE
            out = os.open(path, flags, 0o600)
            _copy(src, out, limit)
        except BaseException as exc:
            code = 1
            text = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
            with contextlib.suppress(BaseException):
                os.write(w, f"{text}".encode())
        finally:
            os._exit(code)
    for fd in (w, src, root, cwd):
        os.close(fd)
    said, status = _wait_child(pid, r, deadline)
    if status is None:
        raise ReleaseError(f"writing {path} as uid {uid} did not end in time: killed")
    if status != 0:
        raise ReleaseError(f"writing {path} as uid {uid} failed: {said or f'status {status}'}")


def _keep_only(keep: tuple[int, ...]) -> None:
    """Every descriptor but ``keep`` closed; 0, 1 and 2 on /dev/null (in a forked child)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _wait_child(pid: int, r: int, deadline: float) -> tuple[str, int | None]:
    """What the child wrote on ``r`` (closed here) and its wait status; status None when it was
    killed at ``deadline``."""
    said = b""
    try:
        while len(said) < 4096:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return said.decode(errors="replace"), None
            chunk = os.read(r, 4096)
            if not chunk:
                break
            said += chunk
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    return said.decode(errors="replace"), status


def _core_uses_pid() -> bool:
    try:
        return Path("/proc/sys/kernel/core_uses_pid").read_text().strip() not in ("", "0")
    except OSError:
        return False


def to_file(crash: Crash, core: Path, pattern: str, seconds: float) -> Released:
    """Writes the core where the file pattern says, as the kernel would have, within
    ``seconds``."""
    values, notes = _values(crash)
    lacking: set[str] = set()
    path = expand(pattern, values, lacking) or ""
    notes += [f"%{s} ({LACKING[s]}) is not known to the gate: left out" for s in sorted(lacking)]
    if "%p" not in pattern and _core_uses_pid():
        path += f".{values['p']}"
    if not path:
        raise ReleaseError(f"the previous pattern {pattern!r} names no file")
    if crash.core_limit < MIN_COREDUMP:
        notes.append(
            f"the process's core limit is {crash.core_limit} bytes: no file written, as the "
            "kernel would have written none"
        )
        return Released("nowhere (core limit)", notes=notes)
    size = os.stat(core).st_size
    if crash.core_limit < size:
        notes.append(f"cut at the process's core limit ({crash.core_limit} of {size} bytes)")
    _write_as(crash, core, path, min(size, crash.core_limit), time.monotonic() + seconds)
    where = path if path.startswith("/") else f"{path} in the working directory of {crash.pid}"
    return Released(where, notes=notes)
