"""Repeated wall-clock measurements: median and minimum of a few runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Timing:
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": [round(r, 4) for r in self.runs],
            "median": round(self.median, 4),
            "min": round(self.min, 4),
        }


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    began = time.perf_counter()
    value = fn()
    return time.perf_counter() - began, value


def rate_mb_s(size: int, seconds: float) -> float | None:
    """Throughput in MB/s (10^6 bytes per second)."""
    return size / seconds / 1e6 if seconds > 0 else None
