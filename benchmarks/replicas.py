"""Scenario "replicas": throughput and CPU per signature of N ``signer serve`` replicas on one
PostgreSQL database against the single SQLite service, measured in the same run (issue 16,
item 7).

Configurations, all running at once on this machine, all on the same token host:

* ``sqlite``: one service, key store and audit log in SQLite (``make run``'s shape, without
  the front);
* ``pg1``, ``pg2``, ``pg3``: 1, 2 and 3 replicas sharing one PostgreSQL schema each (key store
  and audit log; chains ``r1``..``rN``, each replica its own audit key and archive), on one
  durable cluster (fsync, ``synchronous_commit`` and ``full_page_writes`` on) started for the
  scenario and removed after it.

The load: :data:`CALLERS` ec-p256 unary Sign callers in one process (the same client cost for
every configuration), split over the replicas, each replica called on its own local socket
(not through the front, whose cost ``transport`` measures). Windows are interleaved: each round
runs one window of every configuration, in a rotated order, so that drift on this shared
machine falls on all of them alike; medians over the rounds, ratios against ``sqlite``.

Per window: signatures, errors, latency; CPU seconds (``/proc``) of the service processes, the
token host's process group, the PostgreSQL cluster (postmaster and its children) and the load
generator; audit records written (each chain's newest ``seq``, before and after); for
PostgreSQL, transactions committed and WAL fsyncs (``pg_stat_database``, ``pg_stat_wal``).
Then a short counted run per replicated configuration with ``pg_stat_statements`` on: the
statements one Sign costs the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks.context import Context
from benchmarks.procs import answers, cpu_seconds, group
from benchmarks.report import ScenarioResult, Table, fmt_ratio
from signer._internal import config, hsm
from signer._internal.policy import grant_everything
from signer.client import SignerClient
from signer.errors import Unavailable
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc
from tests.postgres import Cluster, bindir

NAME = "replicas"
CALLERS = 64  # the signing scenario's peak for the service (ec-p256, unary)
REPLICAS = (1, 2, 3)
WINDOW_SECONDS = 5.0
WARMUP_SECONDS = 1.0
COUNT_SECONDS = 3.0  # the pg_stat_statements run per replicated configuration
DEFAULT_ROUNDS = 5
_TICK = os.sysconf("SC_CLK_TCK")


# --- PostgreSQL -------------------------------------------------------------------------------


def _cluster() -> Cluster:
    """A durable throwaway cluster (tests/postgres.py's: socket only, in its own 0700 directory,
    fsync and synchronous commits on as the service requires), with pg_stat_statements loaded
    but not tracking until the counting run turns it on."""
    bin_dir = bindir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL (Debian's postgresql-15: make deps)")
    cluster = Cluster(bin_dir, durable=True)
    cluster.init(
        max_connections="200",
        shared_buffers="128MB",
        shared_preload_libraries="'pg_stat_statements'",
        **{"pg_stat_statements.track": "none"},
    )
    return cluster


def _create_key(address: str, name: str, deadline: float) -> None:
    """The configuration's key, once its service reaches the token: seven services starting
    at once against one SoftHSM token host (a p11-kit-remote, so a SoftHSM, per connection,
    all on one token directory while each generates its audit key) see it away for moments
    (UNAVAILABLE, 'shows no token': one start in three here), and answer health before then;
    the service tries the token again by itself, so the bench does too, until ``deadline``."""
    while True:
        try:
            with SignerClient(address, timeout=60) as c:
                c.create_key(name, "ec-p256", scope="bench")
            return
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# --- services ---------------------------------------------------------------------------------


@dataclass
class Service:
    """One ``signer serve`` process in a session of its own (its CPU: its process group)."""

    name: str
    config_path: Path
    address: str
    log_path: Path
    chain: str  # its audit chain in the database ("" for SQLite)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "signer", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def pids(self) -> list[int]:
        return group(self.proc.pid) if self.proc is not None else []

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left in its session


@dataclass
class Configuration:
    name: str  # sqlite, pg1, pg2, pg3
    services: list[Service]
    key: str
    schema: str = ""  # PostgreSQL schema ("" for SQLite)
    audit_db: Path | None = None  # SQLite's audit log
    windows: list[dict[str, Any]] = field(default_factory=list)
    counted: dict[str, Any] = field(default_factory=dict)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.services]

    def pids(self) -> list[int]:
        return [p for s in self.services for p in s.pids()]


def _service_config(
    path: Path,
    directory: Path,
    paths: hsm.HsmPaths,
    policy: Path,
    store: str,
    audit: str,
    chain: str,
) -> Path:
    cfg = config.Config(
        server=config.ServerConfig(listen=f"unix:{directory}/signer.sock", policy_file=str(policy)),
        token=config.TokenConfig(server_address=paths.server_address, pin_file=str(paths.user_pin)),
        store=config.StoreConfig(path=store),
        audit=config.AuditConfig(
            path=audit,
            chain=chain,
            public_key_file=str(directory / "audit.key.pem") if chain else "",
            archive_dir=str(directory / "archive") if chain else "",
        ),
    )
    path.write_text(config.dump(cfg))
    return path


# --- measuring --------------------------------------------------------------------------------


def _pg_connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True)


def _machine_cpu() -> tuple[float, float]:
    """All CPUs' busy and steal seconds so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


@dataclass
class Probe:
    """What a window reads before and after: CPU per part, audit positions, database totals."""

    cluster: Cluster | None
    token_pgid: int
    db: Any  # psycopg connection to the cluster (no schema), or None

    def snapshot(self, cfg: Configuration) -> dict[str, Any]:
        busy, steal = _machine_cpu()
        snap: dict[str, Any] = {
            "t": time.perf_counter(),
            "service": cpu_seconds(cfg.pids()),
            "token": cpu_seconds(group(self.token_pgid)),
            "postgres": cpu_seconds(self.cluster.pids()) if self.cluster else 0.0,
            "loadgen": cpu_seconds([os.getpid()]),
            "machine_busy": busy,
            "machine_steal": steal,
            "audit": self.audit_positions(cfg),
        }
        if self.db is not None:
            row = self.db.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'"
            ).fetchone()
            wal = self.db.execute("SELECT wal_records, wal_sync, wal_bytes FROM pg_stat_wal")
            records, syncs, wal_bytes = wal.fetchone()
            snap |= {
                "xact_commit": int(row[0]),
                "wal_records": int(records),
                "wal_sync": int(syncs),
                "wal_bytes": int(wal_bytes),
            }
        return snap

    def audit_positions(self, cfg: Configuration) -> dict[str, int]:
        """Each chain's newest record's ``seq``."""
        if cfg.audit_db is not None:
            with contextlib.closing(sqlite3.connect(f"file:{cfg.audit_db}?mode=ro", uri=True)) as c:
                row = c.execute("SELECT max(seq) FROM records").fetchone()
            return {"sqlite": int(row[0] or 0)}
        positions = {}
        for s in cfg.services:
            row = self.db.execute(
                f'SELECT max(seq) FROM "{cfg.schema}".records WHERE chain = %s',  # noqa: S608
                (s.chain,),
            ).fetchone()
            positions[s.chain] = int(row[0] or 0)
        return positions


async def _drive(
    addresses: list[str],
    key: str,
    callers: int,
    seconds: float,
    warmup: float,
    at_start: Callable[[], Any],
    at_end: Callable[[], Any],
) -> dict[str, Any]:
    """``callers`` Sign callers in this process, spread over ``addresses`` (a channel each),
    back to back; ``at_start`` and ``at_end`` run at the measured period's edges."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(a, options=options) for a in addresses]
    stubs = [pb_grpc.SignerServiceStub(c) for c in channels]
    latencies: list[float] = []
    state = {"measuring": False, "stop": False}
    counts = {"calls": 0, "errors": 0, "all_ok": 0}

    async def caller(i: int) -> None:
        stub = stubs[i % len(stubs)]
        while not state["stop"]:
            began = time.perf_counter()
            try:
                await stub.Sign(pb.SignRequest(name=key, message=os.urandom(32)), timeout=30)
            except grpc.aio.AioRpcError:
                if state["measuring"]:
                    counts["errors"] += 1
                continue
            counts["all_ok"] += 1
            if state["measuring"]:
                latencies.append((time.perf_counter() - began) * 1000)
                counts["calls"] += 1

    tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
    await asyncio.sleep(warmup)
    before = at_start()
    state["measuring"] = True
    began = time.perf_counter()
    await asyncio.sleep(seconds)
    state["measuring"] = False
    elapsed = time.perf_counter() - began
    after = at_end()
    state["stop"] = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {
        "seconds": elapsed,
        "calls": counts["calls"],
        "errors": counts["errors"],
        "all_ok": counts["all_ok"],
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "before": before,
        "after": after,
    }


def _window(probe: Probe, cfg: Configuration, seconds: float) -> dict[str, Any]:
    """One measured window of ``cfg`` at :data:`CALLERS` callers: its figures."""
    run = asyncio.run(
        _drive(
            cfg.addresses,
            cfg.key,
            CALLERS,
            seconds,
            WARMUP_SECONDS,
            lambda: probe.snapshot(cfg),
            lambda: probe.snapshot(cfg),
        )
    )
    b, a = run["before"], run["after"]
    calls, wall = run["calls"], a["t"] - b["t"]
    per = 1000 / calls if calls else float("nan")
    d = {k: a[k] - b[k] for k in ("service", "token", "postgres", "loadgen")}
    w: dict[str, Any] = {
        "seconds": round(wall, 3),
        "calls": calls,
        "errors": run["errors"],
        "per_second": calls / wall if wall else 0.0,
        "p50_ms": run["p50_ms"],
        "p99_ms": run["p99_ms"],
        "service_cpu_ms": d["service"] * per,
        "token_cpu_ms": d["token"] * per,
        "postgres_cpu_ms": d["postgres"] * per,
        "loadgen_cpu_ms": d["loadgen"] * per,
        "server_side_cpu_ms": (d["service"] + d["token"] + d["postgres"]) * per,
        "machine_busy_pct": 100 * (a["machine_busy"] - b["machine_busy"]) / (wall * os.cpu_count()),
        "machine_steal_pct": 100
        * (a["machine_steal"] - b["machine_steal"])
        / (wall * os.cpu_count()),
        "audit_records": sum(a["audit"].values()) - sum(b["audit"].values()),
        "audit_per_chain": {c: a["audit"][c] - b["audit"].get(c, 0) for c in a["audit"]},
    }
    w["audit_per_second"] = w["audit_records"] / wall if wall else 0.0
    if "xact_commit" in a:
        for k in ("xact_commit", "wal_records", "wal_sync", "wal_bytes"):
            w[k] = a[k] - b[k]
    return w


def _count_statements(db: Any, cfg: Configuration) -> dict[str, Any]:
    """``pg_stat_statements`` over a short run of ``cfg``: each statement's calls per Sign."""
    db.execute("ALTER SYSTEM SET pg_stat_statements.track = 'top'")
    db.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    try:
        db.execute("SELECT pg_stat_statements_reset()")
        run = asyncio.run(
            _drive(cfg.addresses, cfg.key, CALLERS, COUNT_SECONDS, 0.0, lambda: 0, lambda: 0)
        )
        rows = db.execute(
            "SELECT query, calls, rows FROM pg_stat_statements "
            "WHERE query NOT ILIKE '%pg_stat%' AND query NOT ILIKE '%pg_reload_conf%' "
            "ORDER BY calls DESC"
        ).fetchall()
    finally:
        db.execute("ALTER SYSTEM SET pg_stat_statements.track = 'none'")
        db.execute("SELECT pg_reload_conf()")
    signs = run["all_ok"] + run["errors"]
    statements = [
        {
            "query": " ".join(str(q).split())[:160],
            "calls": int(calls),
            "rows": int(n),
            "per_sign": int(calls) / signs if signs else float("nan"),
        }
        for q, calls, n in rows
        if int(calls) >= max(1, signs // 100)  # what every call costs, not the odd timer
    ]
    return {
        "signs": signs,
        "statements": statements,
        "statements_per_sign": sum(int(c) for _, c, _ in rows) / signs if signs else None,
    }


# --- the scenario -----------------------------------------------------------------------------


@contextlib.contextmanager
def _lab(
    work: Path, progress: Callable[[str], None]
) -> Iterator[tuple[list[Configuration], Probe]]:
    """Token host, the PostgreSQL cluster, every configuration's services started and a key of
    its own created; all stopped and removed at the end, whatever happened."""
    root = (work / "replicas").absolute()
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        progress("replicas: token host and PostgreSQL cluster ...")
        paths = hsm.init(root / "hsm", tls=False)
        host = hsm.TokenHost(paths.root)
        stack.callback(host.stop)
        host.start()
        cluster = _cluster()
        stack.callback(cluster.remove)
        cluster.start()
        db = _pg_connect(cluster.dsn())
        stack.callback(db.close)
        db.execute("CREATE EXTENSION pg_stat_statements")
        policy = root / "policy.toml"
        policy.write_text(grant_everything([f"uid:{os.getuid()}"]))

        configs: list[Configuration] = []
        d = root / "sqlite"
        d.mkdir(mode=0o700)
        sqlite_cfg = _service_config(
            d / "signer.toml", d, paths, policy, str(d / "signer.db"), str(d / "audit.db"), ""
        )
        configs.append(
            Configuration(
                "sqlite",
                [Service("sqlite", sqlite_cfg, f"unix:{d}/signer.sock", d / "log", "")],
                "bench-sqlite",
                audit_db=d / "audit.db",
            )
        )
        for n in REPLICAS:
            schema = f"pg{n}"
            db.execute(f'CREATE SCHEMA "{schema}"')
            dsn = cluster.dsn(search_path=schema)
            services = []
            for i in range(1, n + 1):
                d = root / f"{schema}-r{i}"
                d.mkdir(mode=0o700)
                path = _service_config(d / "signer.toml", d, paths, policy, dsn, dsn, f"r{i}")
                services.append(Service(f"r{i}", path, f"unix:{d}/signer.sock", d / "log", f"r{i}"))
            configs.append(Configuration(schema, services, f"bench-{schema}", schema=schema))
        for cfg in configs:
            for s in cfg.services:
                stack.callback(s.stop)
        for cfg in configs:  # a configuration's replicas together: one migrates, the others wait
            for s in cfg.services:
                s.start()
        progress(f"replicas: {sum(len(c.services) for c in configs)} services starting ...")
        deadline = time.monotonic() + 90
        for cfg in configs:
            for s in cfg.services:
                ready = answers(s.address)
                while not ready():
                    assert s.proc is not None
                    if s.proc.poll() is not None or time.monotonic() > deadline:
                        log = s.log_path.read_text(errors="replace")[-3000:]
                        raise RuntimeError(f"{cfg.name}/{s.name} did not start:\n{log}")
                    time.sleep(0.2)
            _create_key(cfg.services[0].address, cfg.key, deadline)
        token_pgid = os.getpgid(host.pid) if host.pid else 0
        yield configs, Probe(cluster, token_pgid, db)


def _median(windows: list[dict[str, Any]], key: str) -> float:
    values = [w[key] for w in windows if key in w]
    return statistics.median(values) if values else float("nan")


def run(ctx: Context) -> ScenarioResult:
    rounds = max(1, ctx.replicas_rounds)
    began = time.monotonic()
    with _lab(ctx.work, ctx.progress) as (configs, probe):
        setup_seconds = time.monotonic() - began
        for r in range(rounds):
            ctx.progress(f"replicas round {r + 1}/{rounds} ...")
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for cfg in order:
                w = _window(probe, cfg, WINDOW_SECONDS)
                w["round"] = r
                cfg.windows.append(w)
                ctx.progress(
                    f"  {cfg.name}: {w['per_second']:,.0f} sig/s, "
                    f"{w['server_side_cpu_ms']:.2f} CPU-ms/sig, {w['errors']} errors"
                )
        for cfg in configs[1:]:
            if cfg.name in ("pg1", "pg3"):
                ctx.progress(f"replicas: statements per Sign, {cfg.name} ...")
                cfg.counted = _count_statements(probe.db, cfg)
        measured_seconds = time.monotonic() - began
    ctx.progress(f"replicas: done in {time.monotonic() - began:.0f}s")

    base = configs[0]
    base_rate = _median(base.windows, "per_second")
    by_round = {w["round"]: w["per_second"] for w in base.windows}
    ratios: dict[str, float | None] = {}
    figures: dict[str, float | None] = {"replicas_sqlite_sig_per_s": base_rate}
    rows, cpu_rows, db_rows, notes = [], [], [], []
    summary: dict[str, Any] = {}
    for cfg in configs:
        ws = cfg.windows
        rate = _median(ws, "per_second")
        rates = [w["per_second"] for w in ws]
        per_round = [w["per_second"] / by_round[w["round"]] for w in ws if by_round.get(w["round"])]
        ratio = rate / base_rate if base_rate else None
        if cfg is not base:
            ratios[f"replicas_{cfg.name}_vs_sqlite"] = ratio
        summary[cfg.name] = {
            "replicas": len(cfg.services),
            "median": {
                k: _median(ws, k)
                for k in ws[0]
                if isinstance(ws[0][k], float | int) and k != "round"
            },
            "ratio_of_medians": ratio,
            "per_round_ratios": per_round,
        }
        cpu_ratio = _median(ws, "server_side_cpu_ms") / _median(base.windows, "server_side_cpu_ms")
        rows.append(
            [
                cfg.name,
                "SQLite" if cfg is base else f"PostgreSQL, {len(cfg.services)} replica(s)",
                f"{rate:,.0f}",
                f"{min(rates):,.0f} to {max(rates):,.0f}",
                fmt_ratio(ratio),
                (
                    f"{min(per_round):.2f} to {max(per_round):.2f}"
                    if per_round and cfg is not base
                    else "-"
                ),
                f"{_median(ws, 'p50_ms'):.1f}",
                f"{_median(ws, 'p99_ms'):.1f}",
                f"{sum(w['errors'] for w in ws)}",
                f"{_median(ws, 'server_side_cpu_ms'):.2f}",
                fmt_ratio(cpu_ratio),
            ]
        )
        cpu_rows.append(
            [
                cfg.name,
                f"{_median(ws, 'service_cpu_ms'):.2f}",
                f"{_median(ws, 'token_cpu_ms'):.2f}",
                f"{_median(ws, 'postgres_cpu_ms'):.2f}",
                f"{_median(ws, 'loadgen_cpu_ms'):.2f}",
                f"{_median(ws, 'machine_busy_pct'):.0f}%",
                f"{_median(ws, 'machine_steal_pct'):.1f}%",
            ]
        )
        seconds = sum(w["seconds"] for w in ws)
        audit_rate = sum(w["audit_records"] for w in ws) / seconds
        calls = sum(w["calls"] for w in ws)
        db_row = [
            cfg.name,
            f"{audit_rate:,.0f}",
            f"{sum(w['audit_records'] for w in ws) / calls:.3f}" if calls else "n/a",
        ]
        if cfg.schema and "wal_sync" in ws[0]:
            syncs = sum(w["wal_sync"] for w in ws)
            db_row += [
                f"{sum(w['xact_commit'] for w in ws) / seconds:,.0f}",
                f"{syncs / seconds:,.0f}",
                f"{sum(w['audit_records'] for w in ws) / syncs:.1f}" if syncs else "n/a",
                f"{sum(w['wal_bytes'] for w in ws) / calls:,.0f}" if calls else "n/a",
            ]
            summary[cfg.name]["pg_totals"] = {
                "seconds": seconds,
                "calls": calls,
                "audit_records": sum(w["audit_records"] for w in ws),
                "xact_commit": sum(w["xact_commit"] for w in ws),
                "wal_sync": syncs,
                "wal_records": sum(w["wal_records"] for w in ws),
                "wal_bytes": sum(w["wal_bytes"] for w in ws),
            }
        else:
            db_row += ["-", "-", "-", "-"]
        db_rows.append(db_row)
    tables = [
        Table(
            f"Replicas: ec-p256 Sign, {CALLERS} callers, medians of {rounds} interleaved "
            f"windows of {WINDOW_SECONDS:g} s",
            [
                "config",
                "store and audit log",
                "sig/s",
                "range",
                "vs sqlite",
                "per-round ratios",
                "p50 ms",
                "p99 ms",
                "errors",
                "CPU-ms/sig (service+token+PG)",
                "CPU vs sqlite",
            ],
            rows,
        ),
        Table(
            "Replicas: CPU-ms per signature by part (medians), machine busy and steal",
            ["config", "services", "token host", "PostgreSQL", "load generator", "busy", "steal"],
            cpu_rows,
        ),
        Table(
            "Replicas: audit and database (sums over the windows)",
            [
                "config",
                "audit records/s",
                "records per OK call",
                "PG xact/s",
                "WAL fsyncs/s",
                "records per fsync",
                "WAL bytes/sig",
            ],
            db_rows,
        ),
    ]
    count_rows = []
    for cfg in configs[1:]:
        if not cfg.counted:
            continue
        for s in cfg.counted["statements"]:
            count_rows.append([cfg.name, f"`{s['query'][:90]}`", f"{s['per_sign']:.3f}"])
        count_rows.append(
            [cfg.name, "**every statement**", f"{cfg.counted['statements_per_sign'] or 0:.3f}"]
        )
    if count_rows:
        tables.append(
            Table(
                f"Replicas: statements per Sign (pg_stat_statements, {COUNT_SECONDS:g} s run, "
                f"{CALLERS} callers; the pool's empty-query check at checkout is not counted)",
                ["config", "statement", "per Sign"],
                count_rows,
            )
        )
    notes.append(
        "Each replica is called on its own Unix socket by its share of the callers (all in one "
        "load-generator process): the front is not in the path (see `transport` for its cost)."
    )
    notes.append(
        "Every configuration runs at once (idle when not measured) on one token host and one "
        "durable PostgreSQL cluster (fsync, synchronous_commit, full_page_writes on); windows "
        "are interleaved in rotated order. "
        f"Setup {setup_seconds:.0f} s, scenario {measured_seconds:.0f} s."
    )
    data = {
        "callers": CALLERS,
        "rounds": rounds,
        "window_seconds": WINDOW_SECONDS,
        "summary": summary,
        "windows": {c.name: c.windows for c in configs},
        "statements": {c.name: c.counted for c in configs if c.counted},
        "setup_seconds": setup_seconds,
        "seconds": measured_seconds,
    }
    return ScenarioResult(NAME, data, ratios, tables, notes, figures)
