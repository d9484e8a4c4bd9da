"""How much one caller can make the service refuse, and so write into its audit log and its log.

Every call is recorded, refused ones included: that is the audit log's promise. So a caller with
no grant at all could fill the disk with refusals (issue 11: 14.5 MB of audit log and 36 MB of
log from ten calls, before names were bounded). Each record is bounded now (:func:`shown`); this
bounds their number. A caller whose calls were refused ``budget`` times (bad input, no
permission) within ``window`` seconds is *throttled* for the rest of that window: its calls are
answered RESOURCE_EXHAUSTED at once, without running, without a log line and without a record of
their own; when the window ends, one record says how many calls were refused meanwhile.

Pure bookkeeping, no I/O; the interceptor in :mod:`signer._internal.server` asks it about every
call.
Memory is bounded too: at most ``max_callers`` callers are tracked (the oldest quiet ones go).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from signer.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    SignerError,
    Unauthenticated,
)

# The statuses that mean the caller was wrong (rather than the service or the key's state),
# or asked for more than it may have at once (its running calls, its import tokens): a burst
# refused RESOURCE_EXHAUSTED must not write more records than the budget allows either.
REFUSALS: tuple[type[SignerError], ...] = (
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    ResourceExhausted,
)


@dataclass
class _Caller:
    window_start: float
    refused: int = 0
    blocked_until: float = 0.0
    suppressed: int = 0  # calls answered RESOURCE_EXHAUSTED while blocked


class RefusalThrottle:
    """``budget`` refusals per caller per ``window`` seconds; ``budget`` 0 turns it off."""

    def __init__(
        self,
        budget: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = 4096,
    ) -> None:
        self.budget = budget
        self.window = window
        self._clock = clock
        self._max = max_callers
        self._callers: dict[str, _Caller] = {}

    def wait(self, caller: str) -> float:
        """0 if ``caller``'s call may run; else the seconds left of its throttling (the call is
        counted as refused meanwhile)."""
        entry = self._callers.get(caller)
        if entry is None or entry.blocked_until <= self._clock():
            return 0.0
        entry.suppressed += 1
        return entry.blocked_until - self._clock()

    def refused(self, caller: str) -> bool:
        """Counts a refusal of ``caller``'s; True when it has just used up its budget."""
        if self.budget <= 0:
            return False
        now = self._clock()
        entry = self._callers.get(caller)
        if entry is None:
            entry = self._track(caller, now)
        elif now - entry.window_start >= self.window:
            entry.window_start, entry.refused = now, 0
        entry.refused += 1
        if entry.refused == self.budget:
            entry.blocked_until = entry.window_start + self.window
            return True
        return False

    def ended(self, everyone: bool = False) -> list[tuple[str, int]]:
        """Callers whose throttling is over (``everyone``: or not yet, at shutdown), each with
        the calls refused while it lasted; each is reported once. (A caller throttled again
        before this is asked has both spells reported together, when the second ends.)"""
        now = self._clock()
        out = []
        for name, entry in list(self._callers.items()):
            if entry.suppressed and (everyone or entry.blocked_until <= now):
                out.append((name, entry.suppressed))
                entry.suppressed = 0
            if entry.blocked_until <= now and now - entry.window_start >= self.window:
                del self._callers[name]
        return out

    def _track(self, caller: str, now: float) -> _Caller:
        if len(self._callers) >= self._max:
            # The oldest caller that is neither blocked nor owed a summary makes room; if every
            # one is, the oldest goes anyway (its summary is lost, not the bound).
            quiet = [n for n, e in self._callers.items() if not e.suppressed]
            del self._callers[quiet[0] if quiet else next(iter(self._callers))]
        entry = self._callers[caller] = _Caller(now)
        return entry


class InFlight:
    """How many calls one caller, and all together, may have running: a call whose caller has
    gone still runs to its end (so that what it does is recorded), and a caller could otherwise
    start any number of them by cancelling each at once (issue 11's review: 623 running after
    1.5 s of 5-ms deadlines). ``enter`` says why not, or counts the call in; ``leave`` out."""

    def __init__(self, per_caller: int, total: int) -> None:
        self.per_caller = per_caller
        self.total = total
        self._callers: dict[str, int] = {}
        self._running = 0

    def enter(self, caller: str) -> str | None:
        mine = self._callers.get(caller, 0)
        if mine >= self.per_caller:
            return f"{mine} calls of this caller are running, the most allowed"
        if self._running >= self.total:
            return f"{self._running} calls are running, the most this service takes at once"
        self._callers[caller] = mine + 1
        self._running += 1
        return None

    def leave(self, caller: str) -> None:
        self._running -= 1
        left = self._callers[caller] - 1
        if left:
            self._callers[caller] = left
        else:
            del self._callers[caller]
