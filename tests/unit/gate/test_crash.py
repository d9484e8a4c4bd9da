"""signer.gate._crash: what /proc says of the crashed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from signer.gate._crash import Crash, changed_ids

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
            yield Crash(proc.pid, proc.pid, 0, 0, 11, 0, 0, "host", "!usr!bin!python3")
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
