"""``python -m benchmarks``: run the scenarios, write ``var/bench/latest.{json,md}``, print the
Markdown to stdout (progress goes to stderr)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import blind, gate, replicas, report, scan, signing, steady, transport
from benchmarks.context import Context
from benchmarks.machine import machine_info

# name -> run(ctx). A new scenario is a module with a ``run(ctx) -> ScenarioResult`` added here.
SCENARIOS: dict[str, Callable[[Context], report.ScenarioResult]] = {
    scan.NAME: scan.run,
    blind.NAME: blind.run,
    gate.NAME: gate.run,
    transport.NAME: transport.run,
    signing.NAME: signing.run,
    steady.NAME: steady.run,
    replicas.NAME: replicas.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--out", type=Path, default=Path("var/bench"), help="report directory")
    p.add_argument("--runs", type=int, default=5, help="timed runs per engine and file")
    p.add_argument("--load-seconds", type=float, default=2.0, help="signing before the gcore")
    p.add_argument(
        "--blind-budget",
        type=float,
        default=240.0,
        help="blind mode's time budget for its math checks, seconds",
    )
    p.add_argument(
        "--steady-seconds",
        type=float,
        default=600.0,
        help="length of the steady-state run at peak load, seconds (at least 30)",
    )
    p.add_argument(
        "--tail-seconds",
        type=float,
        default=30.0,
        help="signing: each paced tail run at half the peak, seconds (3 rounds per subject)",
    )
    p.add_argument(
        "--replicas-rounds",
        type=int,
        default=replicas.DEFAULT_ROUNDS,
        help="replicas: interleaved windows per configuration (each round about 25 s)",
    )
    p.add_argument("--seed", type=int, default=20240601, help="placement and sampling seed")
    p.add_argument("--keep", action="store_true", help="keep the work directory (cores)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        p.error(f"unknown scenario(s): {', '.join(unknown) or '(none given)'}")
    if args.steady_seconds < 30:
        p.error("--steady-seconds must be at least 30")
    if args.replicas_rounds < 1:
        p.error("--replicas-rounds must be at least 1")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.out / "work"
    if work.exists():
        shutil.rmtree(work)
    ctx = Context(
        work=work,
        runs=args.runs,
        load_seconds=args.load_seconds,
        blind_budget_seconds=args.blind_budget,
        steady_seconds=args.steady_seconds,
        tail_seconds=args.tail_seconds,
        replicas_rounds=args.replicas_rounds,
        seed=args.seed,
    )
    generated = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    began = time.monotonic()
    failed = []
    try:
        results = []
        for name in args.names:
            ctx.progress(f"scenario {name} ...")
            try:
                results.append(SCENARIOS[name](ctx))
            except Exception as exc:  # one broken scenario must not discard the others' figures
                failed.append(name)
                ctx.progress(f"scenario {name} FAILED: {exc!r}")
                traceback.print_exc()
                results.append(
                    report.ScenarioResult(
                        name, {"error": repr(exc)}, notes=[f"FAILED: {exc!r} (see stderr)"]
                    )
                )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    js, md, text = report.write(
        args.out, results, machine_info(), generated, time.monotonic() - began
    )
    sys.stdout.write(text)
    ctx.progress(f"wrote {js} and {md}")
    if failed:
        ctx.progress(f"FAILED scenarios: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
