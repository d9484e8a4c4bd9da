"""signer._internal.lanes: blocking jobs for the event loop, taken in batches by a few threads."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from signer._internal.lanes import Lanes
from signer.errors import Unavailable


def test_each_caller_gets_its_own_result_or_exception() -> None:
    lanes = Lanes(2)

    def job(i: int) -> int:
        if i % 7 == 0:
            raise ValueError(f"job {i}")
        return i * i

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(lanes.run(lambda i=i: job(i)) for i in range(1, 200)), return_exceptions=True
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
        await asyncio.gather(*(lanes.run(lambda: names.add(threading.current_thread().name))
                               for _ in range(300)))  # fmt: skip

    try:
        asyncio.run(main())
    finally:
        lanes.shutdown()
    assert names <= {"t-0", "t-1"}
    assert names


def test_queued_quick_jobs_are_taken_together_and_handed_back_in_one_wake_up() -> None:
    """The point of lanes: 9 quick jobs queued behind a busy lane cost 2 loop wake-ups, not 9."""
    lanes = Lanes(1, batch=8)
    gate = threading.Event()
    wakeups = 0

    async def main() -> list[int]:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        first = asyncio.ensure_future(lanes.run(lambda: gate.wait(10) and 0))
        await asyncio.sleep(0.05)  # the lane is now inside the first job
        rest = [asyncio.ensure_future(lanes.run(lambda i=i: i, quick=True)) for i in range(1, 10)]
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
    gate = threading.Event()

    async def main() -> int:
        blocked = asyncio.ensure_future(lanes.run(lambda: gate.wait(10) and 1))
        other = asyncio.ensure_future(lanes.run(lambda: 2))
        await asyncio.sleep(0.05)
        blocked.cancel()
        gate.set()
        return await other

    try:
        assert asyncio.run(main()) == 2
    finally:
        lanes.shutdown()


def test_shutdown_runs_what_is_queued_then_refuses() -> None:
    lanes = Lanes(1)
    gate = threading.Event()
    ran: list[int] = []

    async def main() -> None:
        futures = [asyncio.ensure_future(lanes.run(lambda: gate.wait(10)))]
        futures += [asyncio.ensure_future(lanes.run(lambda i=i: ran.append(i))) for i in range(5)]
        await asyncio.sleep(0.05)
        stopping = asyncio.get_running_loop().run_in_executor(None, lanes.shutdown)
        await asyncio.sleep(0.05)
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
    gate = threading.Event()
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(lanes.run(lambda: gate.wait(10)), 0.05))
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
    gate = threading.Event()
    ran_on: dict[int, str] = {}

    def quick(i: int) -> int:
        ran_on[i] = threading.current_thread().name
        return i

    async def main() -> list[int]:
        slow = asyncio.ensure_future(lanes.run(lambda: gate.wait(10) and -1))
        await asyncio.sleep(0.05)  # one lane is inside the slow job
        fast = [asyncio.ensure_future(lanes.run(lambda i=i: quick(i), quick=True))
                for i in range(6)]  # fmt: skip
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
    ran_on: dict[int, str] = {}

    def job(i: int) -> int:
        ran_on[i] = threading.current_thread().name
        time.sleep(0.02)  # long enough for the second lane to wake while the first works
        return i

    async def main() -> None:
        # Both lanes busy; then 8 quick jobs queue up; then both lanes come free at once.
        blockers = [asyncio.ensure_future(lanes.run(g.wait)) for g in gates]
        await asyncio.sleep(0.05)
        backlog = [asyncio.ensure_future(lanes.run(lambda i=i: job(i), quick=True))
                   for i in range(8)]  # fmt: skip
        await asyncio.sleep(0.05)
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
    lanes.shutdown()
    assert not any(t.is_alive() for t in lanes._threads)
