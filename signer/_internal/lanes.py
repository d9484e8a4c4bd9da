"""Blocking work for the event loop (PKCS#11 calls, the store), done by a few threads that take
whatever has queued, and hand the results back to the loop in one wake-up per batch.

``loop.run_in_executor`` costs two thread hand-offs per call (wake a worker; wake the loop
through its self-pipe) and, with a worker per session, a crowd of threads contending for the
GIL each time a PKCS#11 call returns. Measured on the bare service at 64 callers: 37 context
switches per signature, most of the server's CPU. Here a lane that wakes signs every job it can
take before it sleeps again, and the loop is woken once per batch of results.

Only *quick* jobs are taken together (a signature: a fraction of a millisecond), and a lane
takes no more than its share of the queue, so no job waits behind a slow one (a key generation:
seconds) or behind a batch while another lane is idle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from signer.errors import Unavailable

T = TypeVar("T")

_Job = tuple[Callable[[], Any], asyncio.Future[Any], bool]  # (work, its future, quick)


class Lanes:
    """``threads`` lanes. A lane takes the next job alone unless it is quick; then it takes up
    to ``batch`` consecutive quick jobs, and no more than its share (queued / lanes)."""

    def __init__(self, threads: int, batch: int = 8, name: str = "lane") -> None:
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        self._idle = 0
        self._batch = batch
        self._lanes = threads
        self._closed = False
        self._name = name
        # What each lane is doing: since when, and the futures of the jobs it took.
        self._busy: dict[int, tuple[float, list[asyncio.Future[Any]]]] = {}
        self._retired: set[int] = set()  # lanes replaced while stuck: they end when they return
        self._next = threads
        self._threads = [
            threading.Thread(target=self._lane, args=(i,), name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    @property
    def queued(self) -> int:
        """Jobs waiting for a lane (read without the lock: for a gauge, a moment's value)."""
        return len(self._jobs)

    async def run(self, fn: Callable[[], T], *, quick: bool = False) -> T:
        """``fn()`` on a lane. ``quick``: it takes well under a millisecond and may share a
        lane's batch with other quick jobs."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._cv:
            if self._closed:  # the service is stopping: a call that comes now is not served
                raise Unavailable("the service is shutting down")
            self._jobs.append((fn, fut, quick))
            if self._idle:
                self._cv.notify()
        return await fut

    def fail_queued(self, error: Callable[[], BaseException]) -> int:
        """Answers every job still queued with ``error()`` (jobs already on a lane go on);
        returns how many. For when what they would wait on cannot serve them (a token that
        stopped answering): better an answer now than a place in a queue that does not move."""
        with self._cv:
            jobs, self._jobs = list(self._jobs), collections.deque()
        hand_back([(fut, False, error()) for _, fut, _ in jobs])
        return len(jobs)

    def replace_stuck(self, since: float, error: Callable[[], BaseException]) -> int:
        """Lanes busy with jobs taken before ``since`` (time.monotonic()) are given up: their
        jobs are answered with ``error()``, and a new lane takes each one's place. For a thread
        stuck for good in a call that will not return (see Token._abandon_dead); the old thread
        ends if it ever comes back. Returns how many were replaced."""
        with self._cv:
            stuck = [
                (lane, futs)
                for lane, (started, futs) in self._busy.items()
                if started < since and lane not in self._retired
            ]
            for lane, _ in stuck:
                self._retired.add(lane)
                fresh = threading.Thread(
                    target=self._lane,
                    args=(self._next,),
                    name=f"{self._name}-{self._next}",
                    daemon=True,
                )
                self._next += 1
                self._threads.append(fresh)
                fresh.start()
        hand_back([(fut, False, error()) for _, futs in stuck for fut in futs])
        return len(stuck)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Runs what is queued, then stops the lanes (blocking: call it off the loop). A lane
        still busy after ``timeout`` is left behind (a daemon thread stuck in a call that does
        not return must not keep a SIGTERM from stopping the service: the soak)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.ident not in self._stuck_idents():
                t.join(max(0.0, deadline - time.monotonic()))

    def _stuck_idents(self) -> set[int | None]:
        with self._cv:
            return {t.ident for i, t in enumerate(self._threads) if i in self._retired}

    def _lane(self, lane: int) -> None:
        while True:
            with self._cv:
                self._busy.pop(lane, None)
                if lane in self._retired:
                    return
                while not self._jobs and not self._closed:
                    self._idle += 1
                    self._cv.wait()
                    self._idle -= 1
                if not self._jobs:
                    return
                queued = len(self._jobs)
                take = [self._jobs.popleft()]
                if take[0][2]:  # quick: with the quick jobs behind it, up to this lane's share
                    share = min(self._batch, math.ceil(queued / self._lanes))
                    while self._jobs and len(take) < share and self._jobs[0][2]:
                        take.append(self._jobs.popleft())
                self._busy[lane] = (time.monotonic(), [fut for _, fut, _ in take])
            done: list[Outcome] = []
            for fn, fut, _ in take:
                try:
                    done.append((fut, True, fn()))
                except BaseException as exc:  # handed to the awaiting call
                    done.append((fut, False, exc))
            hand_back(done)


# A future of the event loop, and what it gets: (True, result) or (False, exception).
Outcome = tuple[asyncio.Future[Any], bool, Any]


def hand_back(done: list[Outcome]) -> None:
    """From a thread: settles the futures of each event loop in one wake-up of that loop."""
    loops: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in done:
        loops.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, outcomes in loops.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
            loop.call_soon_threadsafe(_settle, outcomes)


def _settle(done: list[Outcome]) -> None:
    for fut, ok, value in done:
        if fut.done():  # cancelled meanwhile, or already answered
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
