"""signer.gate._crash: what /proc says of the crashed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest

from signer.gate._crash import Crash, ProcessDir, changed_ids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change a process's ids")


@contextmanager
def process(code: str) -> Iterator[Crash]:
    """A child running ``code`` then waiting, as a Crash the gate would be given."""
    ready = "import sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"
    with subprocess.Popen(
        [sys.executable, "-c", f"{code}\n{ready}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            crash = Crash(proc.pid, proc.pid, 0, 0, 11, 0, 0, "host", "!usr!bin!python3")
            yield replace(crash, process=ProcessDir.open(proc.pid))
        finally:
            proc.send_signal(signal.SIGKILL)


@pytest.mark.parametrize("code", ["pass", "import os; os.setresuid(65534, 65534, 65534)"])
def test_a_process_with_its_own_ids_throughout_may_be_written_as_itself(code: str) -> None:
    with process(code) as crash:
        assert changed_ids(crash) is False


@pytest.mark.parametrize(
    "code",
    [
        "import os; os.setresuid(65534, 65534, 0)",  # a set-user-ID program keeps its saved id
        "import os; os.setresgid(65534, 0, 65534)",  # set-group-ID
    ],
)
def test_a_process_with_other_ids_is_not_written_into_its_directory(code: str) -> None:
    """The review's attack: a set-user-ID program crashed in a directory its caller chose."""
    with process(code) as crash:
        assert changed_ids(crash) is True


def test_a_process_that_is_gone_is_not_written_either() -> None:
    with process("pass") as crash:
        pass
    assert changed_ids(crash) is True


def test_a_crash_without_proc_is_never_written_as_itself() -> None:
    with process("pass") as crash:
        assert changed_ids(replace(crash, process=None)) is True


# --- which process the pid names -------------------------------------------------------------


def test_a_live_process_that_is_not_dumping_core_is_not_attached() -> None:
    """What the gate finds at the pid when the crashed process was killed during its dump and
    the pid went to another: not read (the real dumping state is tested with the kernel)."""
    with process("pass") as crash:
        attached, why = replace(crash, process=None).attached()
    assert attached.process is None
    assert why is not None
    assert "is not dumping core" in why


def test_a_pid_with_no_process_is_not_attached() -> None:
    with process("pass") as crash:
        pass
    attached, why = replace(crash, process=None).attached()
    assert attached.process is None
    assert why is not None
    assert "cannot be opened" in why


def test_a_held_directory_reads_nothing_once_its_process_has_gone() -> None:
    """The descriptor names the process opened, never a later one with the same pid."""
    with process("pass") as crash:
        assert crash.process is not None
        assert crash.process.status("Uid") is not None
    assert crash.process.status("Uid") is None
    assert crash.process.read("comm") is None
    with pytest.raises(OSError):
        crash.process.open_dir("cwd")


# --- the kernel's arguments ----------------------------------------------------------------


KERNEL = ["--", "4242", "4243", "1000", "1000", "11", "1700000000", "0", "1"]


@pytest.mark.parametrize("hostname", ["--", "-h", "--config", "a b", ""])
def test_any_hostname_a_containers_root_chooses_is_read_as_the_hostname(hostname: str) -> None:
    crash, problem = Crash.from_kernel([*KERNEL, hostname, "!usr!bin!victim"])
    assert problem is None
    assert (crash.pid, crash.tid, crash.uid, crash.time) == (4242, 4243, 1000, 1700000000)
    assert (crash.hostname, crash.exe) == (hostname, "/usr/bin/victim")


@pytest.mark.parametrize(
    "args",
    [
        KERNEL[1:],  # two missing
        [*KERNEL, "host", "!a", "extra"],
        ["--", "x", *KERNEL[2:], "host", "!usr!bin!victim"],
        [],
    ],
)
def test_arguments_that_are_not_the_kernels_are_a_problem_not_a_crash(args: list[str]) -> None:
    crash, problem = Crash.from_kernel(args)
    assert problem is not None
    assert "is core_pattern the gate's?" in problem
    assert crash.dir_name()  # still a quarantine entry to keep the dump in
