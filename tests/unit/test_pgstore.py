"""What only the PostgreSQL store has (issue 16): its schema migrated by the service under an
advisory lock, its faults mapped to UNAVAILABLE, recovery after the server stops and starts.
The store's contract itself is tested on both stores in test_store.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool.pool
import pytest
from psycopg_pool.base import AttemptWithBackoff

from signer._internal import pgstore
from signer._internal.pgstore import (
    RECONNECT_MAX_SECONDS,
    STORE_MIGRATIONS,
    PostgresStore,
    migrate,
    xact_lock,
)
from signer._internal.store import open_store
from signer.errors import FailedPrecondition, StoreUncertain, Unavailable
from signer.keys import State
from tests.postgres import Cluster
from tests.unit.test_store import key

NEWEST = STORE_MIGRATIONS[-1][0]


@pytest.fixture
def connect(pg_dsn: str) -> Iterator[Callable[[], psycopg.Connection[tuple[Any, ...]]]]:
    """``connect()``: an autocommit connection to the test's schema, closed after the test."""
    opened: list[psycopg.Connection[tuple[Any, ...]]] = []

    def make() -> psycopg.Connection[tuple[Any, ...]]:
        conn = psycopg.connect(pg_dsn, autocommit=True)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


def tables(conn: psycopg.Connection[tuple[Any, ...]]) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    ).fetchall()
    return {r[0] for r in rows}


def versions(conn: psycopg.Connection[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT component, version FROM schema_version").fetchall()


def test_migrates_an_empty_database(pg_dsn: str, connect: Callable[[], Any]) -> None:
    conn = connect()
    assert tables(conn) == set()
    PostgresStore(pg_dsn).close()
    assert tables(conn) == {"schema_version", "keys", "versions", "import_tokens"}
    assert versions(conn) == [("store", NEWEST)]
    # Names and scopes compare as bytes, as SQLite's do, whatever the database's collation.
    collations = conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND collation_name = 'C'"
    ).fetchall()
    assert {("keys", "name"), ("keys", "scope"), ("versions", "name")} <= set(collations)


def test_migrating_again_changes_nothing(pg_dsn: str, connect: Callable[[], Any]) -> None:
    s = PostgresStore(pg_dsn)
    s.create_key(key("kept"))
    s.close()
    conn = connect()
    assert migrate(conn, "store", STORE_MIGRATIONS) == NEWEST
    assert migrate(conn, "store", STORE_MIGRATIONS) == NEWEST
    assert versions(conn) == [("store", NEWEST)]
    s = PostgresStore(pg_dsn)
    try:
        assert s.get_key("kept").name == "kept"
    finally:
        s.close()


def test_a_second_migrator_waits_for_the_first(pg_dsn: str, connect: Callable[[], Any]) -> None:
    first = connect()
    done: list[PostgresStore | BaseException] = []

    def second() -> None:
        try:
            done.append(PostgresStore(pg_dsn))
        except BaseException as exc:
            done.append(exc)

    with first.transaction():
        xact_lock(first, "migrate")
        thread = threading.Thread(target=second)
        thread.start()
        # The second store's migration waits on the lock the first holds.
        deadline = time.monotonic() + 10
        while not _waiting_for_lock(connect()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _waiting_for_lock(connect())
        assert done == []
        assert migrate(first, "store", STORE_MIGRATIONS) == NEWEST
    thread.join(10)
    (store,) = done
    assert isinstance(store, PostgresStore), store
    try:
        store.create_key(key("after"))
        assert versions(first) == [("store", NEWEST)]
    finally:
        store.close()


def _waiting_for_lock(conn: psycopg.Connection[tuple[Any, ...]]) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    ).fetchone()
    return bool(row and row[0])


def test_replicas_starting_together_migrate_once(pg_dsn: str, connect: Callable[[], Any]) -> None:
    n = 4
    barrier = threading.Barrier(n)
    results: list[PostgresStore | BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            results.append(PostgresStore(pg_dsn))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stores = [r for r in results if isinstance(r, PostgresStore)]
    try:
        assert len(stores) == n, results
        assert versions(connect()) == [("store", NEWEST)]
    finally:
        for s in stores:
            s.close()


def test_a_newer_database_is_refused(pg_dsn: str, connect: Callable[[], Any]) -> None:
    PostgresStore(pg_dsn).close()
    connect().execute("UPDATE schema_version SET version = %s", (NEWEST + 1,))
    with pytest.raises(FailedPrecondition, match=f"version {NEWEST + 1}, newer than this"):
        PostgresStore(pg_dsn)


def test_the_pools_reconnect_backoff_is_capped() -> None:
    # psycopg_pool has no setting for it: pgstore replaces a private name (pinned here, and by
    # the bound on psycopg-pool in pyproject.toml).
    assert psycopg_pool.pool.AttemptWithBackoff is pgstore._CappedBackoff  # type: ignore[attr-defined]
    attempt = pgstore._CappedBackoff(timeout=300.0)
    delays = []
    for now in range(10):
        attempt.update_delay(float(now))
        delays.append(attempt.delay)
    assert max(delays) <= RECONNECT_MAX_SECONDS
    assert issubclass(pgstore._CappedBackoff, AttemptWithBackoff)


def test_faults_map_to_unavailable() -> None:
    table = dict(pgstore.ERRORS)
    assert table[psycopg.OperationalError] is Unavailable
    for theirs in (
        psycopg_pool.PoolTimeout,
        psycopg.errors.AdminShutdown,
        psycopg.errors.CannotConnectNow,
        psycopg.errors.LockNotAvailable,
        psycopg.errors.QueryCanceled,
        psycopg.errors.DiskFull,
        psycopg.errors.IoError,
        psycopg.errors.SerializationFailure,
    ):
        assert issubclass(theirs, psycopg.OperationalError), theirs
        unavailable = pytest.raises(Unavailable, match=r"^the key store cannot be used \(boom\)$")
        with unavailable, pgstore.mapped_errors():
            raise theirs("boom\nDETAIL: more")
    with pytest.raises(psycopg.errors.UniqueViolation), pgstore.mapped_errors():
        raise psycopg.errors.UniqueViolation("left to the method")


def test_a_commit_whose_connection_broke_is_uncertain(
    pg_dsn: str, connect: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection lost during COMMIT: whether the write is on record is unknown, as for the
    SQLite store's COMMIT that failed with an I/O error."""
    store = PostgresStore(pg_dsn)
    killer = connect()
    real = psycopg.Connection.execute

    def execute(self: psycopg.Connection[Any], query: Any, *args: Any, **kw: Any) -> Any:
        if query == "COMMIT":
            killer.execute("SELECT pg_terminate_backend(%s)", (self.info.backend_pid,))
        return real(self, query, *args, **kw)

    try:
        store.create_key(key("k"))
        monkeypatch.setattr(psycopg.Connection, "execute", execute)
        with pytest.raises(StoreUncertain, match="the key store cannot be used"):
            store.set_state("k", 1, State.DISABLED, None)
        monkeypatch.undo()
        # The broken connection left the pool; the store goes on.
        assert store.get_version("k", 1).state is State.ENABLED
    finally:
        store.close()


def test_calls_fail_unavailable_while_the_server_is_down_and_recover(
    pg_cluster: Cluster, pg_dsn: str
) -> None:
    store = open_store(pg_dsn)
    try:
        store.create_key(key("k"))
        pg_cluster.stop()
        try:
            with pytest.raises(Unavailable, match="the key store cannot be used"):
                store.get_version("k", 0)
            with pytest.raises(Unavailable, match="the key store cannot be used"):
                store.set_state("k", 1, State.DISABLED, None)
        finally:
            pg_cluster.start()
        # No reopening: the pool reconnects by itself, within its capped backoff.
        started = time.monotonic()
        while True:
            try:
                assert store.get_version("k", 0).state is State.ENABLED
                break
            except Unavailable:
                assert time.monotonic() - started < 5, "the store did not recover"
                time.sleep(0.05)
        store.set_state("k", 1, State.DISABLED, None)
        assert store.get_version("k", 1).state is State.DISABLED
    finally:
        store.close()
