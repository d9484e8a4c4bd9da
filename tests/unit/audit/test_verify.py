"""signer._internal.audit's verify_log: a whole log verifies, and every kind of tampering is
named: a record modified, deleted, inserted or reordered, the log truncated or rewritten with
fresh hashes, a checkpoint forged, the audit key or the checkpoints removed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from signer._internal.audit import (
    AuditLog,
    Event,
    Signing,
    checkpoint_message,
    record_hash,
    verify_log,
)
from signer.errors import SignerError
from tests.unit.audit.fakes import (
    Backend,
    SoftKey,
    event,
    pinned,
    rewrite,
    rows,
    verdict_of,
    write,
)


def test_a_whole_log_verifies(written: Callable[[int], Path], backend: Backend) -> None:
    path = written(10)
    v = verify_log(backend.location(path), pinned(path))
    assert v.whole
    assert (v.records, v.last_checkpoint) == (10, 10)  # a last checkpoint at close
    assert v.checkpoints == 3  # at 4, 8 and the close


def test_records_chain_and_keep_only_the_payload_digest(
    written: Callable[[int], Path], backend: Backend
) -> None:
    path = written(3)
    r = rows(backend, path)
    assert r[0][8] == "0" * 64
    assert r[1][8] == r[0][9]
    assert r[2][6] == f"{3:064x}"
    assert r[2][9] == record_hash(3, event(3), str(r[1][9]))


def test_a_modified_record_is_named(written: Callable[[int], Path], backend: Backend) -> None:
    path = written(10)
    with backend.sql(path) as db:
        db.execute("UPDATE records SET status = 'PERMISSION_DENIED' WHERE seq = 5")
    assert verdict_of(backend, path) == (5, "its contents do not match its hash (modified)")


def test_a_deleted_record_is_named(written: Callable[[int], Path], backend: Backend) -> None:
    path = written(10)
    with backend.sql(path) as db:
        db.execute("DELETE FROM records WHERE seq = 7")
    assert verdict_of(backend, path) == (7, "record missing (deleted)")


def test_an_inserted_record_is_caught_where_the_chain_breaks(
    written: Callable[[int], Path],
    backend: Backend,
) -> None:
    path = written(10)
    r = rows(backend, path)
    forged = event(99, status="OK")
    fake = [
        5,
        forged.time.isoformat(timespec="microseconds"),
        forged.caller,
        forged.operation,
        forged.key,
        forged.version,
        forged.payload_sha256,
        forged.status,
        r[3][9],
        record_hash(5, forged, str(r[3][9])),
    ]
    shifted = [[row[0] + 1, *row[1:]] if int(row[0]) >= 5 else row for row in r]
    rewrite(backend, path, [*shifted[:4], fake, *shifted[4:]])
    assert verdict_of(backend, path) == (
        6,
        "does not follow the record before it (inserted or reordered)",
    )


def test_reordered_records_are_caught(written: Callable[[int], Path], backend: Backend) -> None:
    path = written(10)
    r = rows(backend, path)
    r[4][1:], r[5][1:] = r[5][1:], r[4][1:]  # swap the contents of records 5 and 6
    rewrite(backend, path, r)
    assert verdict_of(backend, path) == (
        5,
        "does not follow the record before it (inserted or reordered)",
    )


def test_a_truncated_log_is_caught_by_its_checkpoints(
    written: Callable[[int], Path], backend: Backend
) -> None:
    path = written(10)
    with backend.sql(path) as db:
        db.execute("DELETE FROM records WHERE seq > 6")
    assert verdict_of(backend, path) == (7, "missing: the log ends at 6, a checkpoint signed 8")


def test_a_log_rewritten_with_fresh_hashes_disagrees_with_the_signatures(
    written: Callable[[int], Path],
    backend: Backend,
) -> None:
    """The forger recomputes every hash after the change: the chain is consistent again, but
    the checkpoint at 8 signed the old hash, and the forger has no key to sign a new one."""
    path = written(10)
    r = rows(backend, path)
    prev = str(r[4][8])
    for row in r[4:]:
        e = Event(datetime.fromisoformat(str(row[1])), *row[2:8])
        if row[0] == 5:
            e = Event(e.time, e.caller, e.operation, e.key, e.version, e.payload_sha256, "OK!")
            row[7] = "OK!"
        row[8] = prev
        row[9] = prev = record_hash(int(row[0]), e, prev)
    rewrite(backend, path, r)
    assert verdict_of(backend, path) == (
        5,
        "records 5 to 8 differ from what the checkpoint at 8 signed (rewritten, hashes and all)",
    )


def test_a_checkpoint_signed_with_another_key_is_caught(
    written: Callable[[int], Path], backend: Backend
) -> None:
    path = written(10)
    forger = SoftKey()
    with backend.sql(path) as db:
        query = "SELECT seq, hash, time FROM checkpoints WHERE seq = 4"
        seq, hash_, at = db.execute(query).fetchone()
        sig = Signing(forger.sign, b"x")(checkpoint_message(seq, hash_, at))
        db.execute("UPDATE checkpoints SET signature = ? WHERE seq = 4", (sig,))
    assert verdict_of(backend, path) == (4, "its checkpoint's signature does not verify")


def test_a_log_that_names_another_audit_key_is_refused(
    written: Callable[[int], Path], backend: Backend
) -> None:
    path = written(4)
    with backend.sql(path) as db:
        db.execute("UPDATE audit_key SET public_key = ?", (SoftKey().public_der,))
    assert verdict_of(backend, path) == (
        0,
        "the audit key recorded in the log is not the pinned one",
    )


def test_a_chain_the_log_does_not_hold_is_named(
    written: Callable[[int], Path], backend: Backend
) -> None:
    """``verify --chain`` with a name the store holds nothing of (a file's one chain is "", a
    database's are its replicas'): bad, not an empty chain's "whole: 0 records". Fails without
    the fix of review finding 4."""
    path = written(4)
    v = verify_log(backend.location(path), pinned(path), chain="r1")
    assert v.first_bad == (
        0,
        "the database holds no chain 'r1' (a mistyped name, or the chain removed whole); "
        "it holds ''",
    )


def test_the_checkpoint_message_names_the_chain_and_is_as_before_without_one() -> None:
    """v1 and v2 (chain "", no refs) are what logs of before signed, byte for byte; v3 with a
    named chain signs the name after the refs, so no chain's message is another's. Fails
    without the fix of review NOTE N2 (the name was not signed)."""
    h, at = "ab" * 32, "2026-11-22T00:00:00.000000+00:00"
    assert checkpoint_message(4, h, at) == f"signer-audit-checkpoint:4:{h}:{at}".encode()
    assert checkpoint_message(4, h, at, 0) == f"signer-audit-checkpoint:v2:4:{h}:{at}:0".encode()
    refs = (("r2", 3, "cd" * 32),)
    old_v3 = f'signer-audit-checkpoint:v3:4:{h}:{at}:0:[["r2",3,"{"cd" * 32}"]]'.encode()
    assert checkpoint_message(4, h, at, 0, refs) == old_v3
    assert checkpoint_message(4, h, at, 0, refs, "r1") == old_v3 + b":r1"
    assert checkpoint_message(4, h, at, 0, (), "r1") == (
        f"signer-audit-checkpoint:v3:4:{h}:{at}:0:[]:r1".encode()
    )
    messages = {checkpoint_message(4, h, at, 0, r, c) for r in ((), refs) for c in ("", "r1", "r9")}
    assert len(messages) == 6


def test_a_missing_log_is_an_error(tmp_path: Path, soft: SoftKey, backend: Backend) -> None:
    pem = serialization.load_der_public_key(soft.public_der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(SignerError, match="no audit log at"):
        verify_log(backend.location(tmp_path / "nope.db"), pem)


def test_a_young_log_verifies_before_its_first_checkpoint(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(backend.store(path), checkpoint_every=100, checkpoint_interval=60)
    log.start(soft.make, tmp_path / "audit.db.key.pem")
    write(log, event(1))
    v = verify_log(backend.location(path), None)  # nothing pinned yet, and the log names no key
    assert v.whole
    assert (v.records, v.checkpoints, v.unsigned_tail) == (1, 0, 1)
    log.close()  # a last checkpoint: now the key exists, and a missing pin is refused
    assert verify_log(backend.location(path), None).first_bad == (
        0,
        "the log has an audit key or checkpoints, but no pinned key was given",
    )


# --- checkpoints removed (issue 11) ------------------------------------------------------------


def test_deleting_every_checkpoint_and_the_audit_key_is_caught(
    written: Callable[[int], Path],
    backend: Backend,
) -> None:
    """The red team's case: a record rewritten with fresh hashes, then the checkpoints and the
    audit key deleted. With the pin or without, the log is longer than any the service leaves
    unsigned (its bound: 8 records here). (Pinned, with neither key nor checkpoint, and within
    the bound, it would be what a first checkpoint cut short after its pin leaves, which verify
    accepts: the exposure of any unsigned tail, which only a witness closes. The pin alone
    named this case before the key was recorded with the first checkpoint.)"""
    path = written(10)
    r = rows(backend, path)
    prev = str(r[0][8])
    for row in r:
        e = Event(datetime.fromisoformat(str(row[1])), *row[2:8])
        if row[0] == 5:
            e = Event(
                e.time, e.caller, e.operation, "someone-else", e.version, e.payload_sha256, e.status
            )
            row[4] = "someone-else"
        row[8] = prev
        row[9] = prev = record_hash(int(row[0]), e, prev)
    rewrite(backend, path, r)
    with backend.sql(path) as db:
        db.execute("DELETE FROM checkpoints")
        db.execute("DELETE FROM audit_key")
    for pin in (pinned(path), None):
        assert verify_log(backend.location(path), pin, max_unsigned_records=8).first_bad == (
            1,
            "records 1 to 10 (10) are under no signed checkpoint; the service leaves at most 8 "
            "so (checkpoints removed?)",
        )
    with backend.sql(path) as db:  # the audit key put back, the checkpoints still gone
        db.execute("INSERT INTO audit_key VALUES (1, ?, ?)", (b"audit", SoftKey().public_der))
    assert verify_log(backend.location(path), pinned(path)).first_bad == (
        0,
        "the audit key recorded in the log is not the pinned one",
    )


def test_a_checkpoint_removed_between_two_is_named(
    written: Callable[[int], Path], backend: Backend
) -> None:
    path = written(10)  # checkpoints at 4, 8, 10
    with backend.sql(path) as db:
        db.execute("DELETE FROM checkpoints WHERE seq = 8")
    assert verdict_of(backend, path) == (
        5,
        "the checkpoint at 10 follows one at 8, which the log does not have (checkpoints removed)",
    )
