"""signer._internal.lanes: blocking jobs for the event loop, taken in batches by a few threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any
from unittest import mock

import pytest

from signer._internal.lanes import Lanes
from signer.errors import Unavailable


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yields to the loop until ``condition()`` holds (fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.001)


def entering(inside: threading.Event, gate: threading.Event, result: int = 0) -> Callable[[], int]:
    """A job that says it is on a lane (``inside``), then waits for ``gate``."""

    def job() -> int:
        inside.set()
        assert gate.wait(10)
        return result

    return job


def test_each_caller_gets_its_own_result_or_exception() -> None:
    lanes = Lanes(2)

    def job(i: int) -> int:
        if i % 7 == 0:
            raise ValueError(f"job {i}")
        return i * i

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(lanes.run(partial(job, i)) for i in range(1, 200)), return_exceptions=True
        )

    try:
        results = asyncio.run(main())
    finally:
        lanes.shutdown()
    for i, got in enumerate(results, start=1):
        if i % 7 == 0:
            assert isinstance(got, ValueError)
            assert str(got) == f"job {i}"
        else:
            assert got == i * i


def test_jobs_run_on_the_lanes_only() -> None:
    lanes = Lanes(2, name="t")
    names: set[str] = set()

    async def main() -> None:
        await asyncio.gather(
            *(lanes.run(lambda: names.add(threading.current_thread().name)) for _ in range(300))
        )

    try:
        asyncio.run(main())
    finally:
        lanes.shutdown()
    assert names <= {"t-0", "t-1"}
    assert names


def test_queued_quick_jobs_are_taken_together_and_handed_back_in_one_wake_up() -> None:
    """The point of lanes: 9 quick jobs queued behind a busy lane cost 2 loop wake-ups, not 9."""
    lanes = Lanes(1, batch=8)
    inside, gate = threading.Event(), threading.Event()
    wakeups = 0

    def value(i: int) -> int:
        return i

    async def main() -> list[int]:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return real(*args, **kwargs)

        first = asyncio.ensure_future(lanes.run(entering(inside, gate)))
        await asyncio.to_thread(inside.wait, 10)  # the lane is now inside the first job
        with mock.patch.object(loop, "call_soon_threadsafe", counting):
            rest = [
                asyncio.ensure_future(lanes.run(partial(value, i), quick=True))
                for i in range(1, 10)
            ]
            await until(lambda: len(lanes._jobs) == 9)  # all queued behind the busy lane
            gate.set()
            return [await first, *[await r for r in rest]]

    try:
        assert asyncio.run(main()) == list(range(10))
    finally:
        lanes.shutdown()
    # first job: 1; then 9 queued jobs in batches of at most 8: 2.
    assert wakeups == 3


def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    lanes = Lanes(1)
    inside, gate = threading.Event(), threading.Event()

    async def main() -> int:
        blocked = asyncio.ensure_future(lanes.run(entering(inside, gate, 1)))
        other = asyncio.ensure_future(lanes.run(lambda: 2))
        await asyncio.to_thread(inside.wait, 10)  # the blocked caller's job is on the lane
        blocked.cancel()
        gate.set()
        return await other

    try:
        assert asyncio.run(main()) == 2
    finally:
        lanes.shutdown()


def test_shutdown_runs_what_is_queued_then_refuses() -> None:
    lanes = Lanes(1)
    inside, gate = threading.Event(), threading.Event()
    ran: list[int] = []

    async def main() -> None:
        futures: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(lanes.run(entering(inside, gate)))
        ]
        futures += [asyncio.ensure_future(lanes.run(partial(ran.append, i))) for i in range(5)]
        await asyncio.to_thread(inside.wait, 10)  # the lane is inside the first job
        await until(lambda: len(lanes._jobs) == 5)  # and the others are queued
        stopping = asyncio.get_running_loop().run_in_executor(None, lanes.shutdown)
        await until(lambda: lanes._closed)  # shutdown has begun, with the five still queued
        gate.set()
        await stopping
        await asyncio.gather(*futures)
        with pytest.raises(Unavailable, match="the service is shutting down"):
            await lanes.run(lambda: None)

    asyncio.run(main())
    assert ran == [0, 1, 2, 3, 4]


def test_a_lane_survives_a_loop_that_closed_while_its_job_ran() -> None:
    """A caller's event loop may be gone when the answer comes back (a service stopping): the
    answer is dropped and the lane goes on serving other loops."""
    lanes = Lanes(1)
    inside, gate = threading.Event(), threading.Event()
    with pytest.raises(TimeoutError):  # the caller gives up, and its loop closes
        asyncio.run(asyncio.wait_for(lanes.run(entering(inside, gate)), 0.05))
    assert inside.wait(10)  # the lane took the job; its answer goes to a closed loop
    gate.set()

    async def later() -> int:
        return await lanes.run(lambda: 7)

    try:
        assert asyncio.run(later()) == 7
    finally:
        lanes.shutdown()


def test_nothing_waits_behind_a_slow_job_while_a_lane_is_free() -> None:
    """A slow (not quick) job is taken alone: the quick jobs queued behind it go to the other
    lane. And a lane takes only its share of the queue, so two lanes split a backlog."""
    lanes = Lanes(2, batch=8)
    inside, gate = threading.Event(), threading.Event()
    ran_on: dict[int, str] = {}

    def quick(i: int) -> int:
        ran_on[i] = threading.current_thread().name
        return i

    async def main() -> list[int]:
        slow = asyncio.ensure_future(lanes.run(entering(inside, gate, -1)))
        await asyncio.to_thread(inside.wait, 10)  # one lane is inside the slow job
        fast = [asyncio.ensure_future(lanes.run(partial(quick, i), quick=True)) for i in range(6)]
        done = await asyncio.wait_for(asyncio.gather(*fast), 5)  # before the gate opens
        gate.set()
        return [*done, await slow]

    try:
        assert asyncio.run(main()) == [0, 1, 2, 3, 4, 5, -1]
    finally:
        lanes.shutdown()
    assert len(set(ran_on.values())) == 1  # all on the free lane


def test_two_lanes_split_a_backlog_of_quick_jobs() -> None:
    lanes = Lanes(2, batch=8)
    gates = [threading.Event(), threading.Event()]
    entered = threading.Semaphore(0)
    ran_on: dict[int, str] = {}
    # Each lane's first backlog job waits (5 s at most) until the other lane has one too: were
    # the first lane to wake to take all 8, the other would find none, and the wait would fail.
    both_working = threading.Barrier(2, timeout=5)

    def blocker(gate: threading.Event) -> bool:
        entered.release()
        return gate.wait(10)

    def job(i: int) -> int:
        lane = threading.current_thread().name
        first_here = lane not in ran_on.values()
        ran_on[i] = lane
        if first_here:
            both_working.wait()
        return i

    async def main() -> None:
        # Both lanes busy; then 8 quick jobs queue up; then both lanes come free at once.
        blockers = [asyncio.ensure_future(lanes.run(partial(blocker, g))) for g in gates]
        for _ in gates:  # both lanes are inside a blocker
            assert await asyncio.to_thread(entered.acquire, timeout=10)
        backlog = [asyncio.ensure_future(lanes.run(partial(job, i), quick=True)) for i in range(8)]
        await until(lambda: len(lanes._jobs) == 8)
        for g in gates:
            g.set()
        await asyncio.gather(*blockers, *backlog)

    try:
        asyncio.run(main())
    finally:
        lanes.shutdown()
    # The first lane to wake takes its share (4), not all 8: both lanes sign.
    assert len(set(ran_on.values())) == 2


def test_a_lane_stuck_for_good_is_replaced_and_its_call_answered() -> None:
    """Review of issue 12 (the soak): a lane stuck in a call that never returns (p11-kit-client
    after its token host died) took its callers and its capacity with it. replace_stuck answers
    its jobs and starts a new lane; the old one ends if it ever comes back."""
    import asyncio
    import threading
    import time

    from signer._internal.lanes import Lanes

    lanes = Lanes(1)
    taken, release = threading.Event(), threading.Event()

    def never_returns() -> None:
        taken.set()
        release.wait()

    async def scenario() -> tuple[BaseException | None, str]:
        stuck = asyncio.ensure_future(lanes.run(never_returns))
        await asyncio.to_thread(taken.wait)  # the lane has taken it
        assert lanes.replace_stuck(time.monotonic(), lambda: TimeoutError("gone")) == 1
        try:
            await stuck
            failure = None
        except TimeoutError as exc:
            failure = exc
        after = await lanes.run(lambda: "served by the new lane")
        return failure, after

    failure, after = asyncio.run(scenario())
    assert isinstance(failure, TimeoutError)
    assert after == "served by the new lane"
    release.set()  # the stuck one comes back, and ends
    lanes.shutdown()  # which does not wait for a lane it gave up: joined here
    for t in lanes._threads:
        t.join(10)
    assert not any(t.is_alive() for t in lanes._threads)
