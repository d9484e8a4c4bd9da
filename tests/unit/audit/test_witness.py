"""signer._internal.audit's witnesses: each checkpoint also goes outside the database (a file,
syslog, the service's log), where verify reads it back and catches a tail cut or rewritten."""

from __future__ import annotations

import base64
import json
import socket
from datetime import datetime
from pathlib import Path

import pytest

from signer._internal.audit import (
    AuditLog,
    Event,
    Signing,
    SyslogWitness,
    checkpoint_message,
    read_witness,
    record_hash,
    verify_log,
)
from signer.errors import Unavailable
from tests.unit.audit.fakes import (
    Backend,
    SoftKey,
    event,
    pinned,
    rewrite,
    rows,
    witnessed_log,
    write,
)


def test_a_witness_agrees_with_a_whole_log(tmp_path: Path, soft: SoftKey, backend: Backend) -> None:
    path, witness = witnessed_log(backend, tmp_path, soft, 10)
    assert witness.stat().st_mode & 0o777 == 0o600
    assert len(witness.read_text().splitlines()) == 3
    v = verify_log(backend.location(path), pinned(path), witnesses=[witness])
    assert (v.whole, v.witnessed) == (True, 3)


def test_a_tail_cut_with_its_checkpoints_is_caught_by_the_witness(
    tmp_path: Path,
    soft: SoftKey,
    backend: Backend,
) -> None:
    path, witness = witnessed_log(backend, tmp_path, soft, 10)
    with backend.sql(path) as db:
        db.execute("DELETE FROM records WHERE seq > 4")
        db.execute("DELETE FROM checkpoints WHERE seq > 4")
    assert verify_log(backend.location(path), pinned(path)).whole  # the database alone cannot tell
    assert verify_log(backend.location(path), pinned(path), witnesses=[witness]).first_bad == (
        5,
        "records 5 to 8 are missing: the witness checkpoints.jsonl (line 2) saw a checkpoint at "
        "8, the log ends at 4 (cut from the end)",
    )


def test_a_rewritten_tail_is_caught_by_the_witness(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    path, witness = witnessed_log(backend, tmp_path, soft, 10)
    r = rows(backend, path)
    r[9][4] = "someone-else"
    e = Event(datetime.fromisoformat(str(r[9][1])), *r[9][2:8])
    r[9][9] = record_hash(10, e, str(r[9][8]))
    rewrite(backend, path, r)
    with backend.sql(path) as db:
        db.execute("DELETE FROM checkpoints WHERE seq = 10")
    assert verify_log(
        backend.location(path), pinned(path)
    ).whole  # a short unsigned tail is allowed
    assert verify_log(backend.location(path), pinned(path), witnesses=[witness]).first_bad == (
        10,
        "record 10 is not what the witness checkpoints.jsonl (line 3) saw signed (rewritten, "
        "hashes and all)",
    )


def test_a_forged_witness_line_is_named(tmp_path: Path, soft: SoftKey, backend: Backend) -> None:
    path, witness = witnessed_log(backend, tmp_path, soft, 4)
    forger = SoftKey()
    line = json.loads(witness.read_text().splitlines()[0])
    line["signature"] = base64.b64encode(
        Signing(forger.sign, b"x")(checkpoint_message(4, line["hash"], line["at"], 0))
    ).decode()
    with witness.open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    assert verify_log(backend.location(path), pinned(path), witnesses=[witness]).first_bad == (
        4,
        "the witness checkpoints.jsonl (line 2) holds a checkpoint the pinned key did not sign",
    )


def test_a_witness_line_signed_for_another_chain_is_named(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """A line the pinned key signed as chain r1's (a replica sharing the pin), its ``chain``
    field removed to pass as this log's (chain ""): its signature names r1, so it does not
    verify as this log's. Fails without the fix of review NOTE N2 (the chain was not signed)."""
    path, witness = witnessed_log(backend, tmp_path, soft, 4)
    line = json.loads(witness.read_text().splitlines()[0])
    assert "chain" not in line
    message = checkpoint_message(4, line["hash"], line["at"], 0, (), "r1")
    line["signature"] = base64.b64encode(Signing(soft.sign, b"x")(message)).decode()
    with witness.open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    assert verify_log(backend.location(path), pinned(path), witnesses=[witness]).first_bad == (
        4,
        "the witness checkpoints.jsonl (line 2) holds a checkpoint the pinned key did not sign",
    )
    assert [c.chain for _, c in read_witness(witness)] == ["", ""]


def test_the_service_log_and_syslog_lines_are_witnesses_too(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """What the service logs with each checkpoint, and what syslog keeps of the datagram, both
    read back as witnesses; other lines are skipped."""
    path, witness = witnessed_log(backend, tmp_path, soft, 8)
    first, second = witness.read_text().splitlines()
    service_log = tmp_path / "service.log"
    service_log.write_text(
        '{"time":"2026-11-22T00:00:00","level":"info","msg":"service listening"}\n'
        + "not json at all\n"
        + json.dumps({"time": "2026-11-22T00:00:01", "level": "info", **json.loads(first)})
        + "\n"
        + "Nov 22 00:00:02 host signer-audit[4242]: "
        + second
        + "\n"
    )
    assert [c.seq for _, c in read_witness(service_log)] == [4, 8]
    v = verify_log(backend.location(path), pinned(path), witnesses=[service_log])
    assert (v.whole, v.witnessed) == (True, 2)


def test_a_syslog_witness_sends_one_datagram_per_checkpoint(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    address = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        server.settimeout(10)
        path = tmp_path / "audit.db"
        log = AuditLog(
            backend.store(path),
            checkpoint_every=2,
            checkpoint_interval=60,
            witnesses=[SyslogWitness(address)],
        )
        log.start(soft.make, tmp_path / "audit.db.key.pem")
        for i in range(1, 5):
            write(log, event(i))
        log.close()
        received = [server.recv(65536).decode() for _ in range(2)]
    assert all(d.startswith("<85>signer-audit[") for d in received)
    export = tmp_path / "journal.txt"
    export.write_text("\n".join(received) + "\n")
    v = verify_log(backend.location(path), pinned(path), witnesses=[export])
    assert (v.whole, v.witnessed) == (True, 2)


def test_a_witness_that_cannot_be_written_fails_the_checkpoint(
    tmp_path: Path,
    soft: SoftKey,
    backend: Backend,
) -> None:
    class Broken:
        def write(self, checkpoint: object) -> None:
            raise OSError("No space left on device")

        def close(self) -> None:
            pass

    path = tmp_path / "audit.db"
    log = AuditLog(
        backend.store(path),
        checkpoint_every=1,
        checkpoint_interval=60,
        max_unsigned_records=2,
        witnesses=[Broken()],
    )
    log.start(soft.make, tmp_path / "audit.db.key.pem")
    write(log, event(1))
    write(log, event(2))
    with pytest.raises(Unavailable, match="No space left on device"):
        log.check()
    log.close()
    with backend.sql(path) as db:
        assert db.execute("SELECT COUNT(*) FROM checkpoints").fetchone() == (0,)
