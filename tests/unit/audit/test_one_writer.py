"""The writer vouches for what it signs (REVIEW.md of issue 16, findings 1, 2, 10, 13): it
chains after the head it left, and the store checks, under the chain's lock, that the head is
still there; a checkpoint must follow the newest one; an archive must start where the live log
does; start-up reads are one snapshot. On both stores: what a second writer or a change made
underneath a running log does is to stop it, never to be chained after and signed."""

from __future__ import annotations

from pathlib import Path

import pytest

from signer._internal.audit import Archived, AuditLog, verify_log
from signer._internal.audit._chain import Checkpoint, chain, iso
from signer._internal.audit._store import ChainMoved
from signer.errors import FailedPrecondition, Unavailable
from tests.unit.audit.fakes import T0, Backend, SoftKey, event, pinned, rows, write
from tests.unit.audit.test_log import Changes


def started(backend: Backend, path: Path, soft: SoftKey, every: int = 4) -> AuditLog:
    log = AuditLog(backend.store(path), checkpoint_every=every, checkpoint_interval=60)
    log.start(soft.make, Path(f"{path}.key.pem"))
    return log


def newest_checkpoint(backend: Backend, path: Path) -> int:
    with backend.sql(path) as db:
        return int(db.execute("SELECT MAX(seq) FROM checkpoints").fetchone()[0] or 0)


def test_a_record_forged_into_a_running_log_stops_it_and_is_never_signed(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """Someone who can write the store adds record 3, correctly chained, while the service runs.
    The next call's record would follow it: the append refuses (its head is not where the
    writer left it), the call is answered UNAVAILABLE, the log stops for good saying why, and
    no checkpoint signs the forged record, not even after a restart. (Chaining after whatever
    head the store showed, the reverted 460acdc signed it at the next checkpoint and verify
    said whole.)"""
    path = tmp_path / "audit.db"
    log = started(backend, path, soft, every=100)
    changes = Changes(log)
    assert write(log, event(1)) == 1
    assert write(log, event(2)) == 2
    insert(backend, path, 3)  # chained as the writer would have
    with pytest.raises(Unavailable, match="another writer, or a change made to the log"):
        write(log, event(3))
    assert changes.wait_for(lambda: log.failure is not None)
    assert "an operator must look" in (log.failure or "")
    log.close()  # its last checkpoint is not signed over the forged record either
    assert newest_checkpoint(backend, path) <= 2
    assert [r[0] for r in rows(backend, path)] == [1, 2, 3]
    # A restart does not sign it either: the start-up checks cannot tell the forged record
    # from the writer's own, so the stop was written down beside the pin (the review's
    # finding 3: it went under the next start's first checkpoint).
    halted = Path(f"{path}.key.pem.halted")
    assert "another writer, or a change made" in halted.read_text()
    again = started(backend, path, soft, every=1)
    assert again.failure is not None
    assert f"removed {halted}" in again.failure
    with pytest.raises(Unavailable, match="stopped for good"):
        write(again, event(4))
    again.close()
    assert newest_checkpoint(backend, path) <= 2
    halted.unlink()  # an operator looked, and decided
    started(backend, path, soft).close()


def test_a_second_writer_on_a_log_stops_one_of_them_and_forks_nothing(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """Two services writing one log (a second one started by mistake). On PostgreSQL the second
    is refused at its start by the writer lock; on SQLite the first append after the other's
    stops that writer for good. Either way every record in the log is chained once and every
    checkpoint follows the one before: verify says whole."""
    path = tmp_path / "audit.db"
    first = started(backend, path, soft)
    assert write(first, event(1)) == 1
    if backend.name == "postgresql":
        with pytest.raises(FailedPrecondition, match="another service is writing this audit log"):
            backend.store(path)
        first.close()
        second = started(backend, path, soft)  # the lock went with the first's connection
        assert write(second, event(2)) == 2
        second.close()
    else:
        second = started(backend, path, soft)
        assert write(second, event(2)) == 2
        with pytest.raises(Unavailable, match="another writer, or a change made to the log"):
            write(first, event(3))
        assert first.failure is not None
        assert write(second, event(4)) == 3
        first.close()
        second.close()
    v = verify_log(backend.location(path), pinned(path))
    assert v.whole, v.first_bad


def test_a_checkpoint_must_follow_the_newest_and_sign_its_record_as_it_is(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """The store's own check, under the chain's lock: a checkpoint whose prev is not the newest
    one (a second writer's view), that does not move forward, or that signs a hash its record
    does not have, is refused and stored nowhere."""
    path = tmp_path / "audit.db"
    log = started(backend, path, soft)
    for i in range(1, 6):
        write(log, event(i))
    log.close()  # checkpoints at 4 and 5
    store = backend.store(path)
    try:
        head = store.record(5)
        assert head is not None
        wrong = [
            Checkpoint(5, head.hash, iso(T0), b"sig", 4),  # 5 is the newest already
            Checkpoint(5, head.hash, iso(T0), b"sig", 0),
            Checkpoint(4, head.hash, iso(T0), b"sig", 5),
        ]
        for c in wrong:
            with pytest.raises(ChainMoved, match="does not follow the log's newest"):
                store.add_checkpoint(c)
        store.append([chain(6, event(6), head.hash)])
        with pytest.raises(ChainMoved, match="sign its record as it is"):
            store.add_checkpoint(Checkpoint(6, "f" * 64, iso(T0), b"sig", 5))
        assert store.last_checkpoint() == 5
    finally:
        store.close()


def test_an_archive_that_does_not_start_where_the_live_log_does_is_refused(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """Two archive jobs (one cron per host) computing segments from the same reads: the second
    one's segment overlaps what the first moved, and is refused, the log untouched."""
    path = tmp_path / "audit.db"
    log = started(backend, path, soft)
    for i in range(1, 9):
        write(log, event(i))
    log.close()
    store = backend.store(path)
    try:
        r4, r8 = store.record(4), store.record(8)
        assert r4 is not None
        assert r8 is not None
        store.archived(Archived(1, 4, r4.hash, "a.jsonl", "0" * 64))
        with pytest.raises(FailedPrecondition, match="does not start where the live log does"):
            store.archived(Archived(1, 8, r8.hash, "b.jsonl", "0" * 64))
        assert [a.last_seq for a in store.archives()] == [4]
        assert [r.seq for r in store.records()] == [5, 6, 7, 8]
    finally:
        store.close()


def test_reads_in_a_snapshot_are_of_one_moment(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """What a writer's start-up checks read (head, checkpoints, tail) within ``snapshot()``
    stays as it was when the first was read, while another connection appends: an archive job
    running meanwhile cannot make a whole log look broken (a false 'does not verify' stops a
    replica for good)."""
    path = tmp_path / "audit.db"
    log = started(backend, path, soft, every=100)
    for i in range(1, 4):
        write(log, event(i))
    log.close()
    store = backend.store(path)
    try:
        with store.snapshot():
            assert store.head()[0] == 3
            insert(backend, path, 4)
            assert store.head()[0] == 3
            assert [x.seq for x in store.records()] == [1, 2, 3]
        assert store.head()[0] == 4
    finally:
        store.close()


def insert(backend: Backend, path: Path, seq: int) -> None:
    """Record ``seq``, chained after the newest, written underneath the log."""
    r = chain(seq, event(seq), rows(backend, path)[-1][9])
    e = r.event
    row = [seq, iso(e.time), e.caller, e.operation, e.key, e.version, e.payload_sha256, e.status]
    with backend.sql(path) as db:
        db.execute("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?)", [*row, r.prev_hash, r.hash])


def test_the_writer_reads_its_head_again_at_start(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """Made, then started after a record was appended (a replica's predecessor draining): it
    chains after what it finds at start, read in the start-up snapshot, not after what it saw
    when it was made."""
    path = tmp_path / "audit.db"
    log = started(backend, path, soft)
    write(log, event(1))
    log.close()
    late = AuditLog(backend.store(path), checkpoint_every=4, checkpoint_interval=60)
    insert(backend, path, 2)
    late.start(soft.make, Path(f"{path}.key.pem"))
    assert write(late, event(3)) == 3
    late.close()
    assert verify_log(backend.location(path), pinned(path)).whole
