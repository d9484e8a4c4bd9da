"""What only the audit log on PostgreSQL has (issue 16): one chain that several writers append
to, serialised by the chain's lock; its schema through the key store's schema_version; a lost
connection failing closed and recovering; a COMMIT cut off named as of unknown outcome. The
log's contract itself, tamper cases first, is tested on both stores by every other file here."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from signer._internal.audit import AuditLog, open_audit_store, verify_log
from signer._internal.audit._log import NOT_ANSWERED
from signer._internal.audit._pgstore import (
    AUDIT_MIGRATIONS,
    AuditCommitUnknown,
    PostgresAuditStore,
)
from signer._internal.audit._store import left_behind
from signer._internal.pgstore import PostgresStore
from signer.errors import FailedPrecondition, Unavailable
from tests.unit.audit.fakes import SoftKey, event, write


@pytest.fixture
def connect(pg_dsn: str) -> Iterator[Callable[[], psycopg.Connection[tuple[Any, ...]]]]:
    opened: list[psycopg.Connection[tuple[Any, ...]]] = []

    def make() -> psycopg.Connection[tuple[Any, ...]]:
        conn = psycopg.connect(pg_dsn, autocommit=True)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


def test_writers_of_one_chain_serialise_on_its_lock(pg_dsn: str) -> None:
    """Four writers (replicas' stores) appending batches at once: one chain, every seq once,
    every record chained to the one before, whoever wrote it (the head is read under the lock,
    in the transaction that inserts)."""
    stores = [PostgresAuditStore(pg_dsn) for _ in range(4)]
    got: list[list[int]] = [[] for _ in stores]

    def append(n: int) -> None:
        for i in range(25):
            records = stores[n].append_events([event(1000 * n + 10 * i + j) for j in range(4)])
            got[n] += [r.seq for r in records]

    threads = [threading.Thread(target=append, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert sorted(seq for seqs in got for seq in seqs) == list(range(1, 401))
    v = verify_log(pg_dsn, None)  # no checkpoint: the chain alone
    assert v.whole, v.first_bad
    assert v.records == 400


def test_the_schema_is_migrated_through_schema_version(
    pg_dsn: str, connect: Callable[[], Any]
) -> None:
    """Created by the service, beside the key store's, in the same version table; a second
    start changes nothing; a database newer than the code is refused, by the writer and by
    verify."""
    PostgresAuditStore(pg_dsn).close()
    PostgresStore(pg_dsn).close()
    PostgresAuditStore(pg_dsn).close()
    conn = connect()
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
    pg_dsn: str, connect: Callable[[], Any], tmp_path: Path, soft: SoftKey
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
    connect().execute("SELECT pg_terminate_backend(%s)", (pid,))
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
    reader = open_audit_store(pg_dsn, read_only=True)
    try:
        statuses = [(r.seq, r.event.status) for r in reader.records()]
    finally:
        reader.close()
    assert statuses == [(1, "OK"), (2, "OK" + NOT_ANSWERED), (3, "OK")]


def test_a_commit_cut_off_is_of_unknown_outcome(
    pg_dsn: str, connect: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection lost during COMMIT: the records may be in (left_behind says so, and the
    log writes its kept copies at once, saying how the calls were answered)."""
    store = PostgresAuditStore(pg_dsn)
    killer = connect()
    real = psycopg.Connection.execute

    def execute(self: psycopg.Connection[Any], query: Any, *args: Any, **kw: Any) -> Any:
        if query == "COMMIT":
            killer.execute("SELECT pg_terminate_backend(%s)", (self.info.backend_pid,))
        return real(self, query, *args, **kw)

    try:
        monkeypatch.setattr(psycopg.Connection, "execute", execute)
        with pytest.raises(AuditCommitUnknown, match="outcome unknown") as err:
            store.append_events([event(1)])
        monkeypatch.undo()
        assert left_behind(err.value)
        assert store.append_events([event(2)])[0].seq in (1, 2)  # connected again
    finally:
        store.close()


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
