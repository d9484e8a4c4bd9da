"""benchmarks.tail: stalls grouped into episodes, placed in time."""

from __future__ import annotations

from benchmarks.loadgen import LoadResult
from benchmarks.tail import STALL_MS, episodes


def result(calls: list[tuple[float, float]]) -> LoadResult:
    return LoadResult(
        64,
        30.0,
        len(calls),
        0,
        [ms for _, ms in calls],
        starts_s=[s for s, _ in calls],
        began_wall=1000.0,
    )


def test_slow_calls_close_together_are_one_episode() -> None:
    slow = STALL_MS + 1
    calls = [(0.0, 2.0), (1.0, slow), (1.1, slow + 50), (1.2, slow), (5.0, 2.0), (9.0, slow)]
    found = episodes(result(calls))
    assert [(e.start_s, e.calls, e.worst_ms) for e in found] == [
        (1.0, 3, slow + 50),
        (9.0, 1, slow),
    ]
    assert found[0].wall == 1001.0


def test_no_slow_call_no_episode() -> None:
    assert episodes(result([(0.0, 2.0), (0.1, STALL_MS)])) == []
