"""Scenario "steady": the production service at peak load for a long run (10 minutes by
default, ``--steady-seconds``), its memory sampled every second.

One channel, 64 callers signing ec-p256 back to back through the Unix socket (relay, policy,
audit log: the production path). A sampler reads VmRSS of the service and the summed VmRSS of
the token host's processes once a second. Growth is the median RSS of the last minute against
the median of the minute after warm-up (the first minute is spent filling caches and arenas
to their working size); it should stay under 10%. Throughput is counted per 10-second window,
so a slow decline would show too.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from benchmarks.context import Context
from benchmarks.loadgen import LoadResult, run_load
from benchmarks.procs import cpu_seconds, group, rss_mib
from benchmarks.report import ScenarioResult, Table
from benchmarks.signing import lab

NAME = "steady"
CALLERS = 64
WINDOW = 10.0  # seconds per throughput window
GROWTH_TARGET_PCT = 10.0


def _growth_pct(samples: list[float], minute: int) -> float:
    """Median of the last ``minute`` samples against the median of the ``minute`` after the
    first one (warm-up), in percent."""
    first = statistics.median(samples[minute : 2 * minute])
    last = statistics.median(samples[-minute:])
    return 100.0 * (last - first) / first if first else float("nan")


def chart(
    t: list[float], service: list[float], token: list[float], windows: list[float], path: Path
) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, service, label="service")
    top.plot(t, token, label="token host (all processes)")
    top.set_ylabel("RSS, MiB")
    top.set_ylim(bottom=0)
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot([WINDOW * (i + 1) for i in range(len(windows))], windows, "o-", markersize=3)
    bottom.set_ylabel(f"signatures/s ({WINDOW:g}-s windows)")
    bottom.set_xlabel("seconds")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    fig.suptitle(f"Steady state: ec-p256, {CALLERS} callers, production service")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(ctx: Context) -> ScenarioResult:
    seconds = ctx.steady_seconds
    # A minute to compare, at least 3 samples; short runs (smoke tests) use a sixth of the run.
    minute = max(3, min(60, int(seconds / 6)))
    with lab(ctx.work / "steady", only=("service",)) as (subjects, _paths, _ids):
        service = subjects[0]
        assert service.token_group is not None
        t: list[float] = []
        rss_service: list[float] = []
        rss_token: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            began = time.monotonic()
            while not stop.wait(max(0.0, began + len(t) + 1 - time.monotonic())):
                t.append(round(time.monotonic() - began, 1))
                rss_service.append(rss_mib(service.proc.pid))
                rss_token.append(sum(rss_mib(p) for p in group(service.token_group or 0)))

        ctx.progress(f"steady: {CALLERS} callers for {seconds:g} s, RSS sampled each second ...")
        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        load: LoadResult
        cpu0 = cpu_seconds([service.proc.pid]), cpu_seconds(group(service.token_group))
        try:
            sampler.start()
            load = run_load(
                service.address,
                service.keys["ec-p256"],
                CALLERS,
                seconds,
                warmup=0.0,
                window=WINDOW,
            )
        finally:
            stop.set()
            sampler.join()
        cpu1 = cpu_seconds([service.proc.pid]), cpu_seconds(group(service.token_group))
        alive = service.proc.poll() is None
    per_k = 1000 / load.calls if load.calls else float("nan")
    server_cpu, token_cpu = (cpu1[0] - cpu0[0]) * per_k, (cpu1[1] - cpu0[1]) * per_k
    windows = [n / WINDOW for n in load.windows]
    growth = _growth_pct(rss_service, minute)
    token_growth = _growth_pct(rss_token, minute)
    png = chart(t, rss_service, rss_token, windows, ctx.work.parent / "steady.png")
    tenth = max(1, len(windows) // 10)
    first_w, last_w = statistics.median(windows[:tenth]), statistics.median(windows[-tenth:])
    rows = [
        [
            "service RSS, MiB",
            f"{statistics.median(rss_service[minute : 2 * minute]):.1f}",
            f"{statistics.median(rss_service[-minute:]):.1f}",
            f"{max(rss_service):.1f}",
            f"{growth:+.1f}%",
        ],
        [
            "token host RSS, MiB",
            f"{statistics.median(rss_token[minute : 2 * minute]):.1f}",
            f"{statistics.median(rss_token[-minute:]):.1f}",
            f"{max(rss_token):.1f}",
            f"{token_growth:+.1f}%",
        ],
        [
            "signatures/s (first, last tenth)",
            f"{first_w:,.0f}",
            f"{last_w:,.0f}",
            f"{max(windows):,.0f}",
            f"{100 * (last_w / first_w - 1):+.1f}%",
        ],
    ]
    tables = [
        Table(
            f"Steady state: {seconds:g} s at {CALLERS} callers (ec-p256, production service)",
            ["measure", "after warm-up", "at the end", "max", "change"],
            rows,
        )
    ]
    verdict = "within" if growth < GROWTH_TARGET_PCT else "OVER"
    notes = [
        f"Service RSS grew {growth:+.1f}% from the {minute} s after warm-up to the last "
        f"{minute} s ({verdict} the {GROWTH_TARGET_PCT:g}% target); {load.calls:,} signatures, "
        f"{load.errors} errors, p50 {load.percentile(0.5):.1f} ms, p99 "
        f"{load.percentile(0.99):.1f} ms, p99.9 {load.percentile(0.999):.1f} ms; CPU s per 1,000 "
        f"signatures: service {server_cpu:.2f}, token host {token_cpu:.2f}; the service was "
        f"{'still serving' if alive else 'GONE'} at the end.",
        f"Chart: {png}" if png else "No chart: matplotlib (the bench extra) is missing.",
    ]
    figures: dict[str, float | None] = {
        "steady_rss_growth_pct": round(growth, 2),
        "steady_sig_per_s": round(load.per_second, 1),
    }
    data = {
        "seconds": seconds,
        "callers": CALLERS,
        "comparison_window_samples": minute,
        "load": load.to_dict(),
        "server_cpu_s_per_1000": round(server_cpu, 3),
        "token_cpu_s_per_1000": round(token_cpu, 3),
        "windows_sig_per_s": windows,
        "rss_mib": {"t": t, "service": rss_service, "token_host": rss_token},
        "service_rss_growth_pct": growth,
        "token_rss_growth_pct": token_growth,
        "alive_at_end": alive,
        "chart": str(png) if png else None,
    }
    return ScenarioResult(NAME, data, {}, tables, notes, figures)
