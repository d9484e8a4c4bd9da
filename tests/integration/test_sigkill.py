"""SIGKILL of the service, many times in a row, in the middle of heavy signing and of every
lifecycle change (issue 12: "nothing answered OK is lost").

After every kill, with the service dead, and before it is started again on the same store,
audit log and token:

* every answer a caller received OK has its audit record, matched by what a record carries
  (operation, key, version, SHA-256 of the payload; a SignBatch's is that of its items'
  digests), and every signature received verifies with its version's public key;
* the audit log verifies: chain, signed checkpoints, the witness file;
* store and token agree, or ``signer keys reconcile`` names what the kill left (an object
  generated in the token whose row never committed: the only kind a kill may leave here) and
  ``--repair`` removes it, after which they agree;
* the service starts again and serves (its audit log vouched for at start).

The moments. Heavy signing (Sign from three threads on an EC and an RSA key, SignBatch of 60
items, across a chunk boundary, and a thread rotating, disabling, enabling and scheduling the
versions of a third key) is killed after a random delay. Each lifecycle change is held in its
middle by something real, not by a hook in the service:

* the token host frozen (SIGSTOP to its process group): the service waits inside its token call
  (a generation, an unwrap's search) when it is killed; the host, thawed, finishes the call for
  nobody, which leaves a generated key pair behind;
* the key store locked (an EXCLUSIVE transaction of the test's; readers go on in WAL mode): the
  token's work is done and the change's store write waits (its 5 s busy timeout) when it is
  killed;
* the audit log locked the same way: the change is committed, its record waits when it is
  killed (the caller never hears OK: such a change is in the store and not in the log).

And the service's own changes: the audit key's generation (the log's first checkpoint, the
token host frozen), and the reaper's destruction of a version whose time has come (the object
destroyed, the store locked): reconcile finds the half-done destruction and records it. A kill
inside the log's first checkpoint (after its key is pinned, before the checkpoint is stored with
the key) leaves a log whose first checkpoint never completed: it verifies, and the next start
adopts the pinned key.

The token host is the test's own: it is frozen, and reconcile needs a token no other test's
store shares. ``SIGNER_SIGKILL_CYCLES`` (default 10) sets the heavy-signing cycles (``make soak``
runs more), ``SIGNER_SIGKILL_SEED`` the kill moments, ``SIGNER_SIGKILL_FIGURES`` a JSON file the
figures are added to (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signer._internal import config as config_mod
from signer._internal.audit import read_witness, verify_log
from signer._internal.front import ISSUER_HEADER, SERIAL_HEADER, SUBJECT_HEADER
from signer._internal.policy import grant_everything
from signer._internal.reconcile import (
    AUDIT_KEY_LABEL,
    ORPHAN,
    WRAPPING_KEY_LABEL,
    Report,
    audit_key_reader,
    reconcile,
)
from signer._internal.store import SQLiteStore
from signer._internal.token import Pin, Token
from signer.client import SignerClient, build_import_request
from signer.errors import SignerError, Unavailable
from signer.keys import Padding, SigFormat, algorithm, verify
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc
from tests.conftest import (
    SIGNER_BIN,
    ServiceProcess,
    ServiceProcessFactory,
    TokenHostHandle,
    health_status,
    socket_address,
    wait_until,
)
from tests.integration.own_host import freeze, frozen, own_host, thaw  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CYCLES = int(os.environ.get("SIGNER_SIGKILL_CYCLES", "10"))
SEED = int(os.environ.get("SIGNER_SIGKILL_SEED", str(random.SystemRandom().randrange(2**32))))
# How long a change is given to reach the point where it waits (a token call, a store write)
# before the kill: what precedes it is a few store reads.
HOLD_SECONDS = 1.0
ME = f"uid:{os.getuid()}"

# operation, key, version, payload SHA-256 (hex, or ""): what an audit record shows of a call.
Answer = tuple[str, str, int, str]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if data else ""


class Ledger:
    """Every answer a caller received OK, as its audit record must show it, and every signature
    received, to be verified with its version's public key."""

    def __init__(self) -> None:
        self.answers: Counter[Answer] = Counter()
        self.signatures: list[tuple[str, int, bytes, bytes]] = []  # key, version, message, sig
        self.verified = 0
        self._lock = threading.Lock()

    def ok(self, op: str, key: str, version: int, payload: bytes = b"") -> None:
        with self._lock:
            self.answers[(op, key, version, _sha256(payload))] += 1

    def signed(self, key: str, version: int, messages: list[bytes], sigs: list[bytes]) -> None:
        with self._lock:
            if len(messages) == 1:
                self.answers[("Sign", key, version, _sha256(messages[0]))] += 1
            else:
                items = b"".join(hashlib.sha256(m).digest() for m in messages)
                self.answers[("SignBatch", key, version, _sha256(items))] += 1
            self.signatures += [(key, version, m, s) for m, s in zip(messages, sigs, strict=True)]


@dataclass
class Deployment:
    """One service configuration (store, audit log, witness, token), killed and started again
    and again, with what its callers were answered."""

    first: ServiceProcess
    host: TokenHostHandle
    watcher: Token  # the test's own connection to the token
    procs: list[ServiceProcess]
    ledger: Ledger = field(default_factory=Ledger)
    figures: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.cfg = config_mod.load(self.first.config_path)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[-1].proc

    def client(self) -> SignerClient:
        return SignerClient(self.first.address, timeout=60)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.figures["kills"] += 1

    def restart(self) -> None:
        assert self.start_again(), f"not serving after a kill:\n{self.log_tail()}"

    def start_again(self, timeout: float = 60) -> bool:
        """Starts the service again on the same state; whether it serves."""
        with open(self.first.log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(SIGNER_BIN), "serve", "--config", str(self.first.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(
            ServiceProcess(proc, self.first.address, self.first.config_path, self.first.log_path)
        )
        wait_until(lambda: serving(self.first.address) or proc.poll() is not None, timeout)
        return proc.poll() is None and serving(self.first.address)

    def host_connections(self) -> list[int]:
        """The token host's p11-kit-remote processes: one per connection."""
        server = self.host.host.pid
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == server and fields[0] != "Z":
                found.append(int(stat.parent.name))
        return found

    def log_tail(self) -> str:
        return "\n".join(self.first.log().splitlines()[-30:])

    def labels(self) -> list[str]:
        """Labels of the token's objects; none while the watcher's connection reports the
        host stalled (it was frozen a moment ago)."""
        try:
            return [o.label for o in self.watcher.objects()]
        except Unavailable:
            return []

    def store_db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.cfg.store.path}?mode=ro", uri=True)

    def reconcile(self, repair: bool = False) -> Report:
        store = SQLiteStore(self.cfg.store.path)
        try:
            audit = audit_key_reader(self.cfg.audit.path, self.cfg.audit.pinned_key)
            return reconcile(store, self.watcher, audit, repair=repair, grace=0)
        finally:
            store.close()

    def check(self, orphans: frozenset[str] = frozenset()) -> None:
        """What must hold after a kill, the service dead; ``orphans``: labels of objects the
        kill must have left (reconcile must name them, and removes them)."""
        assert self.proc.poll() is not None
        # The token host finishes what the dead service had asked of it (a generation: an
        # orphan in the making) before its p11-kit-remote for that connection goes; only the
        # watcher's is left then.
        assert wait_until(lambda: len(self.host_connections()) <= 1, 60), self.host_connections()
        self._check_records()
        self._check_log()
        self._check_signatures()
        report = self.reconcile()
        found = [f for f in report.findings if f.kind != "unmanaged"]
        assert all(f.repairable for f in found), report.table()
        assert orphans <= {f.what for f in found if f.kind == ORPHAN}, report.table()
        if found:
            self.figures["reconcile_found"] += len(found)
            for f in found:
                self.figures[f"found_{f.kind}"] += 1
            repaired = self.reconcile(repair=True)
            assert all(f.repaired for f in repaired.findings if f.kind != "unmanaged"), (
                repaired.table()
            )
            self.figures["reconcile_repaired"] += len([f for f in repaired.findings if f.repaired])
            report = self.reconcile()
        assert report.consistent, report.table()
        self.figures["reconciled"] += 1

    def _check_records(self) -> None:
        with sqlite3.connect(f"file:{self.cfg.audit.path}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT operation, key, version, payload_sha256 FROM records "
                "WHERE status IN ('OK', 'OK (caller gone)')"
            ).fetchall()
        recorded: Counter[Answer] = Counter((op, k, v, p) for op, k, v, p in rows)
        missing = self.ledger.answers - recorded
        assert not missing, f"answered OK but not on record: {sorted(missing.items())[:10]}"
        self.figures["ok_answers_matched"] = sum(self.ledger.answers.values())
        self.figures["records"] = len(rows)

    def _check_log(self) -> None:
        pinned = self.cfg.audit.pinned_key
        witness = Path(self.cfg.audit.witness_file)
        verdict = verify_log(
            self.cfg.audit.path,
            pinned.read_bytes() if pinned.exists() else None,
            max_unsigned_records=self.cfg.audit.max_unsigned_records,
            witnesses=[witness] if witness.exists() else [],
        )
        assert verdict.whole, f"the audit log does not verify: {verdict.first_bad}"
        self.figures["log_verified"] += 1

    def _check_signatures(self) -> None:
        todo = self.ledger.signatures[self.ledger.verified :]
        with self.store_db() as db:
            for key, version, message, signature in todo:
                alg, public = db.execute(
                    "SELECT algorithm, public_key FROM versions WHERE name = ? AND version = ?",
                    (key, version),
                ).fetchone()
                ok = verify(
                    public, algorithm(alg), signature, message, None, Padding.PSS, SigFormat.DER
                )
                assert ok, f"a signature of {key}/{version} does not verify"
        self.ledger.verified += len(todo)

    def finish(self, tmp_path: Path) -> None:
        """Stopped gracefully at last: the commands agree with what was checked in-process."""
        self.proc.terminate()
        assert self.proc.wait(timeout=60) == 0, self.log_tail()
        self._check_records()
        done = subprocess.run(
            [str(SIGNER_BIN), "audit-log", "verify", "--config", str(self.first.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "agree" in done.stdout  # the witness file's checkpoints
        done = subprocess.run(
            [
                str(SIGNER_BIN),
                "keys",
                "reconcile",
                "--config",
                str(self.first.config_path),
                "--grace",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "consistent: store and token agree" in done.stdout


def serving(address: str) -> bool:
    try:
        return health_status(address) == "SERVING"
    except grpc.RpcError:
        return False


@pytest.fixture
def deploy(
    own_host: TokenHostHandle,  # noqa: F811
    service_process_factory: ServiceProcessFactory,
    tmp_path: Path,
) -> Iterator[Callable[..., Deployment]]:
    made: list[Deployment] = []
    # The test's own view of the token: no health checks (each one rereads every object of a
    # token the service keeps changing: its p11-kit-remote took half a core, and a check slow
    # enough to count as a stalled token).
    quiet = own_host.token_config(
        sessions=1, lanes=1, health_interval_seconds=3600.0, stall_seconds=3600.0
    )
    watcher = Token(quiet, Pin(own_host.paths.user_pin))
    watcher.start(wait=True)

    def make(callers: tuple[str, ...] = (), **sections: dict[str, Any]) -> Deployment:
        policy = tmp_path / "policy.toml"
        policy.write_text(grant_everything([ME, *callers]))
        server: dict[str, Any] = {"policy_file": str(policy), "grace_seconds": 5.0}
        if callers:
            server["front_socket"] = socket_address().removeprefix("unix:")
        witness = tmp_path / f"witness-{len(made)}.jsonl"  # a log's own: a witness is per log
        audit = {"checkpoint_every": 50, "witness_file": str(witness)}
        sp = service_process_factory(
            # Health checks far apart: one sent while the host is frozen reaches it before the
            # change's call on the same connection, and the host, thawed, answers it to a dead
            # service and goes, without making the change's key (seen under load).
            token=own_host.token_config(health_interval_seconds=30.0),
            server=server,
            audit={**audit, **sections.get("audit", {})},
            keys=sections.get("keys", {}),
        )
        made.append(Deployment(sp, own_host, watcher, [sp]))
        return made[-1]

    try:
        yield make
    finally:
        for dep in made:
            for sp in dep.procs[1:]:
                if sp.proc.poll() is None:
                    sp.proc.kill()
                    sp.proc.wait()
        watcher.close()


def report_figures(name: str, figures: Counter[str], started: float) -> None:
    out = {
        "test": name,
        "seed": SEED,
        "seconds": round(time.monotonic() - started, 1),
        **dict(sorted(figures.items())),
    }
    print(f"\nsigkill figures: {json.dumps(out)}")
    path = os.environ.get("SIGNER_SIGKILL_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(out) + "\n")


# --- heavy signing ----------------------------------------------------------------------------


class Load:
    """Callers signing as fast as they can, and one changing another key's versions, until
    the service is gone. Any error but UNAVAILABLE after the kill is kept, to fail on."""

    def __init__(self, dep: Deployment, seed: int) -> None:
        self.dep = dep
        self.client = dep.client()
        self.stop = threading.Event()
        self.killing = threading.Event()  # set just before the kill: UNAVAILABLE expected since
        self.unexpected: list[str] = []
        self.threads = [
            threading.Thread(target=self._guarded, args=(fn, random.Random(seed + i)))
            for i, fn in enumerate([self._sign, self._sign, self._sign, self._batch, self._churn])
        ]
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
            assert not t.is_alive()
        self.client.close()

    def _guarded(self, fn: Callable[[random.Random], None], rng: random.Random) -> None:
        try:
            while not self.stop.is_set():
                fn(rng)
        except Unavailable as exc:
            if not self.killing.is_set():  # before the kill, the service had no reason to
                self.unexpected.append(f"before the kill: {exc.message}")
        except SignerError as exc:
            self.unexpected.append(f"{type(exc).__name__}: {exc.message}")

    def _sign(self, rng: random.Random) -> None:
        name = "sig-rsa" if rng.random() < 0.2 else "sig-ec"
        message = rng.randbytes(32)
        sig = self.client.sign(name, message=message)
        self.dep.ledger.signed(name, sig.version, [message], [sig.signature])

    def _batch(self, rng: random.Random) -> None:
        name = "sig-rsa" if rng.random() < 0.2 else "sig-ec"
        messages = [rng.randbytes(32) for _ in range(60)]
        results = self.client.sign_batch(name, messages=messages)
        sigs = [r for r in results if not isinstance(r, SignerError)]
        if len(sigs) != len(results):
            self.unexpected.append(f"batch items failed: {[r for r in results if r not in sigs]}")
            return
        self.dep.ledger.signed(name, sigs[0].version, messages, [s.signature for s in sigs])

    def _churn(self, rng: random.Random) -> None:
        c, ledger = self.client, self.dep.ledger
        key = c.rotate("churn")
        ledger.ok("RotateKey", "churn", key.primary_version)
        older = [v for v in key.versions if v.version != key.primary_version]
        v = rng.choice(older)
        if v.state == pb.DESTRUCTION_SCHEDULED:
            op, done = "CancelKeyVersionDestruction", c.cancel_destruction("churn", v.version)
        elif rng.random() < 0.3:
            op, done = "ScheduleKeyVersionDestruction", c.schedule_destruction("churn", v.version)
        elif v.state == pb.ENABLED:
            op, done = "DisableKeyVersion", c.disable("churn", v.version)
        else:
            op, done = "EnableKeyVersion", c.enable("churn", v.version)
        ledger.ok(op, "churn", done.version)


def kill_delay(rng: random.Random) -> float:
    """At once, early, or well into the load."""
    return rng.choice([rng.uniform(0.0, 0.1), rng.uniform(0.1, 0.8), rng.uniform(0.8, 2.0)])


def test_sigkill_under_heavy_signing_loses_nothing_answered_ok(
    deploy: Callable[..., Deployment], tmp_path: Path
) -> None:
    started = time.monotonic()
    print(f"seed {SEED}")
    dep = deploy()
    with dep.client() as c:
        for name, alg in (("sig-ec", "ec-p256"), ("sig-rsa", "rsa-2048"), ("churn", "ec-p256")):
            dep.ledger.ok("CreateKey", name, c.create_key(name, alg).primary_version)
    rng = random.Random(SEED)
    for cycle in range(CYCLES):
        load = Load(dep, SEED + 100 * cycle)
        time.sleep(kill_delay(rng))
        load.killing.set()
        dep.kill()
        load.join()
        assert not load.unexpected, load.unexpected
        dep.check()
        dep.restart()
    with dep.client() as c:  # still signing after all that
        message = b"after %d kills" % CYCLES
        sig = c.sign("sig-ec", message=message)
        dep.ledger.signed("sig-ec", sig.version, [message], [sig.signature])
    dep.finish(tmp_path)
    dep._check_signatures()
    dep.figures["cycles"] = CYCLES
    dep.figures["signatures_received"] = len(dep.ledger.signatures)
    dep.figures["signatures_verified"] = dep.ledger.verified
    report_figures("heavy signing", dep.figures, started)
    assert dep.ledger.verified > 0


# --- lifecycle changes ------------------------------------------------------------------------


@dataclass
class Change:
    """A lifecycle change: ``call`` makes it (and records its OK answer in the ledger);
    ``done`` says whether the store shows it; ``makes``: the label of the object it generates
    in the token (None: it changes the store only)."""

    op: str
    call: Callable[[], object]
    done: Callable[[sqlite3.Connection], bool]
    makes: str | None = None


def _state(db: sqlite3.Connection, name: str, version: int) -> str:
    row = db.execute(
        "SELECT state FROM versions WHERE name = ? AND version = ?", (name, version)
    ).fetchone()
    return str(row[0]) if row else ""


def _versions(db: sqlite3.Connection, name: str) -> int:
    return int(db.execute("SELECT count(*) FROM versions WHERE name = ?", (name,)).fetchone()[0])


def _front_caller(subject: str) -> tuple[tuple[str, str], ...]:
    """The headers the mTLS front sets for a verified certificate: a caller of its own."""
    return ((SUBJECT_HEADER, subject), (ISSUER_HEADER, "CN=sigkill-ca"), (SERIAL_HEADER, "01"))


def changes(dep: Deployment, c: SignerClient, round_: str, import_params: Any) -> list[Change]:
    """Every lifecycle change, on keys set up for it (see the test)."""
    ledger = dep.ledger
    with dep.store_db() as db:
        rotated = _versions(db, "lc-rot") + 1

    def create() -> None:
        key = c.create_key(f"lc-new-{round_}", "ec-p256")
        ledger.ok("CreateKey", key.name, key.primary_version)

    def rotate() -> None:
        ledger.ok("RotateKey", "lc-rot", c.rotate("lc-rot").primary_version)

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    request = build_import_request(f"lc-imp-{round_}", "ec-p256", pem, import_params)

    def import_() -> None:
        key = c.import_key_version(request)
        ledger.ok("ImportKeyVersion", key.name, key.primary_version, request.wrapped_key)

    def import_parameters() -> None:
        # A caller of its own per round: a caller holding an unused import token is given it
        # again, and nothing is generated.
        front = dep.cfg.server.front_socket
        with grpc.insecure_channel(f"unix:{front}") as channel:
            try:
                pb_grpc.SignerServiceStub(channel).GetImportParameters(
                    pb.GetImportParametersRequest(),
                    metadata=_front_caller(f"CN=params-{round_}"),
                    timeout=60,
                )
            except grpc.RpcError as exc:
                raise SignerError(f"{exc.code().name}: {exc.details()}") from None
        ledger.ok("GetImportParameters", "", 0)

    def version_op(op: str, fn: Callable[[str, int], Any], name: str) -> Change:
        def call() -> None:
            ledger.ok(op, name, fn(name, 1).version)

        after = {
            "lc-dis": "disabled",
            "lc-ena": "enabled",
            "lc-sch": "destruction_scheduled",
            "lc-can": "disabled",
        }[name]
        return Change(op, call, lambda db: _state(db, name, 1) == after)

    def set_primary() -> None:
        ledger.ok("SetPrimaryVersion", "lc-pri", c.set_primary("lc-pri", 1).primary_version)

    def primary(db: sqlite3.Connection) -> bool:
        row = db.execute("SELECT primary_version FROM keys WHERE name = 'lc-pri'").fetchone()
        return bool(row[0] == 1)

    new_token = f"x509:CN=params-{round_}"
    return [
        Change(
            "CreateKey",
            create,
            lambda db: _versions(db, f"lc-new-{round_}") == 1,
            f"lc-new-{round_}/v1",
        ),
        Change(
            "RotateKey", rotate, lambda db: _versions(db, "lc-rot") == rotated, f"lc-rot/v{rotated}"
        ),
        Change(
            "GetImportParameters",
            import_parameters,
            lambda db: bool(
                db.execute(
                    "SELECT 1 FROM import_tokens WHERE caller LIKE ?", (new_token + "%",)
                ).fetchone()
            ),
            WRAPPING_KEY_LABEL,
        ),
        Change(
            "ImportKeyVersion",
            import_,
            lambda db: _versions(db, f"lc-imp-{round_}") == 1,
            f"lc-imp-{round_}/v1",
        ),
        version_op("DisableKeyVersion", c.disable, "lc-dis"),
        version_op("EnableKeyVersion", c.enable, "lc-ena"),
        version_op("ScheduleKeyVersionDestruction", c.schedule_destruction, "lc-sch"),
        version_op("CancelKeyVersionDestruction", c.cancel_destruction, "lc-can"),
        Change("SetPrimaryVersion", set_primary, primary),
    ]


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """An EXCLUSIVE transaction on an SQLite file: its writers wait (their busy timeout), its
    readers go on (WAL)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


def killed_during(
    dep: Deployment, pool: ThreadPoolExecutor, todo: list[Change], reached: Callable[[], bool]
) -> None:
    """Starts ``todo``, kills the service once ``reached()``, and checks that none of them was
    answered OK."""
    futures: list[Future[object]] = [pool.submit(ch.call) for ch in todo]
    assert wait_until(reached, 90, 0.02), f"{[ch.op for ch in todo]} never got there"
    dep.kill()
    for ch, fut in zip(todo, futures, strict=True):
        with pytest.raises(SignerError):  # never answered OK: the service died first
            fut.result(timeout=60)
        dep.figures[f"killed_in_{ch.op}"] += 1


def held() -> bool:
    """For changes that wait where nothing can be watched (a store write): time to get there."""
    time.sleep(HOLD_SECONDS)
    return True


def stored_checkpoint(dep: Deployment) -> int:
    """The newest checkpoint in the audit log (0: none)."""
    with sqlite3.connect(f"file:{dep.cfg.audit.path}?mode=ro", uri=True) as db:
        (seq,) = db.execute("SELECT max(seq) FROM checkpoints").fetchone()
    return int(seq or 0)


def witnessed(dep: Deployment) -> int:
    """The newest checkpoint in the witness file (0: none)."""
    path = Path(dep.cfg.audit.witness_file)
    return max((c.seq for _, c in read_witness(path)), default=0) if path.exists() else 0


def wrapping_keys(dep: Deployment) -> int:
    return dep.labels().count(WRAPPING_KEY_LABEL)


def test_sigkill_in_the_middle_of_every_lifecycle_change(
    deploy: Callable[..., Deployment],
    own_host: TokenHostHandle,  # noqa: F811
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    print(f"seed {SEED}")
    rounds = ("frozen", "store", "audit")
    dep = deploy(
        tuple(f"x509:CN=params-{r}" for r in rounds),
        # A checkpoint after every record: the first one generates the audit key.
        audit={"checkpoint_every": 1},
        # The reaper looks every half second, and a destruction may be a second away.
        keys={"min_destruction_waiting_period_seconds": 1, "reaper_interval_seconds": 0.5},
    )
    ledger = dep.ledger
    c = dep.client()

    # 0. The audit key's generation (the log's first checkpoint), the token host frozen.
    with frozen(own_host):
        ledger.ok("ListKeys", "", 0)
        assert not c.list_keys().keys  # recorded: then the checkpoint waits for its key
        time.sleep(HOLD_SECONDS)
        dep.kill()
    assert wait_until(lambda: AUDIT_KEY_LABEL in dep.labels(), 30)
    dep.check(frozenset({AUDIT_KEY_LABEL}))
    dep.restart()

    # 0b. A checkpoint signed and witnessed, its store write waiting: the token host frozen
    # while the checkpoint is signed, the audit log locked before it is stored.
    ledger.ok("ListKeys", "", 0)
    c.list_keys()  # the audit key made and the first checkpoint stored this time
    assert wait_until(lambda: stored_checkpoint(dep) > 0, 30)
    before = witnessed(dep)
    try:
        freeze(own_host)
        ledger.ok("ListKeys", "", 0)
        c.list_keys()  # recorded; its checkpoint waits for its signature
        with locked(dep.cfg.audit.path):
            thaw(own_host)
            assert wait_until(lambda: witnessed(dep) > before, 30)
            dep.kill()
    finally:
        thaw(own_host)
    assert witnessed(dep) > stored_checkpoint(dep), "the kill came after the checkpoint was stored"
    dep.figures["killed_between_witness_and_log"] += 1
    dep.check()  # the witness's checkpoint is borne out by the records
    dep.restart()  # and the service vouches for the log at start

    for name in ("lc-rot", "lc-dis", "lc-ena", "lc-sch", "lc-can", "lc-pri", "lc-reap"):
        ledger.ok("CreateKey", name, c.create_key(name, "ec-p256").primary_version)
        if name != "lc-rot":
            ledger.ok("RotateKey", name, c.rotate(name).primary_version)  # version 1 not primary
    ledger.ok("DisableKeyVersion", "lc-ena", c.disable("lc-ena", 1).version)
    ledger.ok(
        "ScheduleKeyVersionDestruction", "lc-can", c.schedule_destruction("lc-can", 1).version
    )
    # One import token, for every round's import: none of them uses it up until the last.
    params = c.get_import_parameters()
    ledger.ok("GetImportParameters", "", 0)
    pool = ThreadPoolExecutor(max_workers=9)

    # 1. The token host frozen: each change that calls the token, alone (one connection's calls
    # reach the host one at a time), killed while it waits inside that call.
    for ch in changes(dep, c, "frozen", params)[:4]:
        before = wrapping_keys(dep)
        with frozen(own_host):
            fut = pool.submit(ch.call)
            time.sleep(HOLD_SECONDS)
            dep.kill()
        with pytest.raises(SignerError):
            fut.result(timeout=60)
        dep.figures[f"killed_in_{ch.op}"] += 1
        if ch.op == "GetImportParameters":  # the thawed host finishes the generation

            def generated(before: int = before) -> bool:
                return wrapping_keys(dep) > before

            assert wait_until(generated, 90)
            dep.check(frozenset({WRAPPING_KEY_LABEL}))
        elif ch.op == "ImportKeyVersion":  # it was looking for the wrapping key: nothing made
            dep.check()
        else:

            def made(ch: Change = ch) -> bool:
                return ch.makes in dep.labels()

            assert wait_until(made, 30)
            dep.check(frozenset({str(ch.makes)}))
        with dep.store_db() as db:
            assert not ch.done(db), f"{ch.op} was made while the token host was frozen"
        dep.restart()

    # 2. The key store locked: the token's work done, the store write waiting.
    todo = changes(dep, c, "store", params)
    before = wrapping_keys(dep)
    with locked(dep.cfg.store.path):  # the wrapping key first: its generation is the slow one
        killed_during(dep, pool, [todo[2]], lambda: wrapping_keys(dep) > before)
    dep.check(frozenset({WRAPPING_KEY_LABEL}))
    dep.restart()
    with locked(dep.cfg.store.path):
        token_changes = [todo[0], todo[1], todo[3]]
        killed_during(
            dep, pool, token_changes, lambda: all(ch.makes in dep.labels() for ch in token_changes)
        )
    dep.check(frozenset(str(ch.makes) for ch in token_changes))
    dep.restart()
    with locked(dep.cfg.store.path):
        killed_during(dep, pool, todo[4:], held)
    dep.check()
    with dep.store_db() as db:
        assert not [ch.op for ch in todo if ch.done(db)], "made while the store was locked"
    dep.restart()

    # 3. The audit log locked: every change committed, each one's record waiting.
    todo = changes(dep, c, "audit", params)
    with locked(dep.cfg.audit.path):

        def committed() -> bool:
            with dep.store_db() as db:
                return all(ch.done(db) for ch in todo)

        killed_during(dep, pool, todo, committed)
    dep.figures["changes_committed_unrecorded"] = len(todo)
    dep.check()
    dep.restart()

    # 4. The reaper's destruction of a version whose time has come: the object destroyed, the
    # store write waiting.
    ledger.ok(
        "ScheduleKeyVersionDestruction", "lc-reap", c.schedule_destruction("lc-reap", 1, 1).version
    )
    with dep.store_db() as db:
        (key_id,) = db.execute(
            "SELECT key_id FROM versions WHERE name = 'lc-reap' AND version = 1"
        ).fetchone()
    with locked(dep.cfg.store.path):
        assert wait_until(lambda: not dep.watcher.exists(key_id), 30)
        dep.kill()
    unfinished = dep.figures["found_unfinished"]
    dep.check()
    assert dep.figures["found_unfinished"] == unfinished + 1
    with dep.store_db() as db:
        assert _state(db, "lc-reap", 1) == "destroyed"
    dep.figures["killed_in_reaper_destruction"] += 1
    dep.restart()

    with dep.client() as after:  # the imported key signs; so does a created one
        for name in ("lc-imp-audit", "lc-new-audit"):
            message = name.encode()
            sig = after.sign(name, message=message)
            ledger.signed(name, sig.version, [message], [sig.signature])
    c.close()
    pool.shutdown()
    dep.finish(tmp_path)
    dep._check_signatures()
    report_figures("lifecycle", dep.figures, started)


# --- the audit log's first checkpoint ---------------------------------------------------------


def test_a_kill_inside_the_logs_first_checkpoint_leaves_a_log_that_verifies(
    deploy: Callable[..., Deployment],
) -> None:
    """The first checkpoint makes the audit key: generated in the token, pinned (written whole,
    synced), then the checkpoint signed, witnessed, and stored with the key in one transaction.
    The service is killed the moment the pin appears (tried again if the kill came too late):
    the log verifies (its first checkpoint never completed), and the next start adopts the
    pinned key (its checkpoints are signed with it; the pin is left as it was)."""
    for _ in range(5):
        dep = deploy(audit={"checkpoint_every": 1})
        pin = dep.cfg.audit.pinned_key
        client = dep.client()

        def call(client: SignerClient) -> None:
            with contextlib.suppress(SignerError):
                client.list_keys()  # its record's checkpoint is the log's first

        threading.Thread(target=call, args=(client,), daemon=True).start()
        deadline = time.monotonic() + 30
        while not pin.exists() and time.monotonic() < deadline:
            pass
        dep.kill()
        client.close()
        if not stored_checkpoint(dep):
            break
    assert pin.exists()
    assert not stored_checkpoint(dep), "every kill came after the first checkpoint was stored"
    pem = pin.read_bytes()
    witness = Path(dep.cfg.audit.witness_file)

    def verdict() -> tuple[int, str] | None:
        return verify_log(
            dep.cfg.audit.path,
            pin.read_bytes(),
            max_unsigned_records=dep.cfg.audit.max_unsigned_records,
            witnesses=[witness] if witness.exists() else [],
        ).first_bad

    assert verdict() is None
    dep.restart()  # the service vouches for this log at start, and serves
    with dep.client() as after:
        after.list_keys()  # its record's checkpoint: the first stored, with the pinned key
    assert wait_until(lambda: stored_checkpoint(dep) > 0, 30), dep.log_tail()
    assert pin.read_bytes() == pem
    assert verdict() is None
