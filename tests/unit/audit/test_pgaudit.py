"""What only the audit log on PostgreSQL has (issue 16): its schema through the key store's
schema_version; a lost connection failing closed and recovering; a COMMIT cut off, read back
before its calls are answered; a read-only server refused in one line; the CLI on a URL. The
log's contract itself, tamper cases first, is tested on both stores by every other file here."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from signer._internal.audit import AuditLog, open_audit_store, verify_log
from signer._internal.audit._chain import Checkpoint
from signer._internal.audit._log import NOT_ANSWERED
from signer._internal.audit._pgstore import AUDIT_MIGRATIONS, PostgresAuditStore
from signer._internal.pgstore import PostgresStore
from signer.errors import FailedPrecondition, Unavailable
from tests.pgproxy import CommitCutter, commit_cutter
from tests.postgres import Cluster
from tests.unit.audit.fakes import SoftKey, event, write


def test_the_schema_is_migrated_through_schema_version(
    pg_dsn: str, pg_connect: Callable[[], Any]
) -> None:
    """Created by the service, beside the key store's, in the same version table; a second
    start changes nothing; a database newer than the code is refused, by the writer and by
    verify."""
    PostgresAuditStore(pg_dsn).close()
    PostgresStore(pg_dsn).close()
    PostgresAuditStore(pg_dsn).close()
    conn = pg_connect()
    rows = conn.execute("SELECT component, version FROM schema_version ORDER BY 1").fetchall()
    assert rows == [("audit", AUDIT_MIGRATIONS[-1][0]), ("store", rows[1][1])]
    conn.execute("UPDATE schema_version SET version = version + 1 WHERE component = 'audit'")
    with pytest.raises(FailedPrecondition, match="newer than this"):
        PostgresAuditStore(pg_dsn)
    with pytest.raises(FailedPrecondition, match="newer than this"):
        verify_log(pg_dsn, None)


def test_a_database_without_a_log_is_no_log(pg_dsn: str) -> None:
    with pytest.raises(FileNotFoundError):
        open_audit_store(pg_dsn, read_only=True)
    with pytest.raises(Exception, match="no audit log at postgresql://"):
        verify_log(pg_dsn, None)


def test_a_lost_connection_fails_closed_and_the_log_recovers(
    pg_dsn: str, pg_connect: Callable[[], Any], tmp_path: Path, soft: SoftKey
) -> None:
    """The writer's connection killed (the server restarted, a network cut): the call whose
    record could not be written is answered UNAVAILABLE, its record kept; the writer connects
    again by itself, writes it saying so, and the chain goes on and verifies."""
    store = PostgresAuditStore(pg_dsn)
    log = AuditLog(store, checkpoint_every=100, checkpoint_interval=60)
    pin = tmp_path / "audit.key.pem"
    log.start(soft.make, pin)
    assert write(log, event(1)) == 1
    pid = store._connection().info.backend_pid
    pg_connect().execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(Unavailable, match="the audit log cannot be written"):
        write(log, event(2))
    for _ in range(100):  # retried every RETRY_SECONDS
        if log._write_failing is None:
            break
        threading.Event().wait(0.05)
    assert log._write_failing is None
    assert write(log, event(3)) == 3
    log.close()
    assert verify_log(pg_dsn, pin.read_bytes()).whole
    assert statuses(pg_dsn) == [(1, "OK"), (2, "OK" + NOT_ANSWERED), (3, "OK")]


def statuses(dsn: str) -> list[tuple[int, str]]:
    reader = open_audit_store(dsn, read_only=True)
    try:
        return [(r.seq, r.event.status) for r in reader.records()]
    finally:
        reader.close()


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "rolled-back"])
def test_a_commit_cut_off_is_read_back_before_its_calls_are_answered(
    pg_dsn: str, tmp_path: Path, soft: SoftKey, landed: bool
) -> None:
    """The connection cut during COMMIT, after the server committed (landed) or before it saw
    the COMMIT (rolled back), through a relay that cuts it there (tests/pgproxy.py). The writer
    reads back which: landed, the call is answered OK and its record is there once; rolled
    back, it is answered UNAVAILABLE and its record written again saying so. Either way the
    log tells the truth about every call, and verifies. (A rewrite at new seqs, as SQLite's
    over its WAL, left an OK record for a call answered UNAVAILABLE: REVIEW.md 3.)"""
    with commit_cutter(pg_dsn) as cutter:
        log = AuditLog(PostgresAuditStore(cutter.dsn), checkpoint_every=100)
        pin = tmp_path / "audit.key.pem"
        log.start(soft.make, pin)
        assert write(log, event(1)) == 1
        cutter.cut(landed)
        if landed:
            assert write(log, event(2)) == 2
        else:
            with pytest.raises(Unavailable, match="outcome is unknown"):
                write(log, event(2))
        assert cutter.cuts == 1
        assert write(log, event(3)) == 3
        log.close()
    assert verify_log(pg_dsn, pin.read_bytes()).whole
    second = "OK" if landed else "OK" + NOT_ANSWERED
    assert statuses(pg_dsn) == [(1, "OK"), (2, second), (3, "OK")]


def test_a_read_only_server_is_refused_in_one_line(
    pg_cluster: Cluster, pg_dsn: str, pg_connect: Callable[[], Any]
) -> None:
    """A standby, or a database made read-only, behind the log's name: the writer does not
    connect (target_session_attrs=read-write), and says so in one line naming the class and
    SQLSTATE, never the server's host, port or role (it goes into refused calls' statuses).
    verify still reads it."""
    PostgresAuditStore(pg_dsn).close()
    conn = pg_connect()
    conn.execute("ALTER DATABASE postgres SET default_transaction_read_only = on")
    try:
        with pytest.raises(Unavailable) as err:
            PostgresAuditStore(pg_dsn)
        message = str(err.value)
        assert message.startswith("the audit database cannot be used (OperationalError")
        assert "\n" not in message
        assert str(pg_cluster.dir) not in message
        assert "postgres" not in message.replace("the audit database", "")
        open_audit_store(pg_dsn, read_only=True).close()
    finally:
        conn.execute("ALTER DATABASE postgres RESET default_transaction_read_only")


def test_signer_audit_log_verify_takes_a_database_url(
    pg_dsn: str, tmp_path: Path, soft: SoftKey, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same command on the database: --db a URL, the pin and archives named (files)."""
    from signer.cli.main import main

    log = AuditLog(PostgresAuditStore(pg_dsn), checkpoint_every=4, checkpoint_interval=60)
    pin = tmp_path / "audit.key.pem"
    log.start(soft.make, pin)
    for i in range(1, 7):
        write(log, event(i))
    log.close()
    args = ["audit-log", "verify", "--db", pg_dsn, "--archive-dir", str(tmp_path / "archive")]
    assert main([*args, "--public-key", str(pin)]) == 0
    assert "is whole: 6 records, 2 signed checkpoints" in capsys.readouterr().out
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE records SET status = 'PERMISSION_DENIED' WHERE seq = 5")
    assert main([*args, "--public-key", str(pin)]) != 0
    assert "first bad record 5: its contents do not match its hash" in capsys.readouterr().out
    assert main(args) != 0  # no --public-key beside a URL
    assert "give --archive-dir and --public-key" in capsys.readouterr().err


def test_a_writer_whose_connection_went_half_open_takes_its_lock_back(
    pg_dsn: str, pg_connect: Callable[[], Any], tmp_path: Path, soft: SoftKey
) -> None:
    """The writer's connection lost without the server noticing (a network cut: its session,
    writer lock and all, lives on until a keepalive gives up, hours by default). Connecting
    again, the writer ends that session of its own, takes its lock back and writes what it
    kept; it used to wait for the lock, fail, and wait again, refusing every call meanwhile
    (the review's finding 2)."""
    with commit_cutter(pg_dsn) as cutter:
        store = PostgresAuditStore(cutter.dsn)
        log = AuditLog(store, checkpoint_every=100)
        pin = tmp_path / "audit.key.pem"
        log.start(soft.make, pin)
        assert write(log, event(1)) == 1
        old = store._backend
        cutter.strand()
        with pytest.raises(Unavailable, match="the audit log cannot be written"):
            write(log, event(2))
        done = threading.Event()
        for _ in range(200):  # the writer retries every RETRY_SECONDS
            if log._write_failing is None:
                break
            done.wait(0.05)
        assert log._write_failing is None
        assert write(log, event(3)) == 3
        assert store._backend != old
        gone = (
            pg_connect()
            .execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (old,))
            .fetchone()
        )
        assert gone == (0,)
        log.close()
    assert verify_log(pg_dsn, pin.read_bytes()).whole
    assert statuses(pg_dsn) == [(1, "OK"), (2, "OK" + NOT_ANSWERED), (3, "OK")]


class ArmingWitness:
    """A witness that arms the relay as a checkpoint is about to be stored: the next COMMIT
    cut is the checkpoint's (the witness is written just before the store)."""

    def __init__(self, cutter: CommitCutter, landed: bool) -> None:
        self.cutter, self.landed, self.armed = cutter, landed, False

    def write(self, checkpoint: Checkpoint) -> None:
        if not self.armed:
            self.armed = True
            self.cutter.cut(self.landed)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("every", [2, 6], ids=["early", "prepared"])
@pytest.mark.parametrize("landed", [True, False], ids=["landed", "rolled-back"])
def test_a_checkpoint_cut_off_is_read_back_before_the_next(
    pg_dsn: str, tmp_path: Path, soft: SoftKey, landed: bool, every: int
) -> None:
    """A checkpoint's COMMIT cut: it fails (retried), and before the next the writer reads
    back whether it is the log's newest. Landed: it stands, and the next follows it. Rolled
    back: signed again. Either way the log goes on and verifies; the next checkpoint used to
    follow the one before the cut one, was refused as another writer's, and stopped the log
    for good over a network blip (the review's finding 1)."""
    with commit_cutter(pg_dsn) as cutter:
        witness = ArmingWitness(cutter, landed)
        store = PostgresAuditStore(cutter.dsn)
        log = AuditLog(store, checkpoint_every=every, witnesses=[witness])
        pin = tmp_path / "audit.key.pem"
        log.start(soft.make, pin)
        # After psycopg's prepare_threshold (5) uses, COMMIT goes as a prepared statement: the
        # relay must cut that too ("prepared").
        for i in range(1, every + 1):
            assert write(log, event(i)) == i  # the last one's checkpoint's COMMIT is cut
        done = threading.Event()
        for _ in range(200):
            if cutter.cuts:
                break
            done.wait(0.02)
        assert cutter.cuts == 1
        for i in range(every + 1, 2 * every + 3):
            assert write(log, event(i)) == i
        log.close()
        assert log.failure is None
    v = verify_log(pg_dsn, pin.read_bytes())
    assert v.whole, v.first_bad
    assert v.last_checkpoint == 2 * every + 2
    reader = open_audit_store(pg_dsn, read_only=True)
    try:
        signed = [c.seq for c in reader.checkpoints()]
    finally:
        reader.close()
    # Landed: the cut one stands, and the next followed it. Not: it is not there.
    assert (every in signed) is landed, signed
