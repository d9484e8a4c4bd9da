"""The soak: a real service under every RPC from many callers for a long time, its token host
restarted every few minutes; then every invariant checked.

    python -m tests.soak --minutes 30          # make soak (SOAK_MINUTES, SOAK_ARGS)

It starts a token host of its own (SoftHSM2 behind ``p11-kit server``, in its own directory,
never a test session's) and ``signer serve`` as its own process on a configuration written
here, with a policy granting the callers of tests.soak.workloads. While they call, the token
host is stopped and started every ``--restart-every`` minutes, and the service's RSS, threads
and open descriptors are sampled every ``--sample-every`` seconds.

Afterwards: the callers stop; signatures still waiting for a public key are checked; every
pinned version's public key is asked for once more; the service is stopped gracefully (SIGTERM:
its last checkpoint); ``signer audit-log verify`` must find the log whole and signed to its
end, the service's own log agreeing as a witness; and every call answered OK must have an
audit record of its own, with status OK (tests.soak.ledger).

It fails (exit 1) on: a signature that does not verify, or could not be checked; a wrong
Verify answer or any other inconsistency between answers; an OK answer without its record;
an audit log that does not verify; a status no call of its kind should get (INTERNAL,
UNKNOWN, DEADLINE_EXCEEDED: a hang; CANCELLED; ...); an RPC never answered OK; the service
dying, or not serving again within a minute of a restart (the stacks of its threads are then
written beside its log, and the run stops there unless ``--keep-going``); a caller stuck at
the end; RSS growth past the threshold over the second half of the run (see
:func:`rss_figures`).

UNAVAILABLE is expected while the token host is away and for a while after (the service
refuses calls once the audit log's unsigned backlog reaches its bound, until it can sign a
checkpoint again); each one is placed against the restarts, and those outside them are
reported, not failed (a loaded machine can make a health check time out).

Results: a summary on stdout and JSON in ``--json`` (default var/soak/latest.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from signer._internal import config as config_mod
from signer._internal import hsm
from signer._internal.front import ISSUER_HEADER, SERIAL_HEADER, SUBJECT_HEADER
from signer._internal.policy import Caller as PolicyCaller
from signer.v1 import signer_pb2 as pb
from tests.soak.crypto import load_pem
from tests.soak.ledger import METHODS, Ledger, record_key
from tests.soak.workloads import (
    IMPORTED,
    SCOPES,
    Caller,
    KeyInfo,
    Settings,
    World,
    admin_loop,
    import_once,
    importer_loop,
    intruder_loop,
    reader_loop,
    signer_loop,
)

REPO = Path(__file__).resolve().parents[2]
SIGNER_BIN = Path(sys.executable).parent / "signer"
ISSUER = "CN=soak CA"
ALGORITHMS = ("ec-p256", "ec-p384", "ec-p521", "rsa-2048", "ed25519")
CREATED_ALGORITHMS = ("ec-p256", "ec-p384", "rsa-2048")  # what administrators create
UNAVAILABLE_GRACE = 20.0  # seconds after SERVING again that UNAVAILABLE still counts as a restart's
RECOVERY_LIMIT = 60.0  # seconds the service has to serve again after the token host is back
STOP_LIMIT = 60.0  # seconds a graceful stop may take (server.grace_seconds is 10)


# --- arguments ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long the callers call")
    p.add_argument(
        "--restart-every",
        type=float,
        default=3.0,
        help="minutes between token host restarts (none in the last minute)",
    )
    p.add_argument(
        "--down-seconds",
        type=float,
        default=3.0,
        help="how long the token host stays stopped each time",
    )
    p.add_argument("--signers", type=int, default=6, help="x509 signing callers (front socket)")
    p.add_argument(
        "--local-signers", type=int, default=2, help="signing callers by uid (the local socket)"
    )
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS samples")
    p.add_argument(
        "--rss-max-growth-mib",
        type=float,
        default=None,
        help="RSS growth over the second half above which the soak fails "
        "(default: the larger of 8 MiB and 5%% of the second half's median)",
    )
    p.add_argument(
        "--create-every",
        type=float,
        default=60.0,
        help="seconds between CreateKey calls of each administrator",
    )
    p.add_argument("--import-every", type=float, default=20.0, help="seconds between imports")
    p.add_argument(
        "--work",
        type=Path,
        default=REPO / "var" / "soak" / "work",
        help="state directory (emptied first; kept afterwards)",
    )
    p.add_argument("--json", type=Path, default=REPO / "var" / "soak" / "latest.json")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="go on after the service failed to serve again after a restart (default: stop)",
    )
    return p.parse_args(argv)


# --- the service and its token host -------------------------------------------------------------


def serving(address: str, timeout: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


@dataclass(frozen=True)
class Identity:
    label: str
    subject: str  # x509 subject; "" for the local (uid) caller
    serial: str = ""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.subject:
            return ()
        return (
            (SUBJECT_HEADER, self.subject),
            (ISSUER_HEADER, ISSUER),
            (SERIAL_HEADER, self.serial),
        )

    @property
    def audited_as(self) -> str:
        """The caller as the audit log names it."""
        if self.subject:
            return PolicyCaller.x509(self.subject, ISSUER, self.serial).identity
        uid = os.getuid()
        try:
            user: str | None = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = None
        return PolicyCaller.unix(uid, user).identity


def policy_text(signers: list[tuple[Identity, str]]) -> str:
    def grant(callers: list[str], operations: list[str], scopes: list[str]) -> str:
        return (
            f"[[grant]]\ncallers = {json.dumps(callers)}\n"
            f"operations = {json.dumps(operations)}\nscopes = {json.dumps(scopes)}\n\n"
        )

    out = grant([f"uid:{os.getuid()}"], ["*"], ["*"])
    for scope in SCOPES:
        mine = [f"x509:{i.subject}" for i, s in signers if s == scope]
        if mine:
            out += grant(mine, ["sign", "verify", "read"], [scope])
        out += grant(
            [f"x509:CN=soak-admin-{scope}"],
            ["create", "rotate", "disable", "destroy", "read"],
            [scope],
        )
    out += grant(["x509:CN=soak-auditor"], ["read"], ["*"])
    out += grant(
        ["x509:CN=soak-importer"], ["import", "rotate", "read", "sign", "verify"], [IMPORTED]
    )
    return out  # x509:CN=soak-intruder has no grant at all


def service_config(work: Path, sockets: Path, paths: hsm.HsmPaths, policy: Path) -> Path:
    cfg = config_mod.Config(
        server=config_mod.ServerConfig(
            listen=f"unix:{sockets}/local.sock",
            front_socket=str(sockets / "front.sock"),
            policy_file=str(policy),
        ),
        token=config_mod.TokenConfig(
            server_address=paths.server_address, pin_file=str(paths.user_pin)
        ),
        store=config_mod.StoreConfig(path=str(work / "signer.db")),
        # Versions scheduled during the soak are destroyed during it, by the reaper.
        keys=config_mod.KeysConfig(
            min_destruction_waiting_period_seconds=1, reaper_interval_seconds=5.0
        ),
        audit=config_mod.AuditConfig(path=str(work / "audit.db")),
    )
    path = work / "signer.toml"
    path.write_text(config_mod.dump(cfg))
    return path


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    config: Path
    log: Path
    local: str
    front: str


@contextlib.contextmanager
def started_service(work: Path, config: Path, sockets: Path) -> Iterator[Service]:
    log = work / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(SIGNER_BIN), "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    svc = Service(proc, config, log, f"unix:{sockets}/local.sock", f"unix:{sockets}/front.sock")
    try:
        if not wait_until(lambda: serving(svc.local) or proc.poll() is not None, 60):
            raise RuntimeError(f"the service did not start; see {log}")
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}; see {log}")
        yield svc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- sampling -----------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _group(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    pids.append(int(d.name))
    return pids


@dataclass
class Sampler:
    pid: int
    host: hsm.TokenHost
    every: float
    callers: list[Caller]
    started: float
    samples: list[dict[str, float]] = field(default_factory=list)
    longest_wait: dict[str, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        now = time.monotonic()
        try:
            st = _status(self.pid)
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return  # gone: the main loop notices
        token_rss = 0.0
        if self.host.pid is not None:
            for p in _group(self.host.pid):
                with contextlib.suppress(OSError, KeyError, ValueError):
                    token_rss += int(_status(p)["VmRSS"].split()[0]) / 1024
        self.samples.append(
            {
                "t": round(now - self.started, 1),
                "rss_mib": round(int(st["VmRSS"].split()[0]) / 1024, 2),
                "threads": int(st["Threads"]),
                "fds": fds,
                "token_host_rss_mib": round(token_rss, 2),
            }
        )
        for c in self.callers:
            wait = now - c.last_answer
            if wait > self.longest_wait.get(c.label, 0.0):
                self.longest_wait[c.label] = round(wait, 2)

    def run(self) -> None:
        while not self.stop.wait(
            max(0.0, self.every - (time.monotonic() - self.started) % self.every)
        ):
            self.sample()


def _slope_per_minute(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if not sxx:
        return 0.0
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def rss_figures(samples: list[dict[str, float]], max_growth: float | None) -> dict[str, Any]:
    """Start, end, max; the least-squares slope over the second half of the run and the growth
    it amounts to over that half. Flat: that growth is under the threshold, by default the
    larger of 8 MiB and 5% of the second half's median. The first half is where arenas, caches
    and SQLite's page caches reach their working size, and where the set of keys grows most;
    a leak of a few hundred bytes per call (tens of MiB over fifteen minutes at this load)
    shows in the second half, while glibc's arenas (several MiB up and down as threads come
    and go around a restart) do not reach it."""
    rss = [s["rss_mib"] for s in samples]
    if len(rss) < 4:
        return {"samples": len(rss), "flat": False, "why": "too few samples"}
    end_t = samples[-1]["t"]
    half = [(s["t"], s["rss_mib"]) for s in samples if s["t"] >= end_t / 2]
    slope = _slope_per_minute(half)
    span = (half[-1][0] - half[0][0]) / 60.0
    growth = slope * span
    median = statistics.median(p[1] for p in half)
    threshold = max_growth if max_growth is not None else max(8.0, 0.05 * median)

    def of(key: str) -> dict[str, float]:
        values = [s[key] for s in samples]
        return {"start": values[0], "end": values[-1], "max": max(values), "min": min(values)}

    return {
        "samples": len(rss),
        "start_mib": rss[0],
        "end_mib": rss[-1],
        "max_mib": max(rss),
        "min_mib": min(rss),
        "second_half_median_mib": round(median, 2),
        "second_half_slope_mib_per_min": round(slope, 4),
        "second_half_growth_mib": round(growth, 2),
        "threshold_mib": round(threshold, 2),
        "flat": growth < threshold,
        "threads": of("threads"),
        "fds": of("fds"),
        "token_host_rss_mib": of("token_host_rss_mib"),
    }


# --- the run ------------------------------------------------------------------------------------


def _channel(address: str) -> grpc.Channel:
    # A connection of its own per caller (no subchannel shared between channels).
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def set_up_keys(admin: Caller) -> tuple[list[str], dict[str, str]]:
    """The keys signers start with: every algorithm the service offers, in each scope."""
    offered, refused = [], {}
    for algorithm in ALGORITHMS:
        for scope in SCOPES:
            name = f"soak-{scope}-{algorithm}"
            req = pb.CreateKeyRequest(name=name, algorithm=algorithm, scope=scope)
            key = admin.call("CreateKey", req, accept=("FAILED_PRECONDITION",))
            if key is None:
                refused[algorithm] = "refused (see errors)"
                break
            if admin.public_key(name, 1) is None:
                raise RuntimeError(f"no public key for {name}")
            admin.world.add_key(KeyInfo(name, algorithm, scope))
        else:
            offered.append(algorithm)
    if not offered:
        raise RuntimeError("the service created no key")
    return offered, refused


@dataclass
class Restart:
    stopped_at: float
    started_at: float = 0.0
    serving_at: float | None = None
    not_serving_seen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "stopped_at": round(self.stopped_at, 1),
            "started_at": round(self.started_at, 1),
            "serving_at": None if self.serving_at is None else round(self.serving_at, 1),
            "recovery_s": None
            if self.serving_at is None
            else round(self.serving_at - self.started_at, 2),
            "not_serving_seen": self.not_serving_seen,
        }


def restart(host: hsm.TokenHost, svc: Service, ledger: Ledger, down: float) -> Restart:
    r = Restart(ledger.now())
    host.stop()
    deadline = time.monotonic() + down
    while time.monotonic() < deadline:
        if not serving(svc.local, timeout=1.0):
            r.not_serving_seen = True
        time.sleep(0.2)
    r.started_at = ledger.now()
    host.start()
    if wait_until(lambda: serving(svc.local, timeout=1.0), RECOVERY_LIMIT, 0.1):
        r.serving_at = ledger.now()
    return r


def capture_stacks(svc: Service, what: str) -> tuple[Path, Path]:
    """The service's threads, native and Python, in a file beside its log: what a service
    that does not come back is waiting for. With gdb (the crash tooling's): its backtraces,
    then faulthandler run inside the service (the GIL taken as a thread of its own would)."""
    out = svc.log.parent / f"stacks-{what}.txt"
    if shutil.which("gdb") is None:
        out.write_text("not captured: no gdb\n")
        return out, out
    python = out.with_suffix(".py.txt")
    dump = (
        f"import faulthandler; f = open({str(python)!r}, 'w'); "
        "faulthandler.dump_traceback(f, all_threads=True); f.close()"
    )
    gdb = ["gdb", "-p", str(svc.proc.pid), "-batch", "-nx"]
    with open(out, "w") as f:
        for args in (
            ["-ex", "thread apply all bt 40"],
            [
                "-ex",
                "call (int)PyGILState_Ensure()",
                "-ex",
                f"call (int)PyRun_SimpleString({json.dumps(dump)})",
                "-ex",
                "call (void)PyGILState_Release($1)",
            ],
        ):
            try:
                subprocess.run(gdb + args, stdout=f, stderr=subprocess.STDOUT, timeout=120)
            except subprocess.TimeoutExpired:
                f.write(f"\ngdb {' '.join(args)}: no answer within 120 s\n")
    return out, python


def stuck_in_p11_kit(stacks: Path) -> int:
    """How many threads of a gdb ``thread apply all bt`` wait on a condition variable inside
    p11-kit's client module: where p11-kit 0.24's client leaves the other callers of a
    connection whose server was stopped in the middle of an answer (its read code is never
    reset, nor its condition broadcast), for good."""
    text = stacks.read_text(errors="replace")
    return sum(
        1
        for thread in text.split("\nThread ")[1:]
        if "pthread_cond_wait" in thread and "p11-kit-client.so" in thread
    )


def audit_check(svc: Service, ledger: Ledger) -> dict[str, Any]:
    """``signer audit-log verify`` (with the service's log as a witness), then every OK answer
    matched with an OK record."""
    verify = subprocess.run(
        [
            str(SIGNER_BIN),
            "audit-log",
            "verify",
            "--config",
            str(svc.config),
            "--witness",
            str(svc.log),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    db = sqlite3.connect(f"file:{svc.config.parent / 'audit.db'}?mode=ro", uri=True)
    recorded: Counter[bytes] = Counter()
    ok_by_method: Counter[str] = Counter()
    by_status: Counter[str] = Counter()
    service_records: Counter[str] = Counter()  # the service's own: AuditPaused, Throttled
    total = 0
    try:
        rows = db.execute("SELECT caller, operation, key, payload_sha256, status FROM records")
        for caller, operation, key, payload, status in rows:
            total += 1
            by_status[status] += 1
            if operation not in METHODS:
                service_records[operation] += 1
            if status == "OK":
                ok_by_method[operation] += 1
                recorded[record_key(caller, operation, key, payload)] += 1
    finally:
        db.close()
    missing = ledger.expected_records - recorded
    return {
        "verify_exit": verify.returncode,
        "verify_output": (verify.stdout + verify.stderr).strip(),
        "whole": verify.returncode == 0 and " is whole" in verify.stdout,
        "records": total,
        "records_by_status": dict(by_status.most_common()),
        "service_records": dict(service_records),
        "ok_records_by_method": dict(sorted(ok_by_method.items())),
        "ok_answers_checked": sum(ledger.expected_records.values()),
        "lost_records": sum(missing.values()),
        "lost_by_method_at_least": {
            m: ledger.ok[m] - ok_by_method[m] for m in METHODS if ledger.ok[m] > ok_by_method[m]
        },
    }


def service_log_summary(path: Path) -> dict[str, Any]:
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    tracebacks = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            levels["not json"] += 1
            messages[f"(raw) {line[:120]}"] += 1
            tracebacks += line.startswith("Traceback")
            continue
        level = str(rec.get("level", "?"))
        levels[level] += 1
        tracebacks += "traceback" in rec
        if level in ("warning", "error", "critical"):
            messages[f"{level}: {rec.get('msg', '')}"[:160]] += 1
    return {
        "levels": dict(levels),
        "tracebacks": tracebacks,
        "top_messages": dict(messages.most_common(15)),
    }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def at(q: float) -> float:
        return round(1000 * v[min(len(v) - 1, int(q * len(v)))], 1)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(1000 * v[-1], 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    work: Path = args.work.absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sockets = Path(tempfile.mkdtemp(prefix="soak-"))  # Unix socket paths are short
    duration = args.minutes * 60.0
    every = args.restart_every * 60.0
    quiet = min(60.0, max(10.0, every / 2))  # no restart this close to the end
    ledger = Ledger()
    settings = Settings(create_every=args.create_every, import_every=args.import_every)
    world = World(ledger, settings)
    report: dict[str, Any] = {"seed": seed, "minutes": args.minutes, "work": str(work)}
    failures: list[str] = []

    saved = os.environ.get("SOFTHSM2_CONF")
    paths = hsm.init(work / "hsm", tls=False)  # points SOFTHSM2_CONF at it, in this process
    host = hsm.TokenHost(work / "hsm")
    host.start()
    try:
        x509 = [
            (Identity(f"signer-{i}", f"CN=soak-signer-{i}", f"5A{i:02X}"), SCOPES[i % 2])
            for i in range(args.signers)
        ]
        policy = work / "policy.toml"
        policy.write_text(policy_text(x509))
        cfg = service_config(work, sockets, paths, policy)
        with started_service(work, cfg, sockets) as svc:
            report.update(
                soak(args, svc, host, world, x509, seed, duration, every, quiet, failures)
            )
            # Graceful stop: calls drain, the last checkpoint is signed.
            svc.proc.send_signal(signal.SIGTERM)
            try:
                report["service_exit"] = svc.proc.wait(timeout=STOP_LIMIT)
            except subprocess.TimeoutExpired:
                report["service_exit"] = f"did not stop within {STOP_LIMIT:g} s of SIGTERM"
            if report["service_exit"] != 0:
                failures.append(f"service stop: {report['service_exit']}")
            report["audit"] = audit_check(svc, ledger)
            report["service_log"] = service_log_summary(svc.log)
    except Exception as exc:  # the soak's own failure: reported like any other, with its trace
        failures.append(f"the soak itself failed: {type(exc).__name__}: {exc}")
        report["traceback"] = traceback.format_exc()
    finally:
        host.stop()
        shutil.rmtree(sockets, ignore_errors=True)
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved
    audit = report.get("audit", {"whole": False, "verify_output": "not run", "lost_records": 0})
    if not audit["whole"]:
        failures.append(f"audit-log verify: {audit['verify_output'][:300]}")
    if audit["lost_records"]:
        failures.append(f"{audit['lost_records']} OK answers without their audit record")
    report["failures"] = failures
    report["passed"] = not failures
    return report


def soak(
    args: argparse.Namespace,
    svc: Service,
    host: hsm.TokenHost,
    world: World,
    x509: list[tuple[Identity, str]],
    seed: int,
    duration: float,
    every: float,
    quiet: float,
    failures: list[str],
) -> dict[str, Any]:
    ledger = world.ledger
    local_id = Identity("local-admin", "")
    setup = Caller(world, "local-setup", local_id.audited_as, _channel(svc.local))
    offered, refused = set_up_keys(setup)
    # One import before the clock starts: an RSA-4096 wrapping key can take the token tens of
    # seconds on a busy machine, and a short run must still see both import RPCs answer.
    if not import_once(setup, random.Random(seed), 0, {}):
        failures.append("the set-up import failed")
    ok_before_run = Counter(ledger.ok)

    def caller(ident: Identity, address: str) -> Caller:
        return Caller(world, ident.label, ident.audited_as, _channel(address), ident.metadata)

    threads: list[tuple[threading.Thread, Caller]] = []

    def spawn(c: Caller, target: Callable[..., None], *a: Any) -> None:
        t = threading.Thread(target=target, args=(c, *a), name=c.label, daemon=True)
        threads.append((t, c))

    rng_seed = iter(range(seed, seed + 1000))
    for ident, scope in x509:
        spawn(caller(ident, svc.front), signer_loop, (scope,), next(rng_seed))
    for i in range(args.local_signers):
        spawn(
            caller(Identity(f"local-signer-{i}", ""), svc.local),
            signer_loop,
            (*SCOPES, IMPORTED),
            next(rng_seed),
        )
    spawn(
        caller(Identity("auditor", "CN=soak-auditor", "5B01"), svc.front),
        reader_loop,
        (*SCOPES, IMPORTED),
        next(rng_seed),
    )
    spawn(
        caller(Identity("local-reader", ""), svc.local),
        reader_loop,
        (*SCOPES, IMPORTED),
        next(rng_seed),
    )
    created = [a for a in CREATED_ALGORITHMS if a in offered]
    for n, scope in enumerate(SCOPES):
        admin = Identity(f"admin-{scope}", f"CN=soak-admin-{scope}", f"5C{n:02X}")
        spawn(caller(admin, svc.front), admin_loop, scope, created, next(rng_seed))
    spawn(
        caller(Identity("importer", "CN=soak-importer", "5D01"), svc.front),
        importer_loop,
        next(rng_seed),
    )
    anonymous = Caller(world, "anonymous", "unauthenticated", _channel(svc.front))
    spawn(
        caller(Identity("intruder", "CN=soak-intruder", "5E01"), svc.front),
        intruder_loop,
        anonymous,
        next(rng_seed),
    )

    started = time.monotonic()
    sampler = Sampler(svc.proc.pid, host, args.sample_every, [c for _, c in threads], started)
    sampler.sample()
    sampling = threading.Thread(target=sampler.run, name="sampler", daemon=True)
    sampling.start()
    for t, _ in threads:
        t.start()
    print(
        f"soak: {len(threads)} callers for {duration / 60:g} min, token host restarted every "
        f"{every / 60:g} min; state in {svc.config.parent}",
        flush=True,
    )

    restarts: list[Restart] = []
    next_restart = started + every
    died = None
    hang: dict[str, Any] | None = None
    last_note = started
    while (now := time.monotonic()) < started + duration:
        if svc.proc.poll() is not None:
            died = svc.proc.returncode
            failures.append(f"the service died during the soak (exit {died})")
            break
        if now >= next_restart and now + quiet < started + duration:
            r = restart(host, svc, ledger, args.down_seconds)
            restarts.append(r)
            if r.serving_at is None:
                where = capture_stacks(svc, f"restart-{len(restarts)}")
                hang = {
                    "restart": len(restarts),
                    "stacks": [str(w) for w in where],
                    "threads_in_p11_kit_client": stuck_in_p11_kit(where[0]),
                }
                failures.append(
                    f"not serving {RECOVERY_LIMIT:g} s after restart {len(restarts)} "
                    f"(its threads' stacks: {', '.join(map(str, where))})"
                )
                if not args.keep_going:
                    break  # what follows would only measure a service that is not there
            next_restart += every
            continue
        if now - last_note >= 60:
            last_note = now
            rss = sampler.samples[-1]["rss_mib"] if sampler.samples else 0
            print(
                f"  {int(now - started)} s: {sum(ledger.ok.values())} OK answers, "
                f"{ledger.signatures_verified} signatures verified, "
                f"{ledger.wrong_signatures} wrong, {sum(ledger.unexpected.values())} "
                f"unexpected errors, {len(restarts)} restarts, RSS {rss} MiB",
                flush=True,
            )
        time.sleep(min(1.0, max(0.0, started + duration - now)))
    elapsed = time.monotonic() - started
    run_end = ledger.now()

    world.stop.set()
    join_by = time.monotonic() + world.settings.deadline + 30
    stuck = []
    for t, c in threads:
        t.join(max(0.0, join_by - time.monotonic()))
        if t.is_alive():
            stuck.append(c.label)
    sampler.stop.set()
    sampling.join()
    sampler.sample()
    if stuck:
        failures.append(f"callers stuck at the end: {stuck}")

    # The token host is up (no restart this close to the end): settle what is left, unless
    # the service is known to be gone or not to come back (nothing would answer).
    up = died is None and hang is None
    if up and not wait_until(lambda: serving(svc.local), RECOVERY_LIMIT):
        failures.append("not serving at the end")
        up = False
    unresolved = 0
    for check in list(world.pending):
        if not (up and check(setup)):
            unresolved += 1
    ledger.add_unverified(unresolved)
    for name, version in world.pubkeys.versions() if up else ():
        # A version's public key never changes.
        req = pb.GetPublicKeyRequest(name=name, version=version, format=pb.PEM)
        resp = setup.call("GetPublicKey", req, accept=("FAILED_PRECONDITION",))
        if resp is not None:
            setup.pin(name, version, resp.algorithm, load_pem(resp.pem))

    states = versions_by_state(setup) if up else {}  # a call: before the answers are summed
    figures = summarise(ledger, ok_before_run, restarts, sampler, args, elapsed, run_end, failures)
    figures.update(
        {
            "algorithms": offered,
            "algorithms_refused": refused,
            "keys": len(world.keys),
            "versions_pinned": len(world.pubkeys),
            "versions_by_state": states,
            "hang": hang,
            "callers": [c.label for _, c in threads] + ["anonymous", "local-setup"],
        }
    )
    return figures


def versions_by_state(c: Caller) -> dict[str, int]:
    """How many versions of all keys end in each state (destroyed: by the reaper, meanwhile)."""
    states: Counter[str] = Counter()
    token = ""
    while True:
        page = c.call("ListKeys", pb.ListKeysRequest(page_size=1000, page_token=token))
        if page is None:
            return {}
        for key in page.keys:
            for v in key.versions:
                states[pb.KeyVersionState.Name(v.state)] += 1
        token = page.next_page_token
        if not token:
            return dict(states)


def summarise(
    ledger: Ledger,
    ok_before_run: Counter[str],
    restarts: list[Restart],
    sampler: Sampler,
    args: argparse.Namespace,
    elapsed: float,
    run_end: float,
    failures: list[str],
) -> dict[str, Any]:
    # UNAVAILABLE during the run, outside every restart's window (after the run, the service
    # may be down for a reason already reported).
    windows = [
        (r.stopped_at - 1.0, (r.serving_at or r.stopped_at + RECOVERY_LIMIT) + UNAVAILABLE_GRACE)
        for r in restarts
    ]
    outside = [
        (t, m)
        for t, m in ledger.unavailable
        if t <= run_end and not any(a <= t <= b for a, b in windows)
    ]
    during_run = ledger.ok - ok_before_run
    calls: dict[str, dict[str, Any]] = {}
    for m in METHODS:
        errors = {code: n for (method, code), n in ledger.errors.items() if method == m}
        calls[m] = {
            "ok": ledger.ok[m],
            "ok_during_run": during_run[m],
            "errors": errors,
            **percentiles(ledger.latencies.get(m, [])),
        }
    by_status: Counter[str] = Counter()
    for (_, code), n in ledger.errors.items():
        by_status[code] += n
    rss = rss_figures(sampler.samples, args.rss_max_growth_mib)
    # Every RPC answered OK at least once: during the run itself when it lasts 5 minutes or
    # more; in a short run, set-up counts too.
    exercised = during_run if elapsed >= 300 else ledger.ok
    not_exercised = [m for m in METHODS if not exercised[m]]

    if ledger.wrong_signatures:
        failures.append(f"{ledger.wrong_signatures} wrong signatures")
    if ledger.unverified:
        failures.append(f"{ledger.unverified} signatures that could not be checked")
    if ledger.defects:
        failures.append(f"inconsistent answers: {dict(ledger.defects)}")
    if ledger.unexpected:
        failures.append(
            "unexpected statuses: "
            + ", ".join(f"{m} {c} x{n}" for (m, c), n in ledger.unexpected.items())
        )
    if not_exercised:
        failures.append(f"never answered OK: {not_exercised}")
    if not rss.get("flat"):
        failures.append(
            f"RSS not flat: {rss.get('second_half_growth_mib')} MiB over the second "
            f"half (threshold {rss.get('threshold_mib')} MiB)"
        )
    return {
        "elapsed_s": round(elapsed, 1),
        "ok_answers": sum(ledger.ok.values()),
        "calls": calls,
        "errors_by_status": dict(by_status.most_common()),
        "unexpected": {f"{m} {c}": n for (m, c), n in ledger.unexpected.items()},
        "unexpected_samples": ledger.unexpected_samples,
        "error_messages": {f"{c}: {r}": n for (c, r), n in ledger.reasons.most_common(20)},
        "unavailable": {
            "total": len(ledger.unavailable),
            "outside_restarts": len(outside),
            "outside_samples": [(round(t, 1), m) for t, m in outside[:20]],
        },
        "signatures_verified": ledger.signatures_verified,
        "wrong_signatures": ledger.wrong_signatures,
        "wrong_samples": ledger.wrong_samples,
        "unverified_signatures": ledger.unverified,
        "verify_answers": dict(ledger.verify_answers),
        "batch_items": dict(ledger.batch_items),
        "defects": dict(ledger.defects),
        "defect_samples": ledger.defect_samples,
        "restarts": [r.to_dict() for r in restarts],
        "rss": rss,
        "rss_samples": sampler.samples,
        "longest_wait_for_an_answer_s": dict(sorted(sampler.longest_wait.items())),
    }


def print_summary(r: dict[str, Any]) -> None:
    print(f"\nsoak: {r.get('elapsed_s', 0) / 60:.1f} min, seed {r['seed']}, state in {r['work']}")
    print(f"{'RPC':32} {'OK':>9} {'p50 ms':>8} {'p99 ms':>8}  errors")
    for m, c in r.get("calls", {}).items():
        errs = ", ".join(f"{k} {v}" for k, v in sorted(c["errors"].items()))
        print(f"{m:32} {c['ok']:>9} {c.get('p50_ms', '-'):>8} {c.get('p99_ms', '-'):>8}  {errs}")
    print(
        f"signatures verified {r.get('signatures_verified')}, wrong "
        f"{r.get('wrong_signatures')}, unverified {r.get('unverified_signatures')}; "
        f"Verify answers {r.get('verify_answers')}; SignBatch items {r.get('batch_items')}"
    )
    print(
        f"errors by status {r.get('errors_by_status')}; unexpected {r.get('unexpected')}; "
        f"UNAVAILABLE outside restarts {r.get('unavailable', {}).get('outside_restarts')}"
    )
    for x in r.get("restarts", []):
        print(
            f"  restart at {x['stopped_at']} s: serving again {x['recovery_s']} s after the "
            f"host started (NOT_SERVING seen: {x['not_serving_seen']})"
        )
    a = r.get("audit", {})
    print(
        f"audit: {a.get('verify_output')}\n  {a.get('ok_answers_checked')} OK answers "
        f"checked against {a.get('records')} records: {a.get('lost_records')} lost; "
        f"records by status {a.get('records_by_status')}"
    )
    rss = r.get("rss", {})
    print(
        f"RSS MiB start {rss.get('start_mib')} end {rss.get('end_mib')} max "
        f"{rss.get('max_mib')}; second half {rss.get('second_half_slope_mib_per_min')} "
        f"MiB/min = {rss.get('second_half_growth_mib')} MiB (flat below "
        f"{rss.get('threshold_mib')}); threads {rss.get('threads')}; fds {rss.get('fds')}"
    )
    if r.get("defects"):
        print(f"defects {r['defects']}: {r.get('defect_samples', [])[:3]}")
    print(f"service log {r.get('service_log', {}).get('levels')}, exit {r.get('service_exit')}")
    if r.get("traceback"):
        print(r["traceback"])
    print("PASSED" if r["passed"] else "FAILED:\n  " + "\n  ".join(r["failures"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str))
    print_summary(report)
    print(f"JSON: {args.json}")
    return 0 if report["passed"] else 1
