"""Replicas sharing one PostgreSQL key store (issue 16): a read-decide-write on a key holds the
key's lock in the database (``Store.locked``), so what one replica decides is about the state
it acts on, whatever another replica does meanwhile. Two keyrings on two stores of one schema
stand for two replicas; the interleavings are forced with events, never sleeps."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest

from signer._internal import pgstore
from signer._internal.config import Config
from signer._internal.keyring import Keyring
from signer._internal.pgstore import PostgresStore
from signer.errors import FailedPrecondition, Unavailable
from signer.keys import Key, State, Version
from tests.conftest import FakeClock
from tests.unit.fakes import FakeToken

DEADLINE = 10.0


class PausingStore(PostgresStore):
    """Stops in ``get_key``, after reading, until the test lets it go: inside the caller's
    lock, between its read and its decision."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.inside = threading.Event()
        self.go = threading.Event()
        self.pause = False

    def _paused(self) -> None:
        if self.pause:
            self.pause = False
            self.inside.set()
            assert self.go.wait(DEADLINE)

    def get_key(self, name: str) -> Key:
        key = super().get_key(name)
        self._paused()
        return key

    def due_for_destruction(self, now: datetime) -> list[Version]:
        due = super().due_for_destruction(now)
        self._paused()
        return due


@pytest.fixture
def stores(pg_dsn: str) -> Iterator[tuple[PausingStore, PostgresStore]]:
    first, second = PausingStore(pg_dsn), PostgresStore(pg_dsn)
    yield first, second
    first.close()
    second.close()


def waiting_for_a_lock(dsn: str) -> Callable[[], bool]:
    def check() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()
        return bool(row and row[0])

    return check


def until(condition: Callable[[], bool]) -> bool:
    done = threading.Event()
    for _ in range(int(DEADLINE / 0.02)):
        if condition():
            return True
        done.wait(0.02)
    return condition()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_a_decision_on_one_replica_waits_for_the_others_on_the_same_key(
    pg_dsn: str, stores: tuple[PausingStore, PostgresStore]
) -> None:
    """Replica A makes version 2 primary; replica B schedules version 2's destruction. A has
    read the key (v2 enabled, not primary) and not yet written when B starts: B waits for A's
    lock, then reads v2 as primary and refuses (FAILED_PRECONDITION). Without the database's
    lock, B decided on the key as it was before A's write and scheduled the destruction of the
    primary version."""
    token, clock, cfg = FakeToken(), FakeClock(), Config()
    a = Keyring(cfg, token, stores[0], clock)
    b = Keyring(cfg, token, stores[1], clock)
    a.create_key("k", "ec-p256")
    a.rotate("k")
    a.set_primary("k", 1)
    stores[0].pause = True
    first, first_out = in_thread(lambda: a.set_primary("k", 2))
    assert stores[0].inside.wait(DEADLINE)
    second, second_out = in_thread(lambda: b.schedule_destruction("k", 2, 0))
    assert until(waiting_for_a_lock(pg_dsn))
    assert second_out == []  # still waiting while A holds the key
    stores[0].go.set()
    first.join(DEADLINE)
    second.join(DEADLINE)
    assert isinstance(first_out[0], Key)
    assert isinstance(second_out[0], FailedPrecondition), second_out
    assert "primary version" in str(second_out[0])
    key = b.get_key("k")
    assert key.primary == 2
    assert key.version(2).state is State.ENABLED


def test_another_key_is_not_held_up(
    pg_dsn: str, stores: tuple[PausingStore, PostgresStore]
) -> None:
    """The lock is the key's: while A holds key k, B disables key j at once."""
    token, clock, cfg = FakeToken(), FakeClock(), Config()
    a = Keyring(cfg, token, stores[0], clock)
    b = Keyring(cfg, token, stores[1], clock)
    a.create_key("k", "ec-p256")
    b.create_key("j", "ec-p256")
    b.rotate("j")
    stores[0].pause = True
    first, _ = in_thread(lambda: a.rotate("k"))
    assert stores[0].inside.wait(DEADLINE)
    try:
        assert b.disable("j", 1).state is State.DISABLED
    finally:
        stores[0].go.set()
        first.join(DEADLINE)


def test_writes_of_a_holder_whose_lock_was_lost_fail(
    pg_dsn: str, stores: tuple[PausingStore, PostgresStore]
) -> None:
    """The lock's connection cut inside the block (the database restarted, a network cut): the
    server released the lock, so another replica may now decide; every later write of the
    block fails UNAVAILABLE instead of going through on another connection, and the store
    serves again after the block."""
    store = stores[1]
    Keyring(Config(), FakeToken(), store, FakeClock()).create_key("k", "ec-p256")
    with store.locked("key:k"):
        with psycopg.connect(pg_dsn, autocommit=True) as killer:
            killer.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                "WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
            )
        with pytest.raises(Unavailable):
            store.set_state("k", 1, State.DISABLED, None)
    assert store.get_version("k", 1).state is State.ENABLED
    store.set_state("k", 1, State.DISABLED, None)
    assert store.get_version("k", 1).state is State.DISABLED


def test_a_version_due_is_destroyed_once_whichever_replicas_reap(
    pg_dsn: str, stores: tuple[PausingStore, PostgresStore]
) -> None:
    """Every replica runs the reaper. A has listed the versions due when B destroys them all;
    A then decides again under each key's lock, on the version as it is now (destroyed), and
    leaves it: the token is asked to destroy it once."""
    token, clock, cfg = FakeToken(), FakeClock(), Config()
    a = Keyring(cfg, token, stores[0], clock)
    b = Keyring(cfg, token, stores[1], clock)
    a.create_key("k", "ec-p256")
    a.rotate("k")
    a.schedule_destruction("k", 1, 0)
    clock.now += timedelta(seconds=cfg.keys.destruction_waiting_period_seconds + 1)
    stores[0].pause = True
    first, first_out = in_thread(a.reap)
    assert stores[0].inside.wait(DEADLINE)
    assert b.reap() == 1
    stores[0].go.set()
    first.join(DEADLINE)
    assert first_out == [0]
    assert len(token.destroyed) == 1
    assert b.get_key("k").version(1).state is State.DESTROYED


def test_a_key_lock_not_had_in_time_is_unavailable(
    pg_dsn: str, stores: tuple[PausingStore, PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its own wait (KEY_LOCK_WAIT, made short here), not the session's: past it, UNAVAILABLE
    naming the lock, never a raw psycopg error; and the connection serves calls after."""
    monkeypatch.setattr(pgstore, "KEY_LOCK_WAIT", "200ms")
    first, second = stores
    with first.locked("key:k"):
        with pytest.raises(Unavailable, match="a lock was held too long"), second.locked("key:k"):
            pass
        with second.locked("key:j"):  # another key: at once
            pass


def test_no_connection_for_a_key_lock_in_time_is_unavailable(
    stores: tuple[PausingStore, PostgresStore],
) -> None:
    """Every pooled connection busy: the lock's checkout times out UNAVAILABLE (it was a raw
    PoolTimeout, an INTERNAL with a traceback)."""
    store = stores[1]
    with contextlib.ExitStack() as busy:
        for _ in range(store._pool.max_size):
            busy.enter_context(store._pool.connection())
        with (
            pytest.raises(Unavailable, match="no database connection in time"),
            store.locked("key:k"),
        ):
            pass
