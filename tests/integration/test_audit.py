"""The audit log of a real service: what it records, that it verifies, that it fails closed,
and that its checkpoints are signed by a key in the token."""

from __future__ import annotations

import hashlib
import os
import pwd
import sqlite3
import subprocess
from pathlib import Path

import pytest
from pkcs11 import Attribute, ObjectClass

from signer.errors import PermissionDenied, Unavailable
from tests.conftest import SIGNER_BIN

pytestmark = pytest.mark.integration
CALLER = f"uid:{os.getuid()}({pwd.getpwuid(os.getuid()).pw_name})"


def records(path: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT seq, caller, operation, key, version, payload_sha256, status FROM records "
            "ORDER BY seq"
        ).fetchall()


def verify_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SIGNER_BIN), "audit-log", "verify", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_every_call_is_recorded_without_its_payload(service_factory, unique_name, tmp_path):
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
        ("CreateKey", name, 0, "", "OK"),
        ("Sign", name, 1, digest, "OK"),
        ("Verify", name, 1, digest, "OK"),
        ("CreateKey", other, 0, "", "PERMISSION_DENIED"),
    ]
    assert {r[1] for r in rows} == {CALLER}
    assert message not in Path(svc.server.cfg.audit.path).read_bytes()


def signed_and_stopped(svc, name: str, signatures: int) -> str:
    """The audit log of a service that created ``name``, signed ``signatures`` times with it
    and was stopped (so its last checkpoint is written): its path."""
    c = svc.client()
    c.create_key(name, "ec-p256")
    for i in range(signatures):
        c.sign(name, message=f"m{i}".encode())
    svc.stop()
    return str(svc.server.cfg.audit.path)


def test_a_real_log_verifies_and_a_tampered_one_is_named(service_factory, unique_name):
    path = signed_and_stopped(service_factory(audit={"checkpoint_every": 5}), unique_name(), 12)
    done = verify_cli("--db", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is whole: 13 records, 3 signed checkpoints, signed up to record 13" in done.stdout

    with sqlite3.connect(path) as db:
        db.execute("UPDATE records SET key = 'someone-else' WHERE seq = 7")
    done = verify_cli("--db", path)
    assert done.returncode == 1
    assert "first bad record 7: its contents do not match its hash (modified)" in done.stdout


def test_checkpoints_are_signed_by_a_key_in_the_token(service_factory, own_session):
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


def test_no_signature_leaves_while_the_log_cannot_be_written(service_factory, unique_name):
    svc = service_factory()
    c = svc.client()
    name = unique_name()
    c.create_key(name, "ec-p256")
    blocker = sqlite3.connect(svc.server.cfg.audit.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # what a full disk or a dead volume looks like to SQLite
    try:
        with pytest.raises(Unavailable, match="the audit log cannot be written"):
            c.sign(name, message=b"not without a record")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    c.sign(name, message=b"recorded again")
    outcomes = [(r[2], r[6]) for r in records(svc.server.cfg.audit.path)]
    # The refused call is not in the log either: there was nowhere to write it.
    assert outcomes == [("CreateKey", "OK"), ("Sign", "OK")]


def test_archiving_from_the_command_line_keeps_the_log_provable(service_factory, unique_name):
    path = signed_and_stopped(service_factory(audit={"checkpoint_every": 3}), unique_name(), 7)
    done = subprocess.run(
        [str(SIGNER_BIN), "audit-log", "archive", "--db", path, "--older-than-days", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("archived records 1 to 8 to ")
    assert records(path) == []
    done = verify_cli("--db", path, "--archives")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 earlier records in archives (checked)" in done.stdout
