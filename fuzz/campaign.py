"""``make fuzz``: every target under atheris for a fixed time, one after another.

    python -m fuzz.campaign --seconds 60 --rss-mb 1024 [--targets elf,policy] [--merge]

Each target runs in its own process (one at a time: the machine is shared) on a working corpus
in ``var/fuzz/corpus/<target>/`` seeded from ``fuzz/corpus/<target>/`` and the generated seeds
of ``var/fuzz/seeds/<target>/`` (:mod:`fuzz.seeds`); an input that raises,
takes longer than ``--timeout`` seconds or makes the RSS pass ``--rss-mb`` is written to
``fuzz/crashes/<target>/`` (kept: ``make test`` replays it once fixed) and ends that target's
run. ``--merge`` then adds to ``fuzz/corpus/<target>/`` the inputs that reach new coverage
(libFuzzer's -set_cover_merge=1: the fewest inputs that keep the coverage), kept small by
``--max-len``, leaving out inputs that hold a private key as text (see :mod:`fuzz.seeds`).

Prints, per target: executions, seconds, coverage (cov: edges, ft: features, as atheris counts
them), peak RSS and findings; writes the same to ``var/fuzz/report.json``. Exit 1 on a finding.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fuzz import seeds as seeding
from fuzz import targets
from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
VAR = ROOT / "var" / "fuzz"


@dataclass
class Run:
    target: str
    seconds: float = 0.0
    executions: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    peak_rss_mb: int = 0
    findings: list[str] = field(default_factory=list)
    exit_code: int = 0


_PROGRESS = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)/")
_STAT = re.compile(r"stat::(\w+):\s+(\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def _wrapper(target: str) -> Path:
    """A script that runs the driver for ``target`` (libFuzzer's -merge re-runs argv[0])."""
    path = VAR / f"run-{target}.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/bin/sh\ncd "{ROOT}" && exec "{sys.executable}" -m fuzz.driver {target} "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _run(target: str, args: argparse.Namespace) -> Run:
    work = VAR / "corpus" / target
    crashes = FUZZ / "crashes" / target
    seeds = FUZZ / "corpus" / target
    generated = seeding.GENERATED / target
    for d in (work, crashes, seeds, generated):
        d.mkdir(parents=True, exist_ok=True)
    wrapper = _wrapper(target)
    cmd = [
        str(wrapper),
        f"-max_total_time={args.seconds}",
        f"-rss_limit_mb={args.rss_mb}",
        f"-timeout={args.timeout}",
        f"-max_len={args.max_len}",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
        str(work),
        str(seeds),
        str(generated),
    ]
    scratch = tempfile.mkdtemp(prefix="signer-fuzz-", dir=targets.scratch())
    env = {**os.environ, "FUZZ_ARGV0": str(wrapper), "SIGNER_FUZZ_WORKDIR": scratch}
    began = time.monotonic()
    log = VAR / f"{target}.log"
    try:
        with open(log, "w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    run = Run(target, seconds=round(time.monotonic() - began, 1), exit_code=proc.returncode)
    text = log.read_text(errors="replace")
    for m in _PROGRESS.finditer(text):
        run.cov, run.ft, run.corpus = int(m.group(1)), int(m.group(2)), int(m.group(3))
    stats = dict(_STAT.findall(text))
    run.executions = int(stats.get("number_of_executed_units", 0))
    run.peak_rss_mb = int(stats.get("peak_rss_mb", 0))
    run.findings = [str(Path(p).relative_to(ROOT)) for p in _ARTIFACT.findall(text)]
    if proc.returncode != 0 and not run.findings:
        run.findings = [f"exit {proc.returncode} without an input written: see {log}"]
    if args.merge and not run.findings:
        os.makedirs(scratch)
        try:
            _merge(wrapper, env, seeds, work, args.max_len)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return run


def _merge(wrapper: Path, env: dict[str, str], seeds: Path, work: Path, max_len: int) -> None:
    """Replaces the committed corpus with the fewest inputs that cover what it and the working
    corpus cover (its seeds kept), none holding key text."""
    fresh = work.parent.parent / "merge" / seeds.name
    if fresh.exists():
        shutil.rmtree(fresh)
    fresh.mkdir(parents=True)
    for seed in seeds.glob("seed-*"):
        shutil.copy(seed, fresh)
    subprocess.run(
        [
            str(wrapper),
            "-set_cover_merge=1",
            f"-max_len={max_len}",
            str(fresh),
            str(seeds),
            str(work),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        check=False,
    )
    kept = [p for p in fresh.iterdir() if not seeding.holds_key_text(p.read_bytes())]
    if kept:
        for old in seeds.iterdir():
            old.unlink()
        for p in kept:
            shutil.copy(p, seeds / p.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    p.add_argument("--rss-mb", type=int, default=1024, help="RSS bound per target process")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    p.add_argument("--max-len", type=int, default=32768, help="largest input tried")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    p.add_argument(
        "--merge", action="store_true", help="keep what reached new coverage in fuzz/corpus/"
    )
    args = p.parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    unknown = set(names) - set(TARGETS)
    if unknown:
        p.error(f"unknown target(s) {', '.join(sorted(unknown))}: one of {', '.join(TARGETS)}")
    seeding.write()
    runs = []
    for name in names:
        print(f"fuzz: {name} for {args.seconds} s ...", flush=True)
        run = _run(name, args)
        runs.append(run)
        print(
            f"fuzz: {name}: {run.executions} executions in {run.seconds} s, cov {run.cov} "
            f"ft {run.ft}, corpus {run.corpus}, peak RSS {run.peak_rss_mb} MiB, "
            f"{len(run.findings)} findings",
            flush=True,
        )
        for f in run.findings:
            print(f"  finding: {f}", flush=True)
    VAR.mkdir(parents=True, exist_ok=True)
    report = {"seconds_per_target": args.seconds, "rss_mb": args.rss_mb, "runs": []}
    report["runs"] = [asdict(r) for r in runs]
    (VAR / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    header = f"{'target':<12} {'executions':>11} {'seconds':>8} {'cov':>6} {'ft':>6} findings"
    print(header)
    for r in runs:
        print(
            f"{r.target:<12} {r.executions:>11} {r.seconds:>8} {r.cov:>6} {r.ft:>6} "
            f"{len(r.findings)}"
        )
    return 1 if any(r.findings for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
