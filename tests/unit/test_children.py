"""signer._internal.children.run_in_foreground: how the token host and the front run under a
supervisor."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from signer._internal.children import run_in_foreground
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
