"""Restarting the children of ``signer run`` (the token host, the TLS front) when they die.

Under systemd or a container runtime a dead process is restarted by the platform; on one
machine ``signer run`` is the platform, so it does the same: a child that exits on its own is
restarted after a delay that doubles with each exit in a row (``first`` up to ``most``), and
is back to ``first`` once a child has stayed up ``stable_after`` seconds. A child that exits
``loop_exits`` times within ``loop_window`` seconds is in a crash loop: that is logged as an
error (once per loop) and kept in :meth:`Supervisor.report`, never hidden behind the retries,
which go on at the longest delay. ``on_restart(name)`` runs after each restart (the service
then looks for its token at once rather than at its next back-off), and may ask for another
child to be restarted too (:meth:`Supervisor.restart_soon`: the TLS front, whose key's token
session died with the token host).

This is not a retry-around-a-call (tenacity and the like): what matters here is the
accounting across a child's whole life (how long it stayed up, how often it died lately), and
the supervisor runs on a thread of its own because starting a child blocks (p11-kit server
creates its socket, nginx must listen) and because a child's parent-death signal is tied to
the thread that started it, which must outlive the child.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from signer._internal.children import Child

log = logging.getLogger("signer.supervisor")  # named for the component: signer._internal.logs

POLL_SECONDS = 0.2
RESTART_ASKED = -1
"""The status recorded for a child restarted because :meth:`Supervisor.restart_soon` asked."""


@dataclass(frozen=True)
class Backoff:
    first: float = 0.5
    most: float = 30.0
    stable_after: float = 30.0
    loop_exits: int = 5
    loop_window: float = 60.0

    def delay(self, exits_in_a_row: int) -> float:
        return float(min(self.most, self.first * 2 ** min(exits_in_a_row - 1, 30)))


@dataclass
class ChildReport:
    """What the supervisor has seen of one child."""

    restarts: int = 0
    last_status: int | None = None
    crash_loop: bool = False
    last_error: str = ""
    exits: deque[float] = field(default_factory=deque)


class Supervisor:
    """Watches ``children`` (already started) from a thread of its own until :meth:`stop`."""

    def __init__(
        self,
        children: dict[str, Child],
        backoff: Backoff | None = None,
        on_restart: Callable[[str], None] = lambda name: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._children = children
        self._backoff = backoff or Backoff()
        self._on_restart = on_restart
        self._clock = clock
        self._stop = threading.Event()
        # Reentrant: a waiter on ``restarted`` may read report() in its predicate.
        self._lock = threading.RLock()
        self._reports = {name: ChildReport() for name in children}
        self._thread: threading.Thread | None = None
        self._asked: set[str] = set()
        self.restarted = threading.Condition(self._lock)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops watching (the children themselves are the caller's to stop, afterwards)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def restart_soon(self, name: str) -> None:
        """Restarts ``name`` at the thread's next look, though it runs: it depends on a child
        that was just restarted. A failed start is retried with back-off, as after an exit."""
        with self._lock:
            self._asked.add(name)

    def report(self) -> dict[str, ChildReport]:
        with self._lock:
            return {
                name: dataclasses.replace(r, exits=deque(r.exits))
                for name, r in self._reports.items()
            }

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        # Each child on its own clock: one backing off between failed starts is only skipped
        # until its next try, never waited for, so the others are watched and restarted
        # meanwhile (a front that cannot start while its token host is down must not keep the
        # token host from being restarted; review).
        up_since = {name: self._clock() for name in self._children}
        in_a_row = dict.fromkeys(self._children, 0)
        retry_at: dict[str, float] = {}  # the children that are down: when to try again
        status_of: dict[str, int] = {}
        while not self._stop.wait(POLL_SECONDS):
            for name, child in self._children.items():
                if self._stop.is_set():
                    return
                if name in retry_at:
                    if self._clock() < retry_at[name]:
                        continue
                    if self._restart(name, child):
                        del retry_at[name]
                        up_since[name] = self._clock()
                    else:
                        in_a_row[name] += 1
                        self._exited(name, status_of[name], self._clock())
                        retry_at[name] = self._retry(name, status_of[name], in_a_row[name])
                    continue
                status = child.poll()
                with self._lock:
                    asked = name in self._asked
                    self._asked.discard(name)
                if asked and status is None:
                    log.warning("restarting child as asked", extra={"child": name})
                    if self._restart(name, child):
                        up_since[name] = self._clock()
                        continue
                    status = RESTART_ASKED  # stopped and not back: retried as after an exit
                if status is None:
                    if self._clock() - up_since[name] >= self._backoff.stable_after:
                        self._stable(name)
                    continue
                now = self._clock()
                if now - up_since[name] >= self._backoff.stable_after:
                    in_a_row[name] = 0
                in_a_row[name] += 1
                status_of[name] = status
                self._exited(name, status, now)
                retry_at[name] = self._retry(name, status, in_a_row[name])

    def _retry(self, name: str, status: int, exits_in_a_row: int) -> float:
        """When to try to start ``name`` again; said in the log."""
        delay = self._backoff.delay(exits_in_a_row)
        log.error(
            "child exited; restarting it",
            extra={"child": name, "status": status, "in_seconds": delay},
        )
        return self._clock() + delay

    def _exited(self, name: str, status: int, now: float) -> None:
        b = self._backoff
        with self._lock:
            r = self._reports[name]
            r.last_status = status
            r.exits.append(now)
            while r.exits and r.exits[0] < now - b.loop_window:
                r.exits.popleft()
            looping = len(r.exits) >= b.loop_exits
            newly = looping and not r.crash_loop
            r.crash_loop = looping
        if newly:
            log.error(
                "crash loop: child keeps exiting",
                extra={
                    "child": name,
                    "exits": b.loop_exits,
                    "within_seconds": b.loop_window,
                    "retrying_every_seconds": b.most,
                },
            )

    def _stable(self, name: str) -> None:
        with self._lock:
            r = self._reports[name]
            ended, r.crash_loop = r.crash_loop, False
        if ended:
            log.warning("crash loop over: child stayed up", extra={"child": name})

    def _restart(self, name: str, child: Child) -> bool:
        try:
            child.stop()  # what is left of it: other processes of its group, its socket
            child.start()
        except Exception as exc:
            with self._lock:
                self._reports[name].last_error = str(exc)
            log.error("child did not restart", extra={"child": name, "error": str(exc)})
            return False
        with self._lock:
            self._reports[name].restarts += 1
            self._reports[name].last_error = ""
            self.restarted.notify_all()
        log.warning("child restarted", extra={"child": name})
        try:
            self._on_restart(name)
        except Exception:
            log.exception("after-restart hook failed", extra={"child": name})
        return True
