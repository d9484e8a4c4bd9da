"""signer._internal.children: how the token host and the front run under a supervisor, and
how a process that holds what dumps must not (the dump gate, the scanner's workers) keeps
itself from dumping."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from collections.abc import Iterator

import pytest

from signer._internal.children import never_dump, run_in_foreground
from signer.errors import FailedPrecondition


class FakeChild:
    def __init__(self, on_wait: str) -> None:
        self.on_wait = on_wait
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")

    def stop(self) -> None:
        self.events.append("stop")

    def wait(self) -> int:
        if self.on_wait == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before kill returns
            return 0
        return 3  # exited on its own

    def poll(self) -> int | None:
        return None  # running, as far as anyone polling knows


@pytest.fixture(autouse=True)
def restore_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_sigterm_stops_the_child_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    child = FakeChild("sigterm")
    assert run_in_foreground(child, "serving here", "thing") == 0
    assert child.events == ["start", "stop"]
    assert capsys.readouterr().out == "serving here\n"


def test_a_child_that_exits_on_its_own_is_an_error_naming_it() -> None:
    child = FakeChild("exit")
    with pytest.raises(FailedPrecondition, match="thing exited unexpectedly with status 3"):
        run_in_foreground(child, "serving here", "thing")
    assert child.events == ["start", "stop"]


@pytest.mark.parametrize(("hard", "soft"), [(resource.RLIM_INFINITY, 1), (1 << 20, 1), (0, 0)])
def test_never_dump_is_not_dumpable_with_rlimit_core_1(hard: int, soft: int) -> None:
    """RLIMIT_CORE 1 (what a pipe handler honours), never "no limit": with an unlimited hard
    limit, min(1, hard) is -1, RLIM_INFINITY, which the gate asked for before. In a child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
            never_dump()
            now = resource.getrlimit(resource.RLIMIT_CORE)[0]
            dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
            os.write(w, f"{now} {dumpable}".encode())
        except BaseException as exc:  # said, so that the test names it
            os.write(w, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert got == f"{soft} 0"
