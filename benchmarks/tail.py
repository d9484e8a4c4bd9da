"""Tail latency at half of the service's peak, paced (open loop), with the software-key server
under the same offered load in the same run (issue 18).

One short window made a single stall the headline (p99 190.9 ms one run, 18.4 ms another). So:
``runs`` rounds, each a paced run of ``seconds`` of the service and then of the software-key
server at the same rate; per subject the median and the worst of the runs' percentiles; and the
**stalls**: calls slower than :data:`STALL_MS`, grouped into episodes (calls that began within
:data:`EPISODE_GAP_S` of each other), each with its wall-clock start, to be set beside the
service's log. A stall both subjects show at the same moment is the machine's; one only the
service shows is the service's.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.loadgen import LoadResult, run_load
from benchmarks.report import Table

STALL_MS = 50.0
EPISODE_GAP_S = 0.25
CALLERS = 64


@dataclass(frozen=True)
class Episode:
    """Calls slower than STALL_MS that began close together."""

    start_s: float  # from the start of the measured period
    wall: float  # the same, as wall-clock time (time.time())
    calls: int
    worst_ms: float


def episodes(result: LoadResult) -> list[Episode]:
    slow = sorted(
        (start, ms)
        for start, ms in zip(result.starts_s, result.latencies_ms, strict=True)
        if ms > STALL_MS
    )
    found: list[Episode] = []
    group: list[tuple[float, float]] = []
    for start, ms in slow:
        if group and start - group[-1][0] > EPISODE_GAP_S:
            found.append(_episode(group, result.began_wall))
            group = []
        group.append((start, ms))
    if group:
        found.append(_episode(group, result.began_wall))
    return found


def _episode(group: list[tuple[float, float]], began_wall: float) -> Episode:
    first = group[0][0]
    return Episode(
        round(first, 3), round(began_wall + first, 3), len(group), max(ms for _, ms in group)
    )


def measure(
    subjects: Sequence[tuple[str, str, str]],
    rate: float,
    seconds: float,
    runs: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """``subjects``: (name, address, key), each driven in turn in every round at ``rate``."""
    per: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in subjects}
    for i in range(runs):
        for name, address, key in subjects:
            progress(f"paced tail, round {i + 1}/{runs}: {name} at {rate:,.0f} sig/s ...")
            load = run_load(address, key, CALLERS, seconds, warmup=1.0, rate=rate)
            found = episodes(load)
            per[name].append(
                {
                    **load.to_dict(),
                    "max_ms": round(max(load.latencies_ms, default=float("nan")), 3),
                    "stalled_calls": sum(e.calls for e in found),
                    "episodes": [asdict(e) for e in found],
                }
            )
    summary = {
        name: {
            f"{m}_{how}": round(fn(r[m] for r in rows), 3)
            for m in ("p50_ms", "p99_ms", "p999_ms", "max_ms")
            for how, fn in (("median", statistics.median), ("worst", max))
        }
        | {"episodes_total": sum(len(r["episodes"]) for r in rows)}
        for name, rows in per.items()
    }
    return {"rate": rate, "seconds": seconds, "runs": runs, "per_run": per, "summary": summary}


def table(tail: dict[str, Any]) -> Table:
    rows = []
    for name, runs in tail["per_run"].items():
        for i, r in enumerate(runs, 1):
            rows.append(
                [
                    name,
                    str(i),
                    f"{r['per_second']:,.0f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p99_ms']:.2f}",
                    f"{r['p999_ms']:.2f}",
                    f"{r['max_ms']:.1f}",
                    str(len(r["episodes"])),
                    str(r["stalled_calls"]),
                ]
            )
    return Table(
        f"Paced at {tail['rate']:,.0f} sig/s (half the service's peak), {CALLERS} callers, "
        f"{tail['runs']} rounds of {tail['seconds']:g} s each, subjects in turn; stalls: calls "
        f"over {STALL_MS:g} ms, grouped when they began within {EPISODE_GAP_S:g} s",
        ["subject", "round", "sig/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "stalls", "calls"],
        rows,
    )
