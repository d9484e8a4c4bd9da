"""Scenario "signing": the service's signing throughput and latency against baselines measured
in the same run.

Subjects, all on this machine at once, all driven by :mod:`benchmarks.loadgen` over Unix
sockets:

* ``service``: ``signer serve`` in the production configuration (its Unix socket through the
  SO_PEERCRED relay, policy, audit log), keys in the token behind the token host;
* ``service-bare``: the same without policy and audit log (``benchmarks.bare_server``);
* ``software-grpc``: :mod:`benchmarks.software_server`, the same gRPC stack with keys in
  memory, what services had before.

Raw baselines (:mod:`benchmarks.raw`, no gRPC): ``cryptography`` in-process (the CPU),
python-pkcs11 with SoftHSM2 in-process (the token), python-pkcs11 through p11-kit-client.so at 1
and 16 threads (the process boundary).

Each point: signatures per second, p50/p99/p99.9 latency, CPU seconds per 1,000 signatures of
the server and of the token host (the processes that sign), and the peak RSS of the servers
and of the token host's processes (summed).
Repeated ``runs`` times; medians are reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import tail as tail_mod
from benchmarks.context import Context
from benchmarks.loadgen import run_load
from benchmarks.procs import (
    answers,
    cpu_seconds,
    group,
    peak_rss_mib,
    started,
    write_service_config,
)
from benchmarks.report import ScenarioResult, Table, fmt_ratio
from signer._internal import hsm
from signer._internal.config import P11KIT_CLIENT_MODULE, SOFTHSM_MODULE
from signer._internal.policy import grant_everything
from signer.client import SignerClient
from signer.errors import SignerError

NAME = "signing"
BATCH = 50  # messages per SignBatch call
ALGORITHMS = ("ec-p256", "rsa-2048", "ed25519")
CONCURRENCY = (1, 16, 64)
SUBJECTS = ("service", "service-bare", "software-grpc")
RAW_THREADS = 16
TAIL_RUNS = 3  # paced tail rounds (issue 18: at least 3, of at least 30 s)


@dataclass
class Subject:
    name: str
    address: str
    proc: subprocess.Popen[bytes]
    keys: dict[str, str]  # algorithm -> key name ("" when the subject cannot sign with it)
    token_group: int | None  # the token host's process group, if the subject uses it


@contextlib.contextmanager
def lab(
    work: Path, only: tuple[str, ...] = SUBJECTS
) -> Iterator[tuple[list[Subject], hsm.HsmPaths, dict[str, bytes]]]:
    """Token host, and the subjects named in ``only`` (``service`` first: it creates the keys)."""
    root = (work / "signing").absolute()
    paths = hsm.init(root / "hsm", tls=False)
    host = hsm.TokenHost(paths.root)
    host.start()
    policy = root / "policy.toml"
    policy.write_text(grant_everything([f"uid:{os.getuid()}"]))

    def config(name: str) -> Path:
        return write_service_config(
            root / f"{name}.toml",
            listen=root / f"{name}.sock",
            paths=paths,
            policy=policy,
            store=root / "signer.db",
            audit=root / f"{name}.audit",
        )

    py = sys.executable
    starts = {
        "service": (
            [
                py,
                "-m",
                "signer",
                "serve",
                "--config",
                str(config("service")),
                "--log-level",
                "warning",
            ],
            answers(f"unix:{root}/service.sock"),
        ),
        "service-bare": (
            [py, "-m", "benchmarks.bare_server", "--config", str(config("bare"))],
            answers(f"unix:{root}/bare.sock"),
        ),
        "software-grpc": (
            [py, "-m", "benchmarks.software_server", "--listen", f"unix:{root}/software.sock"],
            lambda: (root / "software.sock").exists(),
        ),
    }
    try:
        with contextlib.ExitStack() as stack:
            procs = {name: stack.enter_context(started(*starts[name])) for name in only}
            keys: dict[str, str] = {}
            with SignerClient(f"unix:{root}/service.sock", timeout=60) as c:
                for alg in ALGORITHMS:
                    try:
                        c.create_key(f"bench-{alg}", alg, scope="bench")
                        keys[alg] = f"bench-{alg}"
                    except SignerError:
                        keys[alg] = ""  # ed25519 does not cross Debian's p11-kit 0.24.1
            with sqlite3.connect(root / "signer.db") as db:
                ids = {
                    alg: bytes(row[0])
                    for alg in ALGORITHMS
                    if keys[alg]
                    for row in db.execute(
                        "SELECT key_id FROM versions WHERE name = ?", (keys[alg],)
                    )
                }
            pgid = os.getpgid(host.pid) if host.pid else None
            sockets = {"service": "service", "service-bare": "bare", "software-grpc": "software"}
            software = {alg: alg for alg in ALGORITHMS}
            subjects = [
                Subject(
                    name,
                    f"unix:{root}/{sockets[name]}.sock",
                    procs[name],
                    software if name == "software-grpc" else keys,
                    None if name == "software-grpc" else pgid,
                )
                for name in only
            ]
            yield subjects, paths, ids
    finally:
        host.stop()


def _raw(mode: str, alg: str, threads: int, seconds: float, extra: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.raw",
            "--mode",
            mode,
            "--algorithm",
            alg,
            "--threads",
            str(threads),
            "--seconds",
            str(seconds),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def chart(median: dict[str, dict[str, float]], path: Path) -> Path | None:
    """Throughput and p99 latency by callers, per algorithm and subject (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the "bench" extra is not installed: the tables still are
        return None
    colours = {"service": "tab:blue", "service-bare": "tab:orange", "software-grpc": "tab:green"}
    fig, axes = plt.subplots(2, len(ALGORITHMS), figsize=(4.2 * len(ALGORITHMS), 7))
    for col, alg in enumerate(ALGORITHMS):
        for subject, colour in colours.items():
            keys = [f"{subject}/{alg}/c{c}" for c in CONCURRENCY]
            if not all(k in median for k in keys):
                continue
            axes[0][col].plot(
                CONCURRENCY,
                [median[k]["per_second"] for k in keys],
                "o-",
                color=colour,
                label=subject,
            )
            axes[1][col].plot(
                CONCURRENCY, [median[k]["p99_ms"] for k in keys], "o-", color=colour, label=subject
            )
        axes[0][col].set_title(f"{alg}: signatures/s")
        axes[1][col].set_title(f"{alg}: p99 latency, ms")
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
            axes[row][col].set_xlabel("concurrent callers")
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(ctx: Context) -> ScenarioResult:
    seconds, runs = 3.0, max(1, min(ctx.runs, 3))
    points: dict[str, list[dict[str, Any]]] = {}
    raw: dict[str, list[float]] = {}
    rss: dict[str, float] = {}

    def keep(key: str, value: dict[str, Any]) -> None:
        points.setdefault(key, []).append(value)

    with lab(ctx.work) as (subjects, paths, ids):
        for i in range(runs):
            ctx.progress(f"signing run {i + 1}/{runs} ...")
            for alg in ALGORITHMS:
                for subject in subjects:
                    key = subject.keys.get(alg, "")
                    if not key:
                        continue
                    for c in CONCURRENCY:
                        pids = [subject.proc.pid]
                        token = group(subject.token_group) if subject.token_group else []
                        cpu0 = (cpu_seconds(pids), cpu_seconds(token))
                        load = run_load(subject.address, key, c, seconds, warmup=0.5)
                        cpu1 = (cpu_seconds(pids), cpu_seconds(token))
                        point = load.to_dict()
                        per_k = 1000 / load.calls if load.calls else float("nan")
                        point["server_cpu_s_per_1000"] = round((cpu1[0] - cpu0[0]) * per_k, 3)
                        point["token_cpu_s_per_1000"] = round((cpu1[1] - cpu0[1]) * per_k, 3)
                        keep(f"{subject.name}/{alg}/c{c}", point)
                    rss[subject.name] = max(
                        rss.get(subject.name, 0.0), peak_rss_mib(subject.proc.pid)
                    )
                    if subject.token_group:
                        # p11-kit server and the p11-kit-remote serving each client, summed.
                        host = sum(peak_rss_mib(p) for p in group(subject.token_group))
                        rss["token host"] = max(rss.get("token host", 0.0), host)
                # Raw baselines.
                raw_runs: list[tuple[str, int, list[str]]] = [
                    ("cryptography", 1, []),
                    ("cryptography", RAW_THREADS, []),
                ]
                if alg in ids:
                    token_args = [
                        "--token",
                        hsm.DEFAULT_LABEL,
                        "--pin-file",
                        str(paths.user_pin),
                        "--key-id",
                        ids[alg].hex(),
                    ]
                    client = [
                        "--module",
                        P11KIT_CLIENT_MODULE,
                        "--server-address",
                        paths.server_address,
                        *token_args,
                    ]
                    inproc = ["--module", SOFTHSM_MODULE, *token_args]
                    raw_runs += [
                        ("p11kit", 1, client),
                        ("p11kit", RAW_THREADS, client),
                        ("softhsm", 1, inproc),
                    ]
                for mode, threads, extra in raw_runs:
                    env_mode = "cryptography" if mode == "cryptography" else "pkcs11"
                    if mode == "softhsm":
                        os.environ["SOFTHSM2_CONF"] = str(paths.conf)
                    result = _raw(env_mode, alg, threads, seconds, extra)
                    os.environ.pop("SOFTHSM2_CONF", None)
                    if "per_second" in result:
                        raw.setdefault(f"{mode}/{alg}/t{threads}", []).append(result["per_second"])
            # Batches: the service's SignBatch at the raw baseline's parallelism.
            svc = subjects[0]
            batch = run_load(
                svc.address, svc.keys["ec-p256"], RAW_THREADS, seconds, warmup=0.5, batch=BATCH
            )
            keep(
                f"service-batch{BATCH}/ec-p256/c{RAW_THREADS}",
                {
                    **batch.to_dict(),
                    "server_cpu_s_per_1000": float("nan"),
                    "token_cpu_s_per_1000": float("nan"),
                },
            )
        # p99 at half of the service's peak ec-p256 throughput, paced (open loop).
        half_peak = 0.5 * max(
            statistics.median(p["per_second"] for p in points[f"service/ec-p256/c{c}"])
            for c in CONCURRENCY
        )
        paced = [
            (s.name, s.address, s.keys["ec-p256"])
            for s in subjects
            if s.name in ("service", "software-grpc")
        ]
        tail = tail_mod.measure(paced, half_peak, ctx.tail_seconds, TAIL_RUNS, ctx.progress)
    median = {
        k: {m: statistics.median(p[m] for p in v) for m in v[0] if isinstance(v[0][m], float | int)}
        for k, v in points.items()
    }
    raw_median = {k: statistics.median(v) for k, v in raw.items()}

    def rate(key: str) -> float | None:
        return median[key]["per_second"] if key in median else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    svc64, soft64 = rate("service/ec-p256/c64"), rate("software-grpc/ec-p256/c64")
    ratios = {
        "unary_ec_p256_c64_vs_software_grpc": ratio(svc64, soft64),
        "batch_ec_p256_vs_raw_p11kit": ratio(
            rate(f"service-batch{BATCH}/ec-p256/c{RAW_THREADS}"),
            raw_median.get(f"p11kit/ec-p256/t{RAW_THREADS}"),
        ),
        "unary_ec_p256_c64_vs_raw_p11kit": ratio(svc64, raw_median.get("p11kit/ec-p256/t16")),
        "unary_ec_p256_c64_bare_vs_software_grpc": ratio(rate("service-bare/ec-p256/c64"), soft64),
    }
    peak = max((rate(f"service/ec-p256/c{c}") or 0.0) for c in CONCURRENCY)
    rows = []
    for point_key, m in sorted(median.items()):
        who, alg_name, callers = point_key.split("/")
        rows.append(
            [
                who,
                alg_name,
                callers[1:],
                f"{m['per_second']:,.0f}",
                f"{m['p50_ms']:.2f}",
                f"{m['p99_ms']:.2f}",
                f"{m['p999_ms']:.2f}",
                f"{m['server_cpu_s_per_1000']:.2f}",
                f"{m['token_cpu_s_per_1000']:.2f}",
            ]
        )
    raw_rows = [
        [k.split("/")[0], k.split("/")[1], k.split("/")[2][1:], f"{v:,.0f}"]
        for k, v in sorted(raw_median.items())
    ]
    tables = [
        Table(
            f"Signing through gRPC: medians of {runs} runs of {seconds:g} s",
            [
                "subject",
                "algorithm",
                "callers",
                "sig/s",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "server CPU s/1000",
                "token CPU s/1000",
            ],
            rows,
        ),
        Table(
            "Raw baselines (no gRPC)",
            ["baseline", "algorithm", "threads", "sig/s"],
            raw_rows,
        ),
        Table("Peak RSS", ["process", "MiB"], [[k, f"{v:.0f}"] for k, v in sorted(rss.items())]),
    ]
    notes = [
        "ec-p256 at 64 callers: the service reaches "
        f"{fmt_ratio(ratios['unary_ec_p256_c64_vs_software_grpc'])} of the software-key gRPC "
        f"baseline and {fmt_ratio(ratios['unary_ec_p256_c64_vs_raw_p11kit'])} of raw "
        "python-pkcs11 through p11-kit at 16 threads; without policy and audit log, "
        f"{fmt_ratio(ratios['unary_ec_p256_c64_bare_vs_software_grpc'])} of the software "
        f"baseline. Peak ec-p256 throughput of the service: {peak:,.0f} sig/s.",
        "ed25519 has no service rows: Debian's p11-kit 0.24.1 does not carry CKM_EDDSA.",
        f"SignBatch ({BATCH} messages per call, {RAW_THREADS} callers): "
        f"{fmt_ratio(ratios['batch_ec_p256_vs_raw_p11kit'])} of raw python-pkcs11 through "
        f"p11-kit at {RAW_THREADS} threads (sig/s counts signatures; latency is per call).",
    ]
    svc_tail = tail["summary"].get("service", {})
    soft_tail = tail["summary"].get("software-grpc", {})
    figures: dict[str, float | None] = {
        "p99_ms_at_half_peak": svc_tail.get("p99_ms_median"),
        "p99_ms_at_half_peak_worst": svc_tail.get("p99_ms_worst"),
        "p999_ms_at_half_peak": svc_tail.get("p999_ms_median"),
        "p999_ms_at_half_peak_worst": svc_tail.get("p999_ms_worst"),
        "software_p99_ms_at_half_peak": soft_tail.get("p99_ms_median"),
        "software_p999_ms_at_half_peak": soft_tail.get("p999_ms_median"),
    }
    tables.append(tail_mod.table(tail))
    notes.append(
        f"At half of that peak ({half_peak:,.0f} sig/s offered, paced, {tail_mod.CALLERS} "
        f"callers, {TAIL_RUNS} rounds of {ctx.tail_seconds:g} s): the service's p99 median "
        f"{svc_tail.get('p99_ms_median', float('nan')):.1f} ms, worst "
        f"{svc_tail.get('p99_ms_worst', float('nan')):.1f} ms; p99.9 median "
        f"{svc_tail.get('p999_ms_median', float('nan')):.1f} ms, worst "
        f"{svc_tail.get('p999_ms_worst', float('nan')):.1f} ms; the software-key server under "
        f"the same load: p99 {soft_tail.get('p99_ms_median', float('nan')):.1f} ms, p99.9 "
        f"{soft_tail.get('p999_ms_median', float('nan')):.1f} ms. Stall episodes (calls over "
        f"{tail_mod.STALL_MS:g} ms): service {svc_tail.get('episodes_total')}, software "
        f"{soft_tail.get('episodes_total')}."
    )
    png = chart(median, ctx.work.parent / "signing.png")
    notes.append(f"Chart: {png}" if png else "No chart: matplotlib (the bench extra) is missing.")
    data = {
        "chart": str(png) if png else None,
        "paced_half_peak": tail,
        "points": points,
        "median": median,
        "raw": raw,
        "raw_median": raw_median,
        "peak_rss_mib": rss,
        "seconds": seconds,
        "runs": runs,
    }
    return ScenarioResult(NAME, data, ratios, tables, notes, figures)
