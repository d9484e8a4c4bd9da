"""signer._internal.audit's AuditLog, the writer: fail-closed writes that resume, a foreign or
lost audit key, the bound on records left unsigned, what it vouches for at start, and a crash
inside its first checkpoint."""

from __future__ import annotations

import asyncio
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from signer._internal.audit import (
    AuditLog,
    AuditPaused,
    AuditStore,
    Checkpoint,
    FileWitness,
    Witness,
    read_witness,
    verify_log,
)
from signer._internal.audit._chain import GENESIS, chain
from signer._internal.audit._log import NOT_ANSWERED, AuditKeyMismatch
from signer.errors import Unavailable
from signer.keys import SignMechanism
from tests.unit.audit.fakes import (
    Backend,
    SoftKey,
    event,
    pinned,
    rows,
    verdict_of,
    witnessed_log,
    write,
)


def _pem(public_der: bytes) -> bytes:
    return serialization.load_der_public_key(public_der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Changes:
    """Counts the log's change notices; waits for the next one (no sleeping)."""

    def __init__(self, log: AuditLog) -> None:
        self._cv = threading.Condition()
        self.count = 0
        log.on_change(self._seen)

    def _seen(self) -> None:
        with self._cv:
            self.count += 1
            self._cv.notify_all()

    def wait_for(self, pred: Callable[[], bool]) -> bool:
        with self._cv:
            return self._cv.wait_for(pred, timeout=10)


def test_writes_fail_closed_and_resume(tmp_path: Path, soft: SoftKey, backend: Backend) -> None:
    """Another process holds the database: the call gets UNAVAILABLE naming why, new calls are
    refused while it lasts (health follows), nothing is half-written, and once the lock goes
    the writer writes the record it kept, by itself, and the chain continues."""
    path = tmp_path / "audit.db"
    log = AuditLog(backend.store(path), checkpoint_every=100, checkpoint_interval=60)
    changes = Changes(log)
    log.start(soft.make, tmp_path / "audit.db.key.pem")
    assert write(log, event(1)) == 1
    with backend.locked_out(path):
        with pytest.raises(
            Unavailable, match=rf"the audit log cannot be written \({backend.locked}"
        ):
            write(log, event(2))
        with pytest.raises(
            AuditPaused, match=r"cannot be written .* calls are refused until it can"
        ):
            log.check()
    assert changes.wait_for(lambda: log._write_failing is None)  # retried without a new call
    log.check()
    assert write(log, event(3)) == 3
    log.close()
    assert verify_log(backend.location(path), pinned(path)).whole
    statuses = [(r[0], r[7]) for r in rows(backend, path)]
    assert statuses == [(1, "OK"), (2, "OK" + NOT_ANSWERED), (3, "OK")]


def test_coroutines_wait_for_their_own_records_and_failures(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """``record`` (what the server awaits): 50 concurrent calls get 50 distinct sequence
    numbers once committed; with the database locked, each gets UNAVAILABLE, and their records
    are written when it is free again, saying so."""
    path = tmp_path / "audit.db"
    log = AuditLog(backend.store(path), checkpoint_every=1000, checkpoint_interval=60)
    changes = Changes(log)
    log.start(soft.make, tmp_path / "audit.db.key.pem")

    async def many(first: int) -> list[int | BaseException]:
        return await asyncio.gather(
            *(log.record(event(first + i)) for i in range(50)), return_exceptions=True
        )

    got = asyncio.run(many(1))
    assert sorted(n for n in got if isinstance(n, int)) == list(range(1, 51)), got
    with backend.locked_out(path):
        failed = asyncio.run(many(51))
    assert all(isinstance(f, Unavailable) for f in failed)
    assert changes.wait_for(lambda: log._write_failing is None and not log._kept)
    log.close()
    written = rows(backend, path)
    assert len(written) == 100
    assert all(r[7] == "OK" + NOT_ANSWERED for r in written[50:])
    assert verify_log(backend.location(path), pinned(path)).whole
    with pytest.raises(Unavailable, match="the audit log is not running"):
        asyncio.run(log.record(event(101)))


def test_a_stopped_log_refuses(tmp_path: Path, backend: Backend) -> None:
    log = AuditLog(backend.store(tmp_path / "audit.db"))
    with pytest.raises(Unavailable, match="the audit log is not running"):
        write(log, event(1))
    log.close()


def test_records_across_wall_clock_jumps_verify_and_checkpoints_keep_their_pace(
    tmp_path: Path,
    soft: SoftKey,
    backend: Backend,
) -> None:
    """Issue 12, clock jumps: records carry the wall clock's time, which may go back or leap
    forward; the chain does not depend on it (verify passes), and checkpoints are paced by
    count and by the monotonic clock, so a leap of years neither forces nor skips one."""
    path = tmp_path / "audit.db"
    log = AuditLog(backend.store(path), checkpoint_every=100, checkpoint_interval=60)
    log.start(soft.make, tmp_path / "audit.db.key.pem")
    for i, years in enumerate((0, -6, 4, -10, 30)):
        e = event(i + 1)
        assert write(log, replace(e, time=e.time + timedelta(days=365 * years))) == i + 1
    assert log.store.last_checkpoint() == 0  # no leap of the wall clock made one due
    log.close()  # the last checkpoint, at stop
    assert verify_log(backend.location(path), pinned(path)).whole


def test_a_foreign_audit_key_stops_the_log_for_good(
    written: Callable[[int], Path],
    soft: SoftKey,
    backend: Backend,
) -> None:
    """A checkpoint key that is not the pinned one is a tamper signal (issue 12): not a log line
    and a retry, but every record refused, saying why, until an operator restarts."""
    path = written(4)
    other = SoftKey()  # the token hands over another key than the one pinned
    log = AuditLog(backend.store(path), checkpoint_every=1)
    changes = Changes(log)
    log.start(other.make, Path(f"{path}.key.pem"))
    write(log, event(5))  # committed; its checkpoint then finds the foreign key
    assert changes.wait_for(lambda: log.failure is not None)
    with pytest.raises(AuditPaused, match="the audit key is not the one pinned"):
        log.check()  # no new call starts
    assert write(log, event(6)) == 6  # a call that was already running is still recorded
    log.close()
    assert [r[0] for r in rows(backend, path)] == [1, 2, 3, 4, 5, 6]
    with backend.sql(path) as db:  # nothing was signed with the foreign key
        assert db.execute("SELECT MAX(seq) FROM checkpoints").fetchone() == (4,)


def test_a_pinned_key_the_token_does_not_hold_stops_the_log_at_its_first_checkpoint(
    tmp_path: Path,
    soft: SoftKey,
    backend: Backend,
) -> None:
    """A pin the log does not record, and no checkpoint: what a first checkpoint cut short after
    its pin leaves, so the start accepts it (it used to stop at once: that was the crash's
    defect). Its first checkpoint adopts the pinned key from the token; the token holds no such
    key here (the pin was replaced): every call refused, nothing signed, nothing pinned anew.
    (The cut-short checkpoint left records: they are durable before it. A pinned log that holds
    nothing is refused at start: everything was removed.)"""
    pin = tmp_path / "audit.db.key.pem"
    store = backend.store(tmp_path / "audit.db")
    store.append([chain(1, event(1), GENESIS)])  # what came before the cut-short checkpoint
    foreign = SoftKey()
    pin.write_bytes(_pem(foreign.public_der))
    log = AuditLog(store, checkpoint_every=1)
    changes = Changes(log)
    log.start(soft.make, pin)
    assert log.failure is None
    write(log, event(2))
    assert changes.wait_for(lambda: log.failure is not None)
    with pytest.raises(AuditPaused, match="the pinned audit key is not in the token"):
        log.check()
    log.close()
    assert soft.asked == [(None, foreign.public_der)]  # adopt, never generate
    assert pin.read_bytes() == _pem(foreign.public_der)
    with backend.sql(tmp_path / "audit.db") as db:
        assert db.execute("SELECT COUNT(*) FROM checkpoints").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM audit_key").fetchone() == (0,)


# --- the log is signed to within a bound of its end (issue 11) -----------------------------


class FlakyKey(SoftKey):
    """A signer that can be made to fail, as the token does while its host is away."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def sign(self, key_id: bytes, mech: SignMechanism, digest: bytes) -> bytes:
        if self.down:
            raise Unavailable("token unavailable: test")
        return super().sign(key_id, mech, digest)


def test_calls_are_refused_before_records_would_go_unsigned_beyond_the_bound(
    tmp_path: Path,
    backend: Backend,
) -> None:
    """The token is away: records of calls that ran are committed all the same (what they did
    must be on record), while check() refuses new calls from three quarters of the bound; those
    are counted into one record once the writer's own retry has signed a checkpoint."""
    key = FlakyKey()
    path = tmp_path / "audit.db"
    log = AuditLog(
        backend.store(path),
        checkpoint_every=100,
        checkpoint_interval=0.05,
        max_unsigned_records=4,
    )
    changes = Changes(log)
    log.start(key.make, tmp_path / "audit.db.key.pem")
    key.down = True
    assert [write(log, event(i)) for i in (1, 2)] == [1, 2]
    log.check()  # two unsigned of four: calls still start
    assert write(log, event(3)) == 3
    assert changes.wait_for(lambda: log._failing is not None)
    for _ in range(7):  # three of four: new calls are refused, and counted
        with pytest.raises(AuditPaused, match=r"cannot sign a checkpoint \(token unavailable"):
            log.check()
        log.paused()
    assert write(log, event(4)) == 4  # a call already running: recorded
    key.down = False  # the writer's own retry signs, and calls are taken again
    assert changes.wait_for(lambda: log._failing is None)
    log.check()
    log.close()
    assert [(r[3], r[5], r[7]) for r in rows(backend, path)][-1] == (
        "AuditPaused",
        7,
        "UNAVAILABLE",
    )
    assert verify_log(backend.location(path), pinned(path), max_unsigned_records=4).whole


def test_an_outage_then_a_restart_leaves_a_genuine_log_that_starts(
    tmp_path: Path, backend: Backend
) -> None:
    """The second review's case: the token host away, calls refused by the gate, a restart
    while it is still away. The tail stays within the bound (the refused calls are counted, not
    recorded), so the restarted log is not taken for a tampered one; once the token is back,
    one record counts what was refused."""
    key = FlakyKey()
    path = tmp_path / "audit.db"

    def open_log() -> tuple[AuditLog, Changes]:
        log = AuditLog(
            backend.store(path),
            checkpoint_every=100,
            checkpoint_interval=0.05,
            max_unsigned_records=4,
        )
        changes = Changes(log)
        log.start(key.make, tmp_path / "audit.db.key.pem")
        return log, changes

    log, changes = open_log()
    assert write(log, event(1)) == 1
    assert changes.wait_for(lambda: log._unsigned == 0)  # signed while the token was there
    key.down = True
    assert [write(log, event(i)) for i in (2, 3, 4)] == [2, 3, 4]
    assert changes.wait_for(lambda: log._failing is not None)
    for _ in range(100):  # a day of callers refused: none of them grows the tail
        with pytest.raises(AuditPaused):
            log.check()
        log.paused()
    log.close()  # its last checkpoint fails too; the count goes in, the bound has room
    log, changes = open_log()  # restarted, the token still away
    assert log.failure is None
    key.down = False
    assert changes.wait_for(lambda: log._unsigned == 0)
    log.close()
    assert [(r[3], r[5]) for r in rows(backend, path)][-1] == ("AuditPaused", 100)
    assert verify_log(backend.location(path), pinned(path), max_unsigned_records=4).whole


def test_a_batch_that_would_cross_the_bound_is_split_by_a_checkpoint(
    tmp_path: Path, backend: Backend
) -> None:
    path = tmp_path / "audit.db"
    soft = SoftKey()
    log = AuditLog(
        backend.store(path), checkpoint_every=100, checkpoint_interval=60, max_unsigned_records=2
    )
    log.start(soft.make, tmp_path / "audit.db.key.pem")

    async def together() -> list[int]:
        return list(await asyncio.gather(*(log.record(event(i)) for i in range(1, 4))))

    assert asyncio.run(together()) == [1, 2, 3]  # queued at once: one batch of three
    log.close()
    with backend.sql(path) as db:
        assert [r[0] for r in db.execute("SELECT seq FROM checkpoints")] == [2, 3]
    assert verify_log(backend.location(path), pinned(path), max_unsigned_records=2).whole


# --- the writer vouches for what it signs (issue 11's review) ------------------------------


def restarted(
    backend: Backend, path: Path, soft: SoftKey, witnesses: Sequence[Witness] = ()
) -> AuditLog:
    log = AuditLog(
        backend.store(path), checkpoint_every=4, checkpoint_interval=60, witnesses=witnesses
    )
    log.start(soft.make, Path(f"{path}.key.pem"))
    return log


def test_a_restart_does_not_sign_over_a_tail_longer_than_the_bound(
    written: Callable[[int], Path],
    soft: SoftKey,
    backend: Backend,
) -> None:
    """The reviewer's attack: checkpoints after 4 deleted and the records after it rewritten
    (any number, hashes recomputed). A restart used to sign all of it at its first checkpoint,
    and verify passed after. Now the writer finds a tail no writer of its own would leave."""
    path = written(13)
    with backend.sql(path) as db:
        db.execute("DELETE FROM checkpoints WHERE seq > 4")
    log = restarted(backend, path, soft)  # the bound: 8 records (two checkpoints' worth)
    assert log.failure is not None
    assert "record 5: records 5 to 13 (9) are under no signed checkpoint" in log.failure
    with pytest.raises(AuditPaused, match="the audit log does not verify"):
        log.check()
    write(log, event(14))  # were a call already running, its record would go in: unsigned
    log.close()
    with backend.sql(path) as db:
        assert db.execute("SELECT MAX(seq) FROM checkpoints").fetchone() == (4,)


def test_a_restart_does_not_sign_over_a_tail_the_witness_contradicts(
    tmp_path: Path,
    soft: SoftKey,
    backend: Backend,
) -> None:
    path, witness = witnessed_log(backend, tmp_path, soft, 10)  # checkpoints 4, 8, 10
    with backend.sql(path) as db:
        db.execute("DELETE FROM checkpoints WHERE seq > 4")
        db.execute("DELETE FROM records WHERE seq > 6")  # cut: short enough for the bound
    log = restarted(backend, path, soft, witnesses=[FileWitness(witness)])
    assert log.failure is not None
    assert "saw a checkpoint at it that the log does not bear out" in log.failure
    log.close()


def test_a_restart_does_not_sign_a_log_whose_pinned_key_it_lost(
    written: Callable[[int], Path],
    soft: SoftKey,
    backend: Backend,
) -> None:
    path = written(6)
    with backend.sql(path) as db:
        db.execute("DELETE FROM audit_key")
    log = restarted(backend, path, soft)
    assert log.failure is not None
    assert "an audit key is pinned, but the log carries none" in log.failure
    log.close()


def test_a_restart_does_not_pin_a_key_only_the_log_names(
    written: Callable[[int], Path], soft: SoftKey, backend: Backend
) -> None:
    """The pin removed: the key the log records may be whoever removed it's. Nothing is pinned
    anew, and nothing signed (review)."""
    path = written(6)
    Path(f"{path}.key.pem").unlink()
    log = restarted(backend, path, soft)
    assert log.failure is not None
    assert "the log has an audit key or checkpoints, but none is pinned" in log.failure
    log.close()
    assert not Path(f"{path}.key.pem").exists()


def test_a_genuine_log_restarts_and_goes_on(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """The positive control of the start check, on a real tail: a crash came after the
    checkpoint at 10 reached the witness and before it reached the store, so records 9 and 10
    are unsigned in the log, and the witness has a newer checkpoint than the log: all genuine."""
    path, witness = witnessed_log(backend, tmp_path, soft, 10)  # checkpoints 4, 8, 10
    with backend.sql(path) as db:
        db.execute("DELETE FROM checkpoints WHERE seq = 10")
    log = restarted(backend, path, soft, witnesses=[FileWitness(witness)])
    assert log.failure is None
    assert write(log, event(11)) == 11
    log.close()
    assert verify_log(backend.location(path), pinned(path), witnesses=[witness]).whole


def test_a_writer_that_crashes_answers_every_call_and_stops_for_good(
    tmp_path: Path,
    soft: SoftKey,
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
) -> None:
    class Boom(BaseException):
        pass

    store = backend.store(tmp_path / "audit.db")
    log = AuditLog(store, checkpoint_every=100, checkpoint_interval=60)
    log.on_change(lambda: (_ for _ in ()).throw(RuntimeError("a listener that fails")))
    log.start(soft.make, tmp_path / "audit.db.key.pem")
    assert write(log, event(1)) == 1

    def explode(records: object) -> None:
        raise Boom()

    monkeypatch.setattr(store, "append", explode)
    with pytest.raises(Unavailable, match=r"writer stopped \(Boom\)"):
        write(log, event(2))
    with pytest.raises(Unavailable, match="writer stopped"):
        log.check()
    log.close()


# --- a crash inside the log's first checkpoint (the SIGKILL tests' defects) ---------------------


class Killed(BaseException):
    """The process dies here (raised where a SIGKILL would land; nothing after it runs)."""


def killed_store(backend: Backend, path: Path) -> AuditStore:
    """A store whose process dies as it would store a checkpoint (before its transaction)."""

    def add_checkpoint(
        self: object, checkpoint: Checkpoint, audit_key: tuple[bytes, bytes] | None = None
    ) -> None:
        raise Killed

    cls = type("KilledStore", (backend.store_class,), {"add_checkpoint": add_checkpoint})
    store: AuditStore = cls(backend.location(path))
    return store


class KilledKey(SoftKey):
    """A token whose signing never returns: the process dies while the token signs."""

    def sign(self, key_id: bytes, mech: SignMechanism, digest: bytes) -> bytes:
        raise Killed


def first_checkpoint_killed(
    path: Path, store: AuditStore, key: SoftKey, witness: Path | None = None
) -> None:
    """Three records, then the log's first checkpoint, in which the process dies; what is on
    disk stays as the kill left it (the dead log writes nothing more)."""
    log = AuditLog(
        store,
        checkpoint_every=100,
        checkpoint_interval=60,
        witnesses=[FileWitness(witness)] if witness else [],
    )
    log.start(key.make, Path(f"{path}.key.pem"))
    for i in (1, 2, 3):
        write(log, event(i))
    with pytest.raises(Killed):
        log.checkpoint()  # the writer's own, run here: it would be at the interval or at stop
    log.failure = "killed (test)"  # the dead process: its close below writes nothing
    log.close()


def restart_and_go_on(
    backend: Backend, path: Path, key: SoftKey, witness: Path | None = None
) -> None:
    """The next start: it vouches for the log, and its first checkpoint is signed with the
    pinned key (adopted, never generated anew: the token is asked for the pinned one)."""
    pin = Path(f"{path}.key.pem")
    before = pin.read_bytes() if pin.exists() else None
    log = AuditLog(
        backend.store(path),
        checkpoint_every=100,
        checkpoint_interval=60,
        witnesses=[FileWitness(witness)] if witness else [],
    )
    log.start(key.make, pin)
    assert log.failure is None
    assert write(log, event(4)) == 4
    log.close()  # the first checkpoint that completes, at stop
    assert log.failure is None
    if before is not None:
        assert pin.read_bytes() == before
        assert key.asked[-1] == (None, SoftKey.der_of(before))
    assert verify_log(
        backend.location(path), pin.read_bytes(), witnesses=[witness] if witness else []
    ).whole
    with backend.sql(path) as db:
        assert db.execute("SELECT seq FROM checkpoints").fetchall() == [(4,)]
        assert db.execute("SELECT public_key FROM audit_key").fetchone() == (key.public_der,)


def test_a_crash_before_the_pin_leaves_no_pin_and_a_young_log(
    tmp_path: Path,
    soft: SoftKey,
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
) -> None:
    """The key generated, its pin written to the file beside the pin but not yet renamed into
    place: no pin (nor a part of one), the log naming no key. The token's object is an orphan
    (signer keys reconcile); the next start makes another key."""
    path = tmp_path / "audit.db"

    def killed(src: object, dst: object) -> None:
        raise Killed

    monkeypatch.setattr("signer._internal.files.os.replace", killed)
    first_checkpoint_killed(path, backend.store(path), soft)
    monkeypatch.undo()
    assert not Path(f"{path}.key.pem").exists()
    assert verify_log(backend.location(path), None).whole  # a young log, nothing pinned
    restart_and_go_on(backend, path, soft)
    assert soft.asked == [(None, None), (None, None)]  # a new key each time: nothing pinned
    assert stat.S_IMODE(Path(f"{path}.key.pem").stat().st_mode) == 0o600


def test_a_crash_after_the_pin_before_the_signature_is_adopted(
    tmp_path: Path,
    soft: SoftKey,
    backend: Backend,
) -> None:
    """Pinned, the token killed inside the signature: a pin the log does not record, no
    checkpoint. verify calls it a log whose first checkpoint never completed; the next start
    adopts the pinned key and records it with its first checkpoint."""
    path = tmp_path / "audit.db"
    dying = KilledKey()
    first_checkpoint_killed(path, backend.store(path), dying)
    pin = Path(f"{path}.key.pem")
    assert pin.read_bytes() == _pem(dying.public_der)
    assert verify_log(backend.location(path), pin.read_bytes()).whole
    with backend.sql(path) as db:
        assert db.execute("SELECT COUNT(*) FROM audit_key").fetchone() == (0,)
    same = SoftKey()
    same.key, same.public_der = dying.key, dying.public_der  # the token's key, alive again
    restart_and_go_on(backend, path, same)


def test_a_crash_after_the_witness_before_the_store_is_adopted(
    tmp_path: Path,
    soft: SoftKey,
    backend: Backend,
) -> None:
    """Signed and witnessed, killed before the store's transaction (which records the key and
    the checkpoint together): the witness has a first checkpoint the log does not; the records
    bear it out, so verify and the start accept it, and the next start adopts the key."""
    path, witness = tmp_path / "audit.db", tmp_path / "witness.jsonl"
    first_checkpoint_killed(path, killed_store(backend, path), soft, witness)
    assert [c.seq for _, c in read_witness(witness)] == [3]
    pin = Path(f"{path}.key.pem").read_bytes()
    assert verify_log(backend.location(path), pin, witnesses=[witness]).whole
    restart_and_go_on(backend, path, soft, witness)
    assert [(c.seq, c.prev) for _, c in read_witness(witness)] == [(3, 0), (4, 0)]


def test_a_first_checkpoint_that_failed_retries_with_the_same_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
) -> None:
    """A pin that cannot be written (a full disk) fails the checkpoint, which is retried with
    the key already generated, not with a new one each time (orphans every retry)."""
    key = SoftKey()
    path = tmp_path / "audit.db"
    log = AuditLog(backend.store(path), checkpoint_every=100, checkpoint_interval=60)
    log.start(key.make, Path(f"{path}.key.pem"))
    write(log, event(1))

    def full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("signer._internal.files.os.replace", full)
    for _ in range(3):
        with pytest.raises(OSError, match="No space"):
            log.checkpoint()
    monkeypatch.undo()
    log.checkpoint()
    log.close()
    assert key.asked == [(None, None)]
    assert verify_log(backend.location(path), pinned(path)).whole


def test_a_pin_emptied_or_damaged_is_refused_by_name(
    written: Callable[[int], Path],
    tmp_path: Path,
    soft: SoftKey,
    backend: Backend,
) -> None:
    """What a pin written in place (truncate, then write) left after a kill: no traceback, a
    refusal naming the pin, by the start and by verify; and a young log's too."""
    path = written(6)
    for damaged in (b"", b"-----BEGIN PUBLIC KEY-----\nMFkw\n"):
        Path(f"{path}.key.pem").write_bytes(damaged)
        assert verify_log(backend.location(path), damaged).first_bad == (
            0,
            "the pinned audit key is no public key (its file emptied or damaged): restore it",
        )
        log = restarted(backend, path, soft)
        assert log.failure is not None
        assert "the pinned audit key is no public key" in log.failure
        log.close()
    young = tmp_path / "young.db"
    log = AuditLog(backend.store(young), checkpoint_every=100, checkpoint_interval=60)
    log.start(soft.make, Path(f"{young}.key.pem"))
    write(log, event(1))
    Path(f"{young}.key.pem").write_bytes(b"")  # emptied after the start
    with pytest.raises(AuditKeyMismatch, match=r"holds no public key \(emptied or damaged\)"):
        log.checkpoint()
    log.close()  # its last checkpoint refused too: stopped for good, nothing signed
    assert log.failure is not None
    assert Path(f"{young}.key.pem").read_bytes() == b""


def test_a_log_that_names_its_key_without_a_checkpoint_is_tampered(
    written: Callable[[int], Path],
    soft: SoftKey,
    backend: Backend,
) -> None:
    """The key is recorded with the first checkpoint, in one transaction: a log that names it
    and has no checkpoint had them removed, for verify and (now) for the start alike."""
    path = written(6)
    with backend.sql(path) as db:
        db.execute("DELETE FROM checkpoints")
    assert verdict_of(backend, path) == (
        1,
        "the log names its audit key, but has no checkpoint (removed)",
    )
    log = restarted(backend, path, soft)
    assert log.failure is not None
    assert "the log names its audit key, but has no checkpoint (removed)" in log.failure
    log.close()


def test_checkpoints_and_key_removed_are_caught_by_a_witness_after_a_stored_one(
    tmp_path: Path,
    soft: SoftKey,
    backend: Backend,
) -> None:
    """Checkpoints and key removed from a log short enough for the bound: it looks like a first
    checkpoint cut short, but the witness saw one that follows a stored checkpoint."""
    path, witness = witnessed_log(backend, tmp_path, soft, 6)  # checkpoints 4, 6
    with backend.sql(path) as db:
        db.execute("DELETE FROM checkpoints")
        db.execute("DELETE FROM audit_key")
    assert verify_log(backend.location(path), pinned(path), witnesses=[witness]).first_bad == (
        6,
        f"the witness {witness.name} (line 2) saw a checkpoint at 6 that follows a stored one, "
        "and the log has neither a checkpoint nor its audit key (removed)",
    )
    log = restarted(backend, path, soft, witnesses=[FileWitness(witness)])
    assert log.failure is not None
    assert "saw a checkpoint at 6 that follows a stored one" in log.failure
    log.close()


def test_a_failed_checkpoint_is_tried_again_as_soon_as_the_writer_is_woken(
    tmp_path: Path,
    backend: Backend,
) -> None:
    """The soak: after the token host came back, calls stayed refused for up to the checkpoint
    interval, since nothing made the writer try the failed checkpoint again. The service wakes
    it when the token is back (an interval of an hour here: only the wake can do it)."""
    key = FlakyKey()
    path = tmp_path / "audit.db"
    log = AuditLog(
        backend.store(path), checkpoint_every=2, checkpoint_interval=3600, max_unsigned_records=8
    )
    changes = Changes(log)
    log.start(key.make, tmp_path / "audit.db.key.pem")
    key.down = True
    assert [write(log, event(i)) for i in (1, 2)] == [1, 2]  # the second makes one due
    assert changes.wait_for(lambda: log._failing is not None)
    key.down = False
    log.wake()
    assert changes.wait_for(lambda: log._failing is None)
    log.close()
    assert verify_log(backend.location(path), pinned(path), max_unsigned_records=8).whole


def test_a_pinned_log_that_holds_nothing_is_refused_at_start(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """Everything of a log removed (records, checkpoints, archives, its key), its pin left: a
    pin is written at a first checkpoint, after records, so this is no young log. The start
    refuses, and verify says why; begun anew at 1, the next start's records would have passed
    for the whole history (the second review of issue 16)."""
    path = tmp_path / "audit.db"
    log = AuditLog(backend.store(path), checkpoint_every=2, checkpoint_interval=60)
    log.start(soft.make, Path(f"{path}.key.pem"))
    for i in range(1, 4):
        write(log, event(i))
    log.close()
    with backend.sql(path) as db:
        for table in ("records", "checkpoints", "audit_key", "archives"):
            db.execute(f"DELETE FROM {table}")
    again = AuditLog(backend.store(path), checkpoint_every=2, checkpoint_interval=60)
    again.start(soft.make, Path(f"{path}.key.pem"))
    assert "the log holds nothing" in (again.failure or "")
    again.close()
    verdict = verify_log(backend.location(path), pinned(path))
    assert verdict.first_bad is not None
    assert "the log holds nothing" in verdict.first_bad[1]


def test_a_pin_whose_directory_cannot_take_the_halt_file_is_refused(
    tmp_path: Path, soft: SoftKey, backend: Backend
) -> None:
    """A stop for good on tampering is written down beside the pin; where it cannot be (a
    read-only mount), it would be forgotten by the next start, which would sign what was
    refused: the start refuses instead, saying why (the second review of issue 16)."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    log = AuditLog(backend.store(tmp_path / "audit.db"), checkpoint_every=2)
    log.start(soft.make, blocked / "audit.key.pem")
    assert "halt file cannot be written beside its pin" in (log.failure or "")
    with pytest.raises(AuditPaused, match="halt file cannot be written"):
        log.check()
    log.close()
