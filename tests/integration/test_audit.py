"""The audit log of a real service: what it records, that it verifies, that it fails closed,
and that its checkpoints are signed by a key in the token."""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, ObjectClass

from signer._internal.audit import Event, record_hash
from signer._internal.audit._log import NOT_ANSWERED
from signer._internal.store import SQLiteStore
from signer.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable
from signer.keys import SignMechanism, State
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc
from tests.conftest import (
    SIGNER_BIN,
    RunningService,
    ServiceFactory,
    UniqueName,
    health_status,
    log_lines,
    wait_until,
    write_toml,
)

pytestmark = pytest.mark.integration
CALLER = f"uid:{os.getuid()}({pwd.getpwuid(os.getuid()).pw_name})"


@pytest.fixture
def captured_lines() -> Iterator[list[str]]:
    with log_lines("signer") as lines:
        yield lines


def records(path: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT seq, caller, operation, key, version, payload_sha256, status FROM records "
            "ORDER BY seq"
        ).fetchall()


def verify_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SIGNER_BIN), "audit-log", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_call_is_recorded_without_its_payload(
    service_factory: ServiceFactory, unique_name: UniqueName, tmp_path: Path
) -> None:
    policy = tmp_path / "one-scope.toml"
    policy.write_text(
        f'[[grant]]\ncallers = ["uid:{os.getuid()}"]\noperations = ["*"]\nscopes = ["mine"]\n'
    )
    svc = service_factory(server={"policy_file": str(policy)})
    c = svc.client()
    name = unique_name()
    message = os.urandom(48)
    c.create_key(name, "ec-p256", scope="mine")
    sig = c.sign(name, message=message)
    assert c.verify(name, sig.signature, message=message)
    other = unique_name()
    with pytest.raises(PermissionDenied):
        c.create_key(other, "ec-p256", scope="theirs")
    svc.stop()  # a last checkpoint

    digest = hashlib.sha256(message).hexdigest()
    rows = records(svc.server.cfg.audit.path)
    assert [r[2:] for r in rows] == [
        ("CreateKey", name, 1, "", "OK"),
        ("Sign", name, 1, digest, "OK"),
        ("Verify", name, 1, digest, "OK"),
        ("CreateKey", other, 0, "", "PERMISSION_DENIED"),
    ]
    assert {r[1] for r in rows} == {CALLER}
    assert message not in Path(svc.server.cfg.audit.path).read_bytes()


def signed_and_stopped(svc: RunningService, name: str, signatures: int) -> str:
    """The audit log of a service that created ``name``, signed ``signatures`` times with it
    and was stopped (so its last checkpoint is written): its path."""
    c = svc.client()
    c.create_key(name, "ec-p256")
    for i in range(signatures):
        c.sign(name, message=f"m{i}".encode())
    svc.stop()
    return str(svc.server.cfg.audit.path)


def test_a_real_log_verifies_and_a_tampered_one_is_named(
    service_factory: ServiceFactory, unique_name: UniqueName
) -> None:
    path = signed_and_stopped(service_factory(audit={"checkpoint_every": 5}), unique_name(), 12)
    done = verify_cli("--db", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is whole: 13 records, 3 signed checkpoints, signed up to record 13" in done.stdout

    with sqlite3.connect(path) as db:
        db.execute("UPDATE records SET key = 'someone-else' WHERE seq = 7")
    done = verify_cli("--db", path)
    assert done.returncode == 1
    assert "first bad record 7: its contents do not match its hash (modified)" in done.stdout


def test_checkpoints_are_signed_by_a_key_in_the_token(
    service_factory: ServiceFactory, own_session: pkcs11.Session
) -> None:
    svc = service_factory(audit={"checkpoint_every": 1})
    svc.client().list_keys()
    svc.stop()
    with sqlite3.connect(svc.server.cfg.audit.path) as db:
        (key_id,) = db.execute("SELECT key_id FROM audit_key").fetchone()
    (key,) = own_session.get_objects(
        {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}
    )
    assert key[Attribute.SENSITIVE]
    assert not key[Attribute.EXTRACTABLE]
    assert key[Attribute.LABEL] == "signer-audit-key"
    assert (
        Path(f"{svc.server.cfg.audit.path}.key.pem")
        .read_bytes()
        .startswith(b"-----BEGIN PUBLIC KEY-----")
    )


def test_no_signature_leaves_while_the_log_cannot_be_written(
    service_factory: ServiceFactory, unique_name: UniqueName
) -> None:
    svc = service_factory()
    c = svc.client()
    name = unique_name()
    c.create_key(name, "ec-p256")
    blocker = sqlite3.connect(svc.server.cfg.audit.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # what a full disk or a dead volume looks like to SQLite
    try:
        with pytest.raises(Unavailable, match="the audit log cannot be written"):
            c.sign(name, message=b"not without a record")
        # New calls are refused before they run while it lasts; health says so.
        assert wait_until(lambda: health_status(svc.address) == "NOT_SERVING", 10)
        with pytest.raises(Unavailable, match="calls are refused until it can"):
            c.sign(name, message=b"not even started")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert wait_until(lambda: health_status(svc.address) == "SERVING", 10)  # by itself
    c.sign(name, message=b"recorded again")
    outcomes = [(r[2], r[6]) for r in records(svc.server.cfg.audit.path)]
    # The signature that was made but withheld is on record, saying so; the call refused
    # before it ran is counted in one AuditPaused record.
    assert outcomes == [
        ("CreateKey", "OK"),
        ("Sign", "OK" + NOT_ANSWERED),
        ("AuditPaused", "UNAVAILABLE"),
        ("Sign", "OK"),
    ]


def test_archiving_from_the_command_line_keeps_the_log_provable(
    service_factory: ServiceFactory, unique_name: UniqueName
) -> None:
    path = signed_and_stopped(service_factory(audit={"checkpoint_every": 3}), unique_name(), 7)
    done = subprocess.run(
        [str(SIGNER_BIN), "audit-log", "archive", "--db", path, "--older-than-days", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("archived records 1 to 8 to ")
    assert records(path) == []
    done = verify_cli("--db", path, "--archives")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 earlier records in archives (checked)" in done.stdout


# --- calls whose caller stopped waiting (issue 11, item 1) -------------------------------------


def stored(svc: RunningService) -> SQLiteStore:
    return SQLiteStore(svc.server.cfg.store.path)


class _Held:
    """Holds ``target.method`` in the service's worker thread until released, and tells when a
    call entered it and when the server saw a call's caller go (its log line)."""

    def __init__(self, target: object, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.gone = threading.Semaphore(0)
        original = getattr(target, method)

        self.entries = threading.Semaphore(0)

        def held(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            self.entries.release()
            assert self.release.wait(30), "never released"
            return original(*args, **kwargs)

        monkeypatch.setattr(target, method, held)
        held_self = self

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith("caller gone before the answer"):
                    held_self.gone.release()

        self._watch = Watch()
        logging.getLogger("signer.server").addHandler(self._watch)

    def saw_gone(self, calls: int = 1) -> bool:
        return all(self.gone.acquire(timeout=20) for _ in range(calls))

    def close(self) -> None:
        self.release.set()
        logging.getLogger("signer.server").removeHandler(self._watch)


def test_a_cancelled_call_still_changes_state_only_with_its_record(
    service_factory: ServiceFactory, unique_name: UniqueName, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service_factory()
    held = _Held(svc.server.keyring, "create_key", monkeypatch)
    name = unique_name()
    with grpc.insecure_channel(svc.address) as channel:
        stub = pb_grpc.SignerServiceStub(channel)
        call = stub.CreateKey.future(pb.CreateKeyRequest(name=name, algorithm="ec-p256"))
        try:
            assert held.entered.wait(20)
            call.cancel()  # the caller gives up while the key is being made in the token
            assert held.saw_gone(), "the server never saw the caller go"
        finally:
            held.close()
    svc.stop()  # waits for the call to finish
    assert stored(svc).get_key(name).name == name  # it happened...
    outcomes = [(r[2], r[3], r[6]) for r in records(svc.server.cfg.audit.path)]
    assert ("CreateKey", name, "OK (caller gone)") in outcomes  # ...and it is on the record


def test_calls_past_their_deadline_are_recorded_with_what_they_did(
    service_factory: ServiceFactory, unique_name: UniqueName, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service_factory()
    c = svc.client()
    name = unique_name()
    c.create_key(name, "ec-p256")
    held = _Held(svc.server.admin_token, "generate", monkeypatch)  # inside the key's lock
    with grpc.insecure_channel(svc.address) as channel:
        stub = pb_grpc.SignerServiceStub(channel)
        rotate = stub.RotateKey.future(pb.RotateKeyRequest(name=name), timeout=0.5)
        try:
            assert held.entered.wait(20)
            # Scheduling version 1's destruction waits for the key's lock, behind the rotation
            # (which will make version 2 primary); both callers give up.
            schedule = stub.ScheduleKeyVersionDestruction.future(
                pb.ScheduleKeyVersionDestructionRequest(name=name, version=1), timeout=0.5
            )
            for call in (rotate, schedule):
                with pytest.raises(grpc.RpcError) as info:
                    call.result()
                assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            held.close()
    svc.stop()  # waits for both calls to finish
    key = stored(svc).get_key(name)
    assert (key.primary, key.version(1).state) == (2, State.DESTRUCTION_SCHEDULED)
    rows = [(r[2], r[4], r[6]) for r in records(svc.server.cfg.audit.path) if r[3] == name]
    assert ("RotateKey", 2, "OK (caller gone)") in rows
    assert ("ScheduleKeyVersionDestruction", 1, "OK (caller gone)") in rows


# --- what one caller can make the service write (issue 11, item 7) ----------------------------


def test_a_caller_refused_too_often_is_throttled_and_counted_in_one_record(
    service_factory: ServiceFactory, unique_name: UniqueName, captured_lines: list[str]
) -> None:
    svc = service_factory(server={"refused_calls_budget": 3, "refusal_window_seconds": 3600})
    c = svc.client()
    for i in range(3):
        with pytest.raises(InvalidArgument):
            c.get_key(f"Not A Name {i}")
    logged = len(captured_lines)
    for _ in range(20):  # even a call that would be fine: the caller is throttled
        with pytest.raises(ResourceExhausted, match=r"3 calls refused in 3600 s"):
            c.create_key(unique_name(), "ec-p256")
    assert len(captured_lines) == logged, "throttled calls must not each write a log line"
    svc.stop()
    rows = [(r[1], r[2], r[4], r[6]) for r in records(svc.server.cfg.audit.path)]
    assert rows == [(CALLER, "GetKey", 0, "INVALID_ARGUMENT")] * 3 + [
        (CALLER, "Throttled", 20, "RESOURCE_EXHAUSTED")
    ]


# --- a log is signed to its end, and witnessed outside its database (issue 11, item 2) ---------


def _rewrite_and_strip(path: str, seq: int) -> None:
    """The red team's edit of a copy of a live log: record ``seq`` rewritten with every hash
    after it recomputed, then every checkpoint and the audit key deleted."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT * FROM records ORDER BY seq").fetchall()
        prev = rows[0][8]
        for row in rows:
            row = list(row)
            if row[0] == seq:
                row[4] = "someone-else"
            event = Event(datetime.fromisoformat(row[1]), *row[2:8])
            row[8], row[9] = prev, record_hash(row[0], event, prev)
            prev = row[9]
            db.execute(
                "UPDATE records SET key = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (row[4], row[8], row[9], row[0]),
            )
        db.execute("DELETE FROM checkpoints")
        db.execute("DELETE FROM audit_key")


def test_a_rewritten_log_stripped_of_its_checkpoints_does_not_verify(
    service_factory: ServiceFactory, unique_name: UniqueName, tmp_path: Path
) -> None:
    witness = tmp_path / "elsewhere.jsonl"
    svc = service_factory(
        audit={"checkpoint_every": 5, "max_unsigned_records": 8, "witness_file": str(witness)},
        server={"max_calls_in_flight": 2},
    )
    path = signed_and_stopped(svc, unique_name(), 12)  # 13 records, checkpoints 5, 10, 13
    config = write_toml(tmp_path / "verify.toml", svc.server.cfg)
    done = verify_cli("--config", str(config))  # the witness of the config is read
    assert done.returncode == 0, done.stdout
    assert "3 checkpoints of" in done.stdout
    assert "agree" in done.stdout

    copy = tmp_path / "copy.db"
    shutil.copy(path, copy)
    shutil.copy(f"{path}.key.pem", f"{copy}.key.pem")
    _rewrite_and_strip(str(copy), 7)
    done = verify_cli("--config", str(config), "--db", str(copy))
    assert done.returncode == 1
    # Pinned, with neither key nor checkpoint: what a first checkpoint cut short after its pin
    # leaves (the key is recorded with that checkpoint), but too long to be unsigned.
    assert "records 1 to 13 (13) are under no signed checkpoint" in done.stdout
    Path(f"{copy}.key.pem").unlink()  # the pin removed as well: too long to be unsigned
    done = verify_cli("--config", str(config), "--db", str(copy))
    assert done.returncode == 1
    assert "records 1 to 13 (13) are under no signed checkpoint" in done.stdout
    with sqlite3.connect(copy) as db:  # cut to what the bound allows: the database cannot tell
        db.execute("DELETE FROM records WHERE seq > 6")
    done = verify_cli("--config", str(config), "--db", str(copy))
    assert done.returncode == 0
    assert "no audit key is pinned" in done.stdout
    # The witness, elsewhere, can.
    done = verify_cli("--config", str(config), "--db", str(copy), "--witness", str(witness))
    assert done.returncode == 1
    assert "saw a checkpoint at 5, but the log has no audit key and none is pinned" in done.stdout


def test_a_checkpoint_key_that_is_not_the_pinned_one_stops_the_service(
    service_factory: ServiceFactory, unique_name: UniqueName
) -> None:
    """Issue 12: a foreign audit key is a tamper signal. The service refuses every call,
    UNAVAILABLE naming why, and its health is NOT_SERVING, until an operator restarts it."""
    svc = service_factory(audit={"checkpoint_every": 1})
    foreign = ec.generate_private_key(ec.SECP256R1()).public_key()
    svc.server.cfg.audit.pinned_key.write_bytes(
        foreign.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    c = svc.client()
    c.list_keys()  # recorded; its checkpoint then meets the foreign pin
    assert wait_until(lambda: health_status(svc.address) == "NOT_SERVING", 10)
    with pytest.raises(Unavailable, match="the audit key is not the one pinned"):
        c.create_key(unique_name(), "ec-p256")
    with pytest.raises(Unavailable, match="the audit key is not the one pinned"):
        c.list_keys()


# --- what a caller who goes can leave running (issue 11's review) -----------------------------


def test_calls_left_running_are_bounded_per_caller(
    service_factory: ServiceFactory, unique_name: UniqueName, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service_factory(server={"max_calls_per_caller": 2})
    held = _Held(svc.server.keyring, "create_key", monkeypatch)
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = pb_grpc.SignerServiceStub(channel)
            calls = [
                stub.CreateKey.future(pb.CreateKeyRequest(name=unique_name(), algorithm="ec-p256"))
                for _ in range(2)
            ]
            assert all(held.entries.acquire(timeout=20) for _ in calls)  # both are running
            for call in calls:
                call.cancel()  # gone, but still running in the service
            assert held.saw_gone()  # (one line for both: the server says it once per moment)
            with pytest.raises(ResourceExhausted, match="2 calls of this caller are running"):
                svc.client().list_keys()
    finally:
        held.close()
    assert wait_until(lambda: not svc.server._calls, 20)
    svc.client().list_keys()  # they ended: room again


def test_a_burst_refused_for_want_of_places_writes_no_more_than_the_budget(
    service_factory: ServiceFactory, unique_name: UniqueName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 12: calls refused because their caller had too many running were each
    recorded and never counted as refusals, and a burst passed the throttle before any of its
    records was written (4,872 records from one caller with no grant). Now they count, before
    their record is awaited: a burst of 200 writes at most the budget's worth of records, and
    one Throttled record counts the rest."""
    budget = 5
    svc = service_factory(
        server={
            "max_calls_per_caller": 2,
            "refused_calls_budget": budget,
            "refusal_window_seconds": 3600,
        },
    )
    held = _Held(svc.server.keyring, "create_key", monkeypatch)
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = pb_grpc.SignerServiceStub(channel)
            running = [
                stub.CreateKey.future(pb.CreateKeyRequest(name=unique_name(), algorithm="ec-p256"))
                for _ in range(2)
            ]
            assert all(held.entries.acquire(timeout=20) for _ in running)  # both places taken
            burst = [stub.ListKeys.future(pb.ListKeysRequest()) for _ in range(200)]
            codes = [call.exception().code() for call in burst]
            assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    finally:
        held.close()
    svc.stop()
    rows = [(r[2], r[4], r[6]) for r in records(svc.server.cfg.audit.path)]
    one_by_one = [r for r in rows if r[0] == "ListKeys"]
    throttled = [r for r in rows if r[0] == "Throttled"]
    assert len(one_by_one) <= budget
    assert len(one_by_one) + sum(r[1] for r in throttled) == 200


def test_an_emergency_disable_does_not_wait_behind_a_pile_of_key_generations(
    service_factory: ServiceFactory, unique_name: UniqueName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 12: state changes shared the four-thread admin pool with key
    generation, so a caller with a rotate grant could pile up RSA-4096 rotations and hold an
    operator's Disable for minutes. The admin pool is held full here (a hook in create_key);
    the Disable still goes through, on the state changes' own pool."""
    svc = service_factory()
    victim = unique_name()
    svc.client().create_key(victim, "ec-p256")
    held = _Held(svc.server.keyring, "create_key", monkeypatch)
    with grpc.insecure_channel(svc.address) as channel:
        stub = pb_grpc.SignerServiceStub(channel)
        try:
            pile = [
                stub.CreateKey.future(pb.CreateKeyRequest(name=unique_name(), algorithm="ec-p256"))
                for _ in range(8)
            ]
            assert all(held.entries.acquire(timeout=20) for _ in range(4))  # all four threads
            disabled = svc.client(timeout=10).disable(victim, 1)
            assert disabled.state == pb.DISABLED
        finally:
            held.close()
        assert all(call.result(timeout=30) for call in pile)


def test_a_batch_whose_caller_went_signs_no_more_chunks(
    service_factory: ServiceFactory, unique_name: UniqueName, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service_factory()
    name = unique_name()
    svc.client().create_key(name, "ec-p256")
    held = _Held(svc.server.token, "sign_many", monkeypatch)
    chunks: list[int] = []
    hold = svc.server.token.sign_many  # the hold, which then calls the token

    def counted(key_id: bytes, jobs: list[tuple[SignMechanism, bytes]]) -> list[bytes]:
        chunks.append(len(jobs))
        return hold(key_id, jobs)

    monkeypatch.setattr(svc.server.token, "sign_many", counted)
    items = [pb.SignBatchItem(message=b"m%d" % i) for i in range(300)]
    try:
        with grpc.insecure_channel(svc.address) as channel:
            stub = pb_grpc.SignerServiceStub(channel)
            call = stub.SignBatch.future(pb.SignBatchRequest(name=name, items=items))
            assert held.entered.wait(20)  # inside the first chunk
            call.cancel()
            assert held.saw_gone()
    finally:
        held.close()
    svc.stop()
    assert chunks == [50]  # the first chunk, and no other: nobody was there for them
    rows = [(r[2], r[6]) for r in records(svc.server.cfg.audit.path) if r[3] == name]
    assert ("SignBatch", "OK (caller gone)") in rows
