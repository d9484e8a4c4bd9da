"""Release of a clean core where dumps went before the gate: chained to the pipe handler it
replaced, or written where a file pattern says as the crashed process's user; each within a
deadline, and only while ``/proc/PID`` is still the crashing process.

In process, with a live ``sleep`` as the crashed process. A unit test cannot put a process in
the kernel's dumping state, so :class:`Dumping` says it is; everything else read from
``/proc`` is real. tests/integration/test_dump_gate.py releases real dumps with the real
kernel, where the state is real too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from signer.gate._crash import AT_SECURE, Crash, ProcessDir
from signer.gate._release import ReleaseError, _keep_only, _wait_child, to_file, to_pipe
from tests.unit.gate.kit import T, core

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write as another user")


class Dumping(ProcessDir):
    """A live process the kernel is said to be dumping (the one state a test cannot make)."""

    def dumping(self) -> bool:
        return True


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A live process (uid 65534) whose working directory is its own."""
    cwd = tmp_path / "victim-cwd"
    cwd.mkdir()
    os.chown(cwd, 65534, 65534)
    tmp_path.chmod(0o755)
    proc = subprocess.Popen(["sleep", "60"], cwd=cwd, user=65534, group=65534)
    yield proc
    proc.kill()
    proc.wait()


def crash_of(proc: subprocess.Popen[bytes], core_limit: int = 2**64 - 1) -> Crash:
    crash = Crash(proc.pid, proc.pid, 65534, 65534, 11, T, core_limit, "host", "!usr!bin!sleep")
    return replace(crash, process=Dumping.open(proc.pid))


def auxv_of(pid: int | str) -> bytes:
    return Path(f"/proc/{pid}/auxv").read_bytes()


def write_core(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "core"
    path.write_bytes(data)
    return path


@pytest.fixture
def clean(tmp_path: Path, victim: subprocess.Popen[bytes]) -> tuple[Path, bytes]:
    """A clean core of the victim's: its NT_AUXV is the victim's auxiliary vector."""
    data = core(auxv=auxv_of(victim.pid))
    return write_core(tmp_path, data), data


# --- a pipe ------------------------------------------------------------------------------------


def test_a_clean_core_is_chained_to_the_pipe_handler_the_gate_replaced(
    tmp_path: Path, victim: subprocess.Popen[bytes], clean: tuple[Path, bytes]
) -> None:
    record = tmp_path / "chained"
    script = tmp_path / "coredump-handler"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}.argv\nwc -c > {record}.size\n')
    script.chmod(0o755)
    path, data = clean
    pattern = f"{script} %P %p %i %u %g %s %t %c %h %e %E %% %d %F"
    done = to_pipe(crash_of(victim), path, pattern, 60)
    pid = str(victim.pid)
    assert record.with_suffix(".argv").read_text().splitlines() == [
        *(pid, pid, pid, "65534", "65534", "11", str(T), str(2**64 - 1), "host"),
        *("sleep", "!usr!bin!sleep", "%", "1"),
    ]  # %d given as the kernel gave it; %F (which the gate cannot know) left out, and said so
    assert int(record.with_suffix(".size").read_text()) == len(data)
    assert not any("%d" in n for n in done.notes)
    assert any("%F" in n for n in done.notes)


def test_a_chained_handler_that_fails_keeps_the_core(
    victim: subprocess.Popen[bytes], clean: tuple[Path, bytes]
) -> None:
    with pytest.raises(ReleaseError, match="exited with status 1"):
        to_pipe(crash_of(victim), clean[0], "/bin/false %P", 60)


def test_a_chained_handler_that_hangs_is_killed_at_the_deadline(
    tmp_path: Path, victim: subprocess.Popen[bytes], clean: tuple[Path, bytes]
) -> None:
    """It reads the core and never exits: the gate kills it rather than hold one of the
    kernel's core_pipe_limit slots."""
    pidfile = tmp_path / "hung.pid"
    script = tmp_path / "hung"
    script.write_text(f"#!/bin/sh\necho $$ > {pidfile}\ncat > /dev/null\nexec sleep 3600\n")
    script.chmod(0o755)
    began = time.monotonic()
    with pytest.raises(ReleaseError, match="did not exit in time"):
        to_pipe(crash_of(victim), clean[0], str(script), 1.0)
    assert time.monotonic() - began < 30
    assert not Path(f"/proc/{pidfile.read_text().strip()}").exists()


def test_a_process_gone_since_the_gate_opened_it_is_not_chained(
    victim: subprocess.Popen[bytes], clean: tuple[Path, bytes]
) -> None:
    """The real ProcessDir: once the process is gone, the descriptor reads nothing, whoever
    has the pid now."""
    crash = replace(crash_of(victim), process=ProcessDir.open(victim.pid))
    victim.kill()
    victim.wait()
    assert crash.process is not None
    assert crash.process.status("Uid") is None
    with pytest.raises(ReleaseError, match="not \\(or no longer\\) the crashing process"):
        to_pipe(crash, clean[0], "/bin/cat", 60)


@pytest.mark.parametrize("release", ["pipe", "file"])
@pytest.mark.parametrize(
    ("auxv", "said"),
    [
        ("another", "is another process than the one this core is of"),
        ("none", "has no auxiliary vector"),
        ("secure", "ran with other ids than its own (AT_SECURE)"),
    ],
)
def test_a_core_that_is_not_the_held_processs_is_not_released_for_it(
    tmp_path: Path, victim: subprocess.Popen[bytes], release: str, auxv: str, said: str
) -> None:
    """The review's race: a set-user-ID process killed during its dump, its pid taken by a
    crashing process of the user's (dumping too: what /proc shows checks out). The core's own
    auxiliary vector tells them apart; one of a process with other ids is never written as
    the user."""
    theirs = auxv_of(victim.pid)
    vector = {
        "another": auxv_of("self"),  # another process's (pytest's)
        "none": None,
        "secure": _with(theirs, AT_SECURE, 1),
    }[auxv]
    path = write_core(tmp_path, core(auxv=vector))
    to, where = (to_pipe, "/bin/cat") if release == "pipe" else (to_file, "core")
    with pytest.raises(ReleaseError, match=re.escape(said)):
        to(crash_of(victim), path, where, 60)
    assert list((tmp_path / "victim-cwd").iterdir()) == []


def _with(auxv: bytes, key: int, value: int) -> bytes:
    pairs = [p for p in struct.iter_unpack("<QQ", auxv) if p[0] not in (key, 0)]
    return b"".join(struct.pack("<QQ", k, v) for k, v in [*pairs, (key, value), (0, 0)])


def test_a_dump_the_kernel_made_only_for_suid_dumpable_is_not_written_as_the_user(
    tmp_path: Path, victim: subprocess.Popen[bytes], clean: tuple[Path, bytes]
) -> None:
    """%d 2: the process was not dumpable as itself (set-user-ID, or it made itself so)."""
    crash = replace(crash_of(victim), dump_mode=2)
    with pytest.raises(ReleaseError, match="other ids than its own"):
        to_file(crash, clean[0], "core", 60)
    assert list((tmp_path / "victim-cwd").iterdir()) == []


# --- a file ------------------------------------------------------------------------------------


def test_a_clean_core_is_written_where_a_file_pattern_says_as_the_processs_user(
    tmp_path: Path, victim: subprocess.Popen[bytes], clean: tuple[Path, bytes]
) -> None:
    path, data = clean
    to_file(crash_of(victim), path, "core.%e", 60)
    uses_pid = Path("/proc/sys/kernel/core_uses_pid").read_text().strip() != "0"
    name = "core.sleep" + (f".{victim.pid}" if uses_pid else "")
    out = tmp_path / "victim-cwd" / name
    assert out.read_bytes() == data
    st = out.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600)


def test_a_core_limit_of_zero_writes_no_file_as_the_kernel_would_not(
    tmp_path: Path, victim: subprocess.Popen[bytes], clean: tuple[Path, bytes]
) -> None:
    done = to_file(crash_of(victim, core_limit=0), clean[0], "core", 60)
    assert list((tmp_path / "victim-cwd").iterdir()) == []
    assert "core limit" in done.notes[-1]


def test_a_process_gone_since_the_gate_opened_it_gets_no_file(
    tmp_path: Path, victim: subprocess.Popen[bytes], clean: tuple[Path, bytes]
) -> None:
    crash = replace(crash_of(victim), process=ProcessDir.open(victim.pid))
    victim.kill()
    victim.wait()
    with pytest.raises(ReleaseError, match="no longer\\) the crashing process"):
        to_file(crash, clean[0], "core", 60)
    assert list((tmp_path / "victim-cwd").iterdir()) == []


def test_the_writing_child_is_killed_at_its_deadline() -> None:
    """The file release's child stuck (a working directory on a hung file system): killed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        hang_r, _hang_w = os.pipe()
        os.read(hang_r, 1)  # nothing ever comes
        os._exit(0)
    os.close(w)
    _, status = _wait_child(pid, r, time.monotonic() + 0.5)
    assert status is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # killed and reaped


def test_the_writing_child_keeps_only_the_descriptors_it_needs() -> None:
    """After the switch to the user's ids nothing of root's stays open in it: not the kernel's
    pipe on 0, not the gate's log or the quarantine."""
    secret_r, secret_w = os.pipe()  # stands for the gate's log and the quarantine's files
    secret = f"pipe:[{os.fstat(secret_r).st_ino}]"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        _keep_only((w,))
        links = {}
        for n in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own, closed by now
                links[n] = os.readlink(f"/proc/self/fd/{n}")
        os.write(w, json.dumps(links).encode())
        os._exit(0)
    os.close(w)
    said, status = _wait_child(pid, r, time.monotonic() + 30)
    for fd in (secret_r, secret_w):
        os.close(fd)
    assert status == 0
    links = json.loads(said)
    assert secret not in links.values()
    assert [links[str(fd)] for fd in (0, 1, 2)] == ["/dev/null"] * 3
    assert len(links) == 4  # 0-2 and the kept pipe
