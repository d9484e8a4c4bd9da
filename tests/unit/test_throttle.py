"""The refusal throttle: a budget of refused calls per caller per window, then RESOURCE_EXHAUSTED
until the window ends, and one summary per throttled caller."""

from __future__ import annotations

from signer._internal.throttle import RefusalThrottle
from signer.errors import shown


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_caller_is_throttled_when_its_budget_is_spent_until_the_window_ends() -> None:
    clock = Clock()
    t = RefusalThrottle(3, 60.0, clock)
    assert [t.refused("uid:7") for _ in range(3)] == [False, False, True]
    clock.now += 10
    assert t.wait("uid:7") == 50.0
    assert t.wait("uid:8") == 0.0  # others are not affected
    assert t.wait("uid:7") == 50.0
    assert t.ended() == []  # still throttled
    clock.now += 50
    assert t.wait("uid:7") == 0.0
    assert t.ended() == [("uid:7", 2)]
    assert t.ended() == []  # reported once


def test_refusals_spread_over_windows_never_throttle() -> None:
    clock = Clock()
    t = RefusalThrottle(3, 60.0, clock)
    for _ in range(10):
        assert not t.refused("uid:7")
        assert not t.refused("uid:7")
        clock.now += 61
    assert t.wait("uid:7") == 0.0


def test_a_summary_outlives_a_new_spell_and_shutdown_reports_everyone() -> None:
    clock = Clock()
    t = RefusalThrottle(1, 60.0, clock)
    assert t.refused("uid:7")
    t.wait("uid:7")
    clock.now += 61
    assert t.refused("uid:7")  # throttled again before the first spell was reported
    t.wait("uid:7")
    assert t.ended() == []
    clock.now += 61
    assert t.ended() == [("uid:7", 2)]  # both spells, nothing lost
    assert t.refused("uid:9")
    t.wait("uid:9")
    assert t.ended(everyone=True) == [("uid:9", 1)]


def test_budget_zero_turns_it_off() -> None:
    t = RefusalThrottle(0, 60.0, Clock())
    assert not any(t.refused("uid:7") for _ in range(1000))
    assert t.wait("uid:7") == 0.0


def test_memory_is_bounded_by_the_callers_tracked() -> None:
    clock = Clock()
    t = RefusalThrottle(5, 60.0, clock, max_callers=100)
    for i in range(10_000):
        t.refused(f"x509:CN=c{i}")
    assert len(t._callers) == 100


def test_a_throttled_caller_owed_a_summary_is_kept_before_quiet_ones() -> None:
    clock = Clock()
    t = RefusalThrottle(1, 60.0, clock, max_callers=2)
    t.refused("uid:1")
    t.wait("uid:1")  # throttled, owed a summary
    t.refused("uid:2")
    t.refused("uid:3")  # room is made by a quiet caller, not by uid:1
    assert "uid:1" in t._callers


def test_shown_bounds_what_a_caller_sent() -> None:
    assert shown("payments") == "'payments'"
    long = "\N{SNOWMAN}" * 600_000
    text = shown(long)
    assert text == repr("\N{SNOWMAN}" * 64) + "... (600000 characters)"
    assert shown("a\nb\x00") == repr("a\nb\x00")  # control characters escaped


def test_calls_in_flight_are_bounded_per_caller_and_in_all() -> None:
    from signer._internal.throttle import InFlight

    f = InFlight(per_caller=2, total=3)
    assert f.enter("a") is None
    assert f.enter("a") is None
    assert f.enter("a") == "2 calls of this caller are running, the most allowed"
    assert f.enter("b") is None
    assert f.enter("c") == "3 calls are running, the most this service takes at once"
    f.leave("a")
    assert f.enter("c") is None
    for caller in ("a", "b", "c"):
        f.leave(caller)
    assert (f._running, f._callers) == (0, {})
