"""The supervisor of ``signer run``'s children, with stand-in children (the real ones are
killed and brought back in tests/integration/test_supervision.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest

from signer._internal.children import Child
from signer._internal.supervisor import RESTART_ASKED, Backoff, ChildReport, Supervisor

QUICK = Backoff(first=0.01, most=0.04, stable_after=60.0, loop_exits=3, loop_window=60.0)


class StandIn:
    """A child that can be made to exit, and to fail its next starts."""

    def __init__(self, failing_starts: int = 0, dies_at_start: bool = False) -> None:
        self.status: int | None = None
        self.starts = 0
        self.stops = 0
        self.failing_starts = failing_starts
        self.dies_at_start = dies_at_start
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            self.starts += 1
            if self.failing_starts:
                self.failing_starts -= 1
                raise RuntimeError("the port is taken")
            self.status = 1 if self.dies_at_start else None

    def stop(self) -> None:
        with self.lock:
            self.stops += 1

    def wait(self) -> int:
        return self.status or 0

    def poll(self) -> int | None:
        with self.lock:
            return self.status

    def die(self, status: int = -9) -> None:
        with self.lock:
            self.status = status


class Supervise(Protocol):
    """The ``supervise`` fixture: a started :class:`Supervisor`, stopped after the test."""

    def __call__(
        self,
        children: dict[str, Child],
        backoff: Backoff | None = None,
        on_restart: Callable[[str], None] = ...,
    ) -> Supervisor: ...


@pytest.fixture
def supervise() -> Iterator[Supervise]:
    running: list[Supervisor] = []

    def make(
        children: dict[str, Child],
        backoff: Backoff | None = None,
        on_restart: Callable[[str], None] = lambda name: None,
    ) -> Supervisor:
        s = Supervisor(children, backoff, on_restart)
        s.start()
        running.append(s)
        return s

    yield make
    for s in running:
        s.stop()


def wait_for(s: Supervisor, pred: Callable[[dict[str, ChildReport]], bool]) -> None:
    with s.restarted:
        assert s.restarted.wait_for(lambda: pred(s.report()), timeout=10)


def test_backoff_doubles_up_to_its_cap() -> None:
    b = Backoff(first=0.5, most=30.0)
    assert [b.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert b.delay(10_000) == 30


def test_a_child_that_dies_is_restarted_and_the_hook_runs(supervise: Supervise) -> None:
    host, front = StandIn(), StandIn()
    hooked: list[str] = []
    hook_ran = threading.Event()

    def hook(name: str) -> None:
        hooked.append(name)
        hook_ran.set()

    s = supervise({"host": host, "front": front}, backoff=QUICK, on_restart=hook)
    host.die()
    wait_for(s, lambda r: r["host"].restarts == 1)
    assert host.starts == 1
    assert host.stops == 1  # what was left of it is stopped before it starts again
    assert hook_ran.wait(10)  # the hook runs just after the restart is counted
    assert hooked == ["host"]
    report = s.report()
    assert report["host"].last_status == -9
    assert not report["host"].crash_loop
    assert report["front"].restarts == 0  # the other child is left alone
    assert front.starts == 0


def test_a_hook_may_have_a_running_child_restarted_with_the_one_it_depends_on(
    supervise: Supervise,
) -> None:
    """The TLS front's key session dies with the token host: restarting the host restarts the
    front too, though the front still runs; a failed start of it is retried as after an exit."""
    host, front = StandIn(), StandIn(failing_starts=1)
    holder: list[Supervisor] = []

    def hook(name: str) -> None:
        if name == "host":
            holder[0].restart_soon("front")

    s = supervise({"host": host, "front": front}, backoff=QUICK, on_restart=hook)
    holder.append(s)
    host.die()
    wait_for(s, lambda r: r["front"].restarts == 1)
    assert (front.stops, front.starts) == (2, 2)  # stopped though running; the first start failed
    report = s.report()
    assert report["host"].restarts == 1
    assert report["front"].last_status == RESTART_ASKED  # no exit of its own


def test_a_child_backing_off_does_not_keep_another_from_being_restarted(
    supervise: Supervise,
) -> None:
    """A token host that dies again right after its restart (flapping): the front asked to
    restart with it cannot start while the host is down. The front's retries must not hold
    the watch: the host is restarted meanwhile, then the front comes up (review: one thread
    looping on the front's back-off left the host dead for good)."""
    host = StandIn()
    front = Needs(host)
    holder: list[Supervisor] = []
    flapped = threading.Event()

    def hook(name: str) -> None:
        if name == "host":
            holder[0].restart_soon("front")
            if not flapped.is_set():
                flapped.set()
                host.die()  # gone again before the front's start

    slow_front = Backoff(first=0.05, most=0.05, stable_after=60.0, loop_exits=99)
    s = supervise({"host": host, "front": front}, backoff=slow_front, on_restart=hook)
    holder.append(s)
    host.die()
    wait_for(s, lambda r: r["host"].restarts == 2 and r["front"].restarts == 1)
    assert front.failed >= 1  # it did try while the host was down


class Needs(StandIn):
    """A child that cannot start while ``needed`` is down (nginx and its key's token)."""

    def __init__(self, needed: StandIn) -> None:
        super().__init__()
        self.needed = needed
        self.failed = 0

    def start(self) -> None:
        if self.needed.poll() is not None:
            with self.lock:
                self.starts += 1
                self.failed += 1
            raise RuntimeError("the token host is down")
        super().start()


def test_a_start_that_fails_is_retried_and_reported(
    supervise: Supervise, caplog: pytest.LogCaptureFixture
) -> None:
    host = StandIn(failing_starts=2)
    s = supervise({"host": host}, backoff=QUICK)
    with caplog.at_level(logging.ERROR, logger="signer.supervisor"):
        host.die()
        wait_for(s, lambda r: r["host"].restarts == 1)
    assert host.starts == 3
    assert s.report()["host"].last_error == ""  # cleared once it came back
    failed = [r for r in caplog.records if r.getMessage() == "child did not restart"]
    assert len(failed) == 2
    assert failed[0].__dict__["error"] == "the port is taken"  # an extra= field of the record


def test_a_crash_loop_is_reported_not_hidden(
    supervise: Supervise, caplog: pytest.LogCaptureFixture
) -> None:
    host = StandIn(dies_at_start=True)  # comes up, dies at once, every time
    s = supervise({"host": host}, backoff=QUICK)
    with caplog.at_level(logging.ERROR, logger="signer.supervisor"):
        host.die(1)
        wait_for(s, lambda r: r["host"].crash_loop)
        wait_for(s, lambda r: r["host"].restarts >= 5)  # and it goes on trying
    loops = [r for r in caplog.records if r.getMessage().startswith("crash loop")]
    assert len(loops) == 1  # said once per loop, not at every exit


def test_stop_ends_the_watch_even_during_a_long_delay(supervise: Supervise) -> None:
    host = StandIn()
    s = supervise({"host": host}, backoff=Backoff(first=3600.0, most=3600.0))
    host.die()
    done = threading.Thread(target=s.stop)
    done.start()
    done.join(timeout=5)
    assert not done.is_alive()
    assert host.starts == 0
