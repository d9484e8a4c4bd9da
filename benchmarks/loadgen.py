"""The load generator every signing scenario uses: gRPC aio, ``concurrency`` callers in one
process, each sending Sign back to back on a shared channel, for a fixed time.

One generator for our service and for the software-key baseline, so the ratio compares the
servers, not the clients. Latency is measured per call on the client (what a caller sees).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from signer.client import ClientTLS
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    seconds: float
    calls: int
    errors: int
    latencies_ms: list[float]
    # Signatures completed in each ``window`` seconds of the measured period, when asked for.
    windows: list[int] = field(default_factory=list)
    # When each measured call began, in seconds from the start of the measured period (same
    # order as latencies_ms), and that start as wall-clock time: stalls are placed in time, to be
    # set beside the service's log (benchmarks/tail.py).
    starts_s: list[float] = field(default_factory=list)
    began_wall: float = 0.0

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "calls": self.calls,
            "errors": self.errors,
            "per_second": round(self.per_second, 1),
            "p50_ms": round(self.percentile(0.50), 3),
            "p99_ms": round(self.percentile(0.99), 3),
            "p999_ms": round(self.percentile(0.999), 3),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 3) if self.latencies_ms else None,
        }


async def _drive(
    address: str,
    tls: ClientTLS | None,
    key: str,
    concurrency: int,
    seconds: float,
    warmup: float,
    rate: float | None,
    batch: int,
    window: float | None,
) -> LoadResult:
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (
        grpc.aio.secure_channel(address, tls.credentials(), options=options)
        if tls is not None
        else grpc.aio.insecure_channel(address, options=options)
    )
    stub = pb_grpc.SignerServiceStub(channel)
    latencies: list[float] = []
    starts: list[float] = []
    origin = {"perf": 0.0}
    counts = {"calls": 0, "errors": 0}
    state = {"measuring": False, "stop": False}
    # An open-loop pace when ``rate`` is given (calls per second over all callers).
    interval = concurrency / rate if rate else 0.0

    async def caller(i: int) -> None:
        next_at = time.perf_counter() + (interval * i / concurrency if interval else 0.0)
        while not state["stop"]:
            if interval:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            began = time.perf_counter()
            try:
                if batch:
                    items = [pb.SignBatchItem(message=os.urandom(32)) for _ in range(batch)]
                    await stub.SignBatch(pb.SignBatchRequest(name=key, items=items), timeout=30)
                else:
                    await stub.Sign(pb.SignRequest(name=key, message=os.urandom(32)), timeout=30)
            except grpc.aio.AioRpcError:
                if state["measuring"]:
                    counts["errors"] += 1
                continue
            if state["measuring"]:
                latencies.append((time.perf_counter() - began) * 1000)
                starts.append(began - origin["perf"])
                counts["calls"] += max(batch, 1)  # signatures, not calls

    windows: list[int] = []

    async def count_windows(every: float) -> None:
        seen, due = 0, time.perf_counter() + every
        while True:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            due += every
            windows.append(counts["calls"] - seen)
            seen = counts["calls"]

    tasks = [asyncio.create_task(caller(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    state["measuring"] = True
    began = origin["perf"] = time.perf_counter()
    began_wall = time.time()
    counter = asyncio.create_task(count_windows(window)) if window else None
    await asyncio.sleep(seconds)
    state["measuring"] = False
    if counter is not None:
        counter.cancel()
        if window and len(windows) < int(seconds // window):  # the last tick lost the race
            windows.append(counts["calls"] - sum(windows))
    elapsed = time.perf_counter() - began
    state["stop"] = True
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    return LoadResult(
        concurrency,
        elapsed,
        counts["calls"],
        counts["errors"],
        latencies,
        windows,
        starts,
        began_wall,
    )


def run_load(
    address: str,
    key: str,
    concurrency: int,
    seconds: float,
    *,
    tls: ClientTLS | None = None,
    warmup: float = 1.0,
    rate: float | None = None,
    batch: int = 0,
    window: float | None = None,
) -> LoadResult:
    """Sign with ``key`` from ``concurrency`` callers for ``seconds`` (after ``warmup``);
    ``rate``: an open-loop pace instead of back-to-back calls; ``batch``: SignBatch calls of
    that many messages (``calls`` then counts signatures; latencies stay per call); ``window``:
    also count signatures per ``window`` seconds (:attr:`LoadResult.windows`)."""
    return asyncio.run(_drive(address, tls, key, concurrency, seconds, warmup, rate, batch, window))
