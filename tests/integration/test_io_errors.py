"""I/O errors under the audit log and the key store, injected into a running service (issue 12).

No device-mapper or kernel fault injection here: ``strace`` attaches to the real service process
(``signer serve``) and makes chosen syscalls on chosen files fail with EIO (``-P FILE``: only
syscalls on that file; ``-e inject=SET:error=EIO``: the syscall is not made, its caller sees
EIO). Detaching strace (SIGINT) ends it; strace dies with the test process (``setpriv
--pdeathsig``), and the kernel detaches a dead tracer. Under signing from three threads, one
after the other:

* the audit log's writes fail (its ``-wal`` and database file), then only their fsyncs: calls
  fail UNAVAILABLE naming the audit log, health is NOT_SERVING while it lasts (the writer's
  retries, every second, fail too), no signature leaves without its record;
* the key store's writes fail, then only their fsyncs: a change fails UNAVAILABLE naming the
  key store and leaves no object in the token; signing, which only reads the store, goes on;
* the key store's reads fail: a call that must read it fails UNAVAILABLE naming the key store;
* the service is stopped while the databases' main files cannot be written (SQLite's last
  checkpoint at close fails: the WAL stays), and started again on them.

After each fault, strace detached, the service recovers by itself: health SERVING, signing
works, the kept records written. At the end, the service stopped: ``signer audit-log verify``
passes; every signature a caller received verifies and has exactly one record, saying OK; no
call answered otherwise has a record saying OK; the kept records are those of callers answered
UNAVAILABLE, and the AuditPaused records count every call refused before it ran; both databases
pass ``PRAGMA integrity_check``; ``signer keys reconcile`` finds store and token agreeing (the
token host is the test's own); the service's log has no traceback and no INTERNAL.

What SQLite (3.40) does, found here and with a bare connection under the same strace:

* an EIO on a WAL write or fsync fails the COMMIT (SQLITE_IOERR_WRITE, SQLITE_IOERR_FSYNC) and
  rolls the transaction back; the connection stays usable, and the next COMMIT once the file
  takes writes succeeds (it writes the frames again from the same offset, so a failed fsync is
  never merely retried). Nothing needs reopening; reopening would even be wrong: the last
  connection to close runs a checkpoint, and when that fails the next opener rebuilds the WAL
  index from the file, the failed COMMIT's frames included.
* an fsync that failed leaves the COMMIT's frames whole in the WAL: rolled back for the
  process, they are replayed by the recovery after a crash, unless a later COMMIT overwrote
  them first. The audit log now writes such records again at once, saying their calls were
  answered UNAVAILABLE (:func:`test_a_crash_after_a_failed_fsync_brings_back_nothing_untrue`);
  the key store's COMMIT of a new key can come back so too: the service keeps the key's token
  object then (StoreUncertain), an orphan ``reconcile --repair`` removes if the row does not.
* an EIO on a read is reported as SQLITE_CORRUPT, "database disk image is malformed" (unixRead
  maps EIO to SQLITE_IOERR_CORRUPTFS on purpose); it lasts only as long as the reads fail, and
  the key store's message says a failed read is reported so.
* the checkpoint into the database file after a COMMIT ignores its own errors (the records are
  durable in the WAL); at close, one that fails leaves the WAL for the next open.

``SIGNER_IO_FIGURES``: a JSON file the figures are appended to (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signer._internal import config as config_mod
from signer._internal.audit._log import NOT_ANSWERED, RETRY_SECONDS
from signer._wire import status_name
from signer.client import SignerClient
from signer.errors import SignerError, Unavailable
from tests.conftest import (
    SIGNER_BIN,
    ServiceProcess,
    TokenHostHandle,
    health_status,
    wait_until,
)
from tests.integration.own_host import own_host  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if os.geteuid() != 0:  # pragma: no cover - CI and make test run as root
    pytest.fail("test_io_errors attaches strace to the service and needs root", pytrace=False)

WRITES = "write,pwrite64,writev,pwritev,pwritev2"
SYNCS = "fsync,fdatasync,sync_file_range"
READS = "read,pread64,readv,preadv,preadv2"
THREADS = 3
# How long an awaited event may take: strace stops the service at every syscall it makes.
WAIT = 30.0
# What an UNAVAILABLE answer must name: the part that failed.
NAMED = ("the audit log cannot be written", "the key store cannot be used")
# A call refused before it ran while the audit log could not be written (AuditLog.check).
PAUSED = (
    "calls are refused until it can; the records of calls already made are kept and written then"
)
# A read that failed, as the key store says it (SQLite's own words would be "malformed" only).
READ_FAILED = (
    "the key store cannot be used (database disk image is malformed; SQLite says this of a "
    "read that failed with an I/O error too)"
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def _tracer(pid: int, task: int) -> int:
    """The pid tracing thread ``task`` of ``pid`` (0: none; -1: the thread has ended)."""
    try:
        status = Path(f"/proc/{pid}/task/{task}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return -1
    return int(status.split("TracerPid:", 1)[1].split()[0])


@dataclass
class Fault:
    """An strace attached to the service, failing some syscalls on some files with EIO."""

    strace: subprocess.Popen[bytes]
    out: Path
    detached: float = 0.0  # time.monotonic() once strace has gone

    def _injected(self) -> list[str]:
        return [
            ln
            for ln in self.out.read_text(errors="replace").splitlines()
            if ln.endswith("(INJECTED)")
        ]

    def hits(self) -> int:
        """How many syscalls it has failed so far (strace writes a line for each)."""
        return len(self._injected())

    def calls(self) -> list[str]:
        """The syscalls it failed, by name."""
        return sorted({ln.split()[1].split("(")[0] for ln in self._injected()})


@contextlib.contextmanager
def eio(pid: int, files: list[Path], syscalls: str, out: Path) -> Iterator[Fault]:
    """``syscalls`` on ``files`` fail with EIO in process ``pid`` while inside. On the way out,
    whatever happened, strace is detached (SIGINT; killed if it does not go: the kernel then
    detaches it) and every thread of ``pid`` is seen traced by nobody."""
    args = ["strace", "-f", "-qq", "-o", str(out), "-p", str(pid)]
    for path in files:
        args += ["-P", str(path)]
    args += ["-e", f"trace={syscalls}", "-e", f"inject={syscalls}:error=EIO"]
    # setpriv: strace is killed if this process dies, and the kernel then detaches it.
    strace = subprocess.Popen(
        ["setpriv", "--pdeathsig", "KILL", *args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    fault = Fault(strace, out)
    try:
        # Attached once every thread is traced by it (-f takes the threads started later).
        attached = wait_until(
            lambda: (
                strace.poll() is not None
                or all(_tracer(pid, t) in (strace.pid, -1) for t in _tasks(pid))
            ),
            WAIT,
        )
        if strace.poll() is not None:
            assert strace.stderr is not None
            pytest.fail(f"strace did not attach: {strace.stderr.read().decode()}")
        assert attached, "strace did not attach to every thread of the service"
        yield fault
    finally:
        if strace.poll() is None:
            strace.send_signal(signal.SIGINT)
            try:
                strace.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                strace.kill()
                strace.wait()
        assert strace.stderr is not None
        strace.stderr.close()
        assert wait_until(lambda: all(_tracer(pid, t) in (0, -1) for t in _tasks(pid)), WAIT)
        fault.detached = time.monotonic()


def _files(database: str) -> list[Path]:
    """A SQLite database's files that are written: the database and its WAL."""
    return [Path(database).resolve(), Path(f"{database}-wal").resolve()]


@dataclass
class Load:
    """Sign from ``THREADS`` threads, every message unique, until stopped; every answer kept."""

    address: str
    key: str
    signed: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # version, msg, sig
    refused: list[tuple[str, str, bytes]] = field(default_factory=list)  # status, why, msg
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for n in range(THREADS):
            t = threading.Thread(target=self._sign, args=(n,), name=f"load-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2 * WAIT)
        assert not any(t.is_alive() for t in self._threads), "a signing thread is stuck"

    def _sign(self, n: int) -> None:
        client = SignerClient(self.address, timeout=WAIT)
        try:
            i = 0
            while not self._stop.is_set():
                i += 1
                message = f"load {n}-{i}-{time.monotonic_ns()}".encode()
                try:
                    sig = client.sign(self.key, message=message)
                except SignerError as exc:
                    with self._lock:
                        self.refused.append((status_name(exc), exc.message, message))
                    self._stop.wait(0.01)  # refusals come at once: no spinning
                else:
                    with self._lock:
                        self.signed.append((sig.version, message, sig.signature))
        finally:
            client.close()

    def ok(self) -> int:
        with self._lock:
            return len(self.signed)

    def refusals(self, naming: str) -> int:
        with self._lock:
            return sum(1 for _, why, _ in self.refused if naming in why)

    def signing(self) -> bool:
        """Whether new signatures arrive (one per thread: not an answer from before)."""
        start = self.ok()
        return wait_until(lambda: self.ok() >= start + THREADS, WAIT)


def _health(address: str) -> str:
    try:
        return health_status(address)
    except Exception as exc:  # the health call itself failed
        return type(exc).__name__


def _start_again(sp: ServiceProcess) -> subprocess.Popen[bytes]:
    """``signer serve`` on ``sp``'s configuration (its store, audit log and token) again."""
    with open(sp.log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(SIGNER_BIN), "serve", "--config", str(sp.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    up = wait_until(lambda: _health(sp.address) == "SERVING" or proc.poll() is not None, 60)
    if not up or proc.poll() is not None:
        proc.kill()
        proc.wait()
        pytest.fail(f"the service did not start again:\n{sp.log()[-3000:]}")
    return proc


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SIGNER_BIN), *args], capture_output=True, text=True, timeout=120)


def _integrity(path: str) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def _sign_records(path: str, key: str) -> list[tuple[str, str]]:
    """(payload SHA-256, status) of every Sign record of ``key``."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        query = "SELECT payload_sha256, status FROM records WHERE operation = 'Sign' AND key = ?"
        return [(str(p), str(s)) for p, s in db.execute(query, (key,))]


def _paused(path: str) -> int:
    """How many calls the AuditPaused records count (refused before they ran)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        query = "SELECT COALESCE(SUM(version), 0) FROM records WHERE operation = 'AuditPaused'"
        return int(db.execute(query).fetchone()[0])


def _report(figures: dict[str, Any]) -> None:
    print(f"\nio-error figures: {json.dumps(figures)}")
    path = os.environ.get("SIGNER_IO_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(figures) + "\n")


def test_io_errors_fail_closed_lose_nothing_and_recover_by_itself(
    service_process_factory: Callable[..., ServiceProcess],
    own_host: TokenHostHandle,  # noqa: F811
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    svc = service_process_factory(
        token=own_host.token_config(),
        # Checkpoints come due during the faults too (their writes fail as well).
        audit={"checkpoint_every": 50, "checkpoint_interval_seconds": 1.0},
    )
    cfg = config_mod.load(svc.config_path)
    phases: dict[str, dict[str, Any]] = {}
    client = svc.client()
    key = "io-errors"
    client.create_key(key, "ec-p256")
    public = serialization.load_pem_public_key(client.public_key(key).pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    probes: list[bytes] = []  # the test's own calls answered UNAVAILABLE

    @contextlib.contextmanager
    def phase(name: str, database: str, syscalls: str) -> Iterator[Fault]:
        ok, refused = load.ok(), len(load.refused)
        with eio(svc.pid, _files(database), syscalls, tmp_path / f"{name}.strace") as fault:
            yield fault
            figures: dict[str, Any] = {"injected": fault.hits(), "syscalls": fault.calls()}
            detaching = time.monotonic()
        assert wait_until(lambda: _health(svc.address) == "SERVING", WAIT), name
        serving = time.monotonic()
        # From the detach asked for: the writer's retry may come before strace has left every
        # thread of the service.
        figures["detach_seconds"] = round(fault.detached - detaching, 2)
        figures["serving_after_seconds"] = round(serving - detaching, 2)
        assert load.signing(), f"{name}: no signature after strace was detached"
        figures["ok"] = load.ok() - ok
        figures["refused"] = len(load.refused) - refused
        phases[name] = figures

    def refused_now(call: Callable[[bytes], object], naming: str) -> None:
        message = f"probe {len(probes)}".encode()
        with pytest.raises(Unavailable, match=naming):
            call(message)
        probes.append(message)

    load = Load(svc.address, key)
    load.start()
    try:
        assert load.signing()
        for name, syscalls in (("audit_writes", f"{WRITES},{SYNCS}"), ("audit_fsyncs", SYNCS)):
            with phase(name, cfg.audit.path, syscalls) as fault:
                assert wait_until(lambda: fault.hits() > 0, WAIT), f"{name}: nothing injected"
                assert wait_until(lambda: _health(svc.address) == "NOT_SERVING", WAIT), name
                refused_now(lambda m: client.sign(key, message=m), "audit log cannot be written")
                # For a while: the writer's retries fail too, and nothing is served meanwhile.
                tried = fault.hits()
                assert wait_until(lambda: fault.hits() >= tried + 2, WAIT), name  # noqa: B023
                assert _health(svc.address) == "NOT_SERVING"
            assert load.refusals("audit log cannot be written") > 0

        for name, syscalls in (("store_writes", f"{WRITES},{SYNCS}"), ("store_fsyncs", SYNCS)):
            with phase(name, cfg.store.path, syscalls) as fault:
                with pytest.raises(Unavailable, match=r"the key store cannot be used \(disk I/O"):
                    client.create_key(f"never-stored-{name}", "ec-p256")
                assert fault.hits() > 0
                assert load.signing(), "signing only reads the store: it goes on"
                assert _health(svc.address) == "SERVING"
            client.create_key(f"stored-after-{name}", "ec-p256")
            assert client.sign(f"stored-after-{name}", message=b"after").version == 1

        with phase("store_reads", cfg.store.path, READS) as fault:
            refusal = ""
            try:
                # Its write goes through, and every other connection's cached pages are stale
                # then: their next read is the file's, and fails.
                client.create_key("made-while-reads-fail", "ec-p256")
            except Unavailable as exc:  # unless this connection's own pages were stale
                refusal = exc.message
            if refusal:
                assert refusal.startswith(READ_FAILED), refusal
            else:
                assert wait_until(lambda: load.refusals(READ_FAILED) > 0, WAIT)
            assert fault.hits() > 0
            assert _health(svc.address) == "SERVING"
        phases["store_reads"]["create_key_refused"] = bool(refusal)
        if refusal:
            client.create_key("made-while-reads-fail", "ec-p256")
        client.close()
    finally:
        load.stop()

    # Stopped while the databases' main files cannot be written: the checkpoint at close
    # fails, the WAL stays, and a service started on them again finds everything.
    with eio(
        svc.pid,
        [Path(cfg.audit.path).resolve(), Path(cfg.store.path).resolve()],
        f"{WRITES},{SYNCS}",
        tmp_path / "stop.strace",
    ) as fault:
        svc.proc.terminate()
        assert svc.proc.wait(timeout=60) == 0, svc.log()[-3000:]
        phases["stop_db_files"] = {"injected": fault.hits(), "syscalls": fault.calls()}
    assert Path(f"{cfg.audit.path}-wal").stat().st_size > 0
    again = _start_again(svc)
    try:
        with SignerClient(svc.address, timeout=WAIT) as c:
            assert c.sign(key, message=b"after a restart").version == 1
            assert c.sign("made-while-reads-fail", message=b"x").version == 1
    finally:
        again.terminate()
        assert again.wait(timeout=60) == 0

    log = svc.log()
    assert "Traceback" not in log
    assert '"INTERNAL"' not in log
    statuses = Counter(status for status, _, _ in load.refused)
    assert set(statuses) <= {"UNAVAILABLE"}, statuses
    unnamed = [why for _, why, _ in load.refused if not why.startswith(NAMED)]
    assert not unnamed, unnamed

    done = _cli("audit-log", "verify", "--config", str(svc.config_path))
    assert done.returncode == 0, done.stdout + done.stderr
    records = _sign_records(cfg.audit.path, key)
    by_payload: dict[str, list[str]] = {}
    for sha, status in records:
        by_payload.setdefault(sha, []).append(status)
    # Every signature received verifies and has exactly one record, saying OK.
    for _, message, signature in load.signed:
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        assert by_payload.get(_sha256(message)) == ["OK"], message
    # No call answered otherwise is on record as OK: nothing half-written, nothing claimed.
    refused_messages = [m for _, _, m in load.refused] + probes
    for message in refused_messages:
        for status in by_payload.get(_sha256(message), []):
            assert status != "OK", message
    # What ran while the log could not be written is on record, saying its caller was answered
    # UNAVAILABLE (and was); what was refused before it ran is counted in AuditPaused records.
    kept = [sha for sha, status in records if status == "OK" + NOT_ANSWERED]
    assert len(kept) >= 2, "each audit fault began with a commit that failed"
    assert set(kept) <= {_sha256(m) for m in refused_messages}
    assert _paused(cfg.audit.path) == sum(
        1 for _, why, _ in load.refused if why.endswith(PAUSED)
    ) + len(probes)
    assert _integrity(cfg.audit.path) == "ok"
    assert _integrity(cfg.store.path) == "ok"
    # A key whose store write failed with an I/O error keeps its token object (the write may
    # come back after a crash: Keyring._discard); without a crash it is an orphan, which
    # reconcile names and --repair removes.
    done = _cli("keys", "reconcile", "--config", str(svc.config_path), "--grace", "0")
    orphans = [ln for ln in done.stdout.splitlines() if ln.startswith("orphan")]
    assert all("never-stored-store_" in ln for ln in orphans), done.stdout + done.stderr
    assert done.returncode == (1 if orphans else 0), done.stdout + done.stderr
    if orphans:
        repair = ("keys", "reconcile", "--config", str(svc.config_path), "--grace", "0")
        done = _cli(*repair, "--repair")
        assert done.returncode == 0, done.stdout + done.stderr
        done = _cli(*repair)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "consistent: store and token agree" in done.stdout

    _report(
        {
            "test": "io_errors",
            "seconds": round(time.monotonic() - started, 1),
            "calls": len(load.signed) + len(load.refused),
            "ok": len(load.signed),
            "refused": dict(statuses),
            "refused_why": dict(Counter(why.split(")")[0] + ")" for _, why, _ in load.refused)),
            "records_checked": len(records),
            "kept_then_written": len(kept),
            "refused_before_running": _paused(cfg.audit.path),
            "phases": phases,
        }
    )


def test_a_crash_after_a_failed_fsync_brings_back_nothing_untrue(
    service_process_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """The audit log's fsync fails; the call waiting on that record is answered UNAVAILABLE;
    the service is then killed before the disk returns. SQLite rolled the COMMIT back, but its
    frames are whole in the WAL, and the recovery at the next open replays them: the record
    that comes back must say how its call was answered, not OK."""
    svc = service_process_factory()
    cfg = config_mod.load(svc.config_path)
    with svc.client() as c:
        c.create_key("crash-after-eio", "ec-p256")
        c.sign("crash-after-eio", message=b"before")
        with eio(svc.pid, _files(cfg.audit.path), SYNCS, tmp_path / "crash.strace") as fault:
            with pytest.raises(Unavailable, match=r"audit log cannot be written \(disk I/O"):
                c.sign("crash-after-eio", message=b"answered UNAVAILABLE")
            assert fault.calls() == ["fdatasync"]
            svc.proc.kill()
            svc.proc.wait(timeout=WAIT)
    done = _cli("audit-log", "verify", "--db", cfg.audit.path)
    assert done.returncode == 0, done.stdout + done.stderr
    statuses = dict(_sign_records(cfg.audit.path, "crash-after-eio"))
    assert statuses[_sha256(b"before")] == "OK"
    assert statuses.get(_sha256(b"answered UNAVAILABLE")) in (None, "OK" + NOT_ANSWERED)


def test_a_failing_audit_log_is_tried_again_every_second_not_in_a_loop(
    service_process_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    """The writer tries the kept records again every RETRY_SECONDS, also once a checkpoint is
    overdue: it used to try without pause then (9,000 attempts, each a log line, in 3 s)."""
    svc = service_process_factory(audit={"checkpoint_interval_seconds": 0.2})
    cfg = config_mod.load(svc.config_path)
    with svc.client() as c:
        c.create_key("retried", "ec-p256")
        c.sign("retried", message=b"before")
        with eio(svc.pid, _files(cfg.audit.path), f"{WRITES},{SYNCS}", tmp_path / "s") as fault:
            with pytest.raises(Unavailable, match=r"audit log cannot be written \(disk I/O"):
                c.sign("retried", message=b"kept")
            tried = fault.hits()  # the commit, and the rewrite of what it may have left
            since = time.monotonic()
            assert wait_until(lambda: fault.hits() >= tried + 2, WAIT)
            spent = time.monotonic() - since
        assert wait_until(lambda: _health(svc.address) == "SERVING", WAIT)
        c.sign("retried", message=b"after")
    assert spent >= RETRY_SECONDS, f"two attempts {spent:.3f} s apart"
    svc.stop()
    assert _sign_records(cfg.audit.path, "retried")[1:] == [
        (_sha256(b"kept"), "OK" + NOT_ANSWERED),
        (_sha256(b"after"), "OK"),
    ]


def test_a_crash_after_a_failed_store_fsync_leaves_store_and_token_agreeing(
    service_process_factory: Callable[..., ServiceProcess],
    own_host: TokenHostHandle,  # noqa: F811
    tmp_path: Path,
) -> None:
    svc = service_process_factory(token=own_host.token_config())
    cfg = config_mod.load(svc.config_path)
    with svc.client() as c:
        c.create_key("stored", "ec-p256")
        with eio(svc.pid, _files(cfg.store.path), SYNCS, tmp_path / "s") as fault:
            with pytest.raises(Unavailable, match=r"key store cannot be used \(disk I/O"):
                c.create_key("not-stored", "ec-p256")
            assert fault.calls() == ["fdatasync"]
        svc.proc.kill()  # before any other write to the store overwrites what it left
        svc.proc.wait(timeout=WAIT)
    done = _cli("keys", "reconcile", "--config", str(svc.config_path), "--grace", "0")
    assert "consistent: store and token agree" in done.stdout, done.stdout + done.stderr
