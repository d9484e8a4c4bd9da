"""signer._internal.token._pool: the key-handle cache of a token session is bounded, least
recently used first out; a connection given up wakes every thread waiting for its sessions."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from signer._internal.config import TokenConfig
from signer._internal.token._pool import SessionPool, Slot, _Connection, _Handles
from signer._internal.token.pin import Pin
from signer.errors import Unavailable


def test_the_handle_cache_keeps_its_most_recently_used() -> None:
    """The soak: the administrative connection's sessions kept a handle for every key they
    ever made (0.5 MiB a minute under lifecycle churn). Now at most ``most`` per session."""
    cache = _Handles(3)
    for i in range(5):
        cache[bytes([i])] = i
    assert list(cache) == [b"\x02", b"\x03", b"\x04"]
    assert cache.get(b"\x02") == 2  # used: now the most recent
    cache[b"\x05"] = 5
    assert list(cache) == [b"\x04", b"\x02", b"\x05"]
    assert cache.get(b"\x00") is None


# --- a connection given up wakes the threads waiting for its sessions -------------------------


LOST = "lost the token host (DeviceError)"


class _Queue(queue.Queue[Slot | None]):
    """A queue of free sessions that says when a thread has come to wait on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None) -> Slot | None:
        self.waiting.set()
        return super().get(block, timeout)


class _Session:
    """Stands in for a python-pkcs11 session: the pool only hands it out and takes it back."""

    def close(self) -> None:
        pass


def _pool_with(tmp_path: Path, sessions: int) -> tuple[SessionPool, _Connection]:
    """A pool holding a connection of ``sessions`` fake sessions, as _connect leaves it (no
    module is loaded: what is tested is the queue of free sessions)."""
    pin = tmp_path / "pin"
    pin.write_bytes(b"1234")
    pool = SessionPool(TokenConfig(sessions=sessions), Pin(pin))
    slots = [Slot(_Session()) for _ in range(sessions)]
    free = _Queue()
    for slot in slots:
        free.put(slot)
    conn = _Connection(token=None, slots=slots, free=free, mechanisms=frozenset(), label="t")
    pool._conn = conn
    return pool, conn


def _hold(conn: _Connection) -> Slot | None:
    """One of ``conn``'s sessions, taken as a call in the module holds it."""
    free = conn.free
    assert isinstance(free, _Queue)
    slot = free.get()
    free.waiting.clear()  # this was not a waiter
    return slot


def _waiting(conn: _Connection) -> bool:
    """Whether a thread came to wait for one of ``conn``'s sessions (within 10 s)."""
    free = conn.free
    assert isinstance(free, _Queue)
    return free.waiting.wait(10)


def _borrow(pool: SessionPool, outcome: queue.Queue[str]) -> threading.Thread:
    def run() -> None:
        try:
            with pool._session():
                outcome.put("borrowed")
        except Unavailable as exc:
            outcome.put(f"UNAVAILABLE: {exc.message}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_thread_about_to_borrow_when_the_connection_is_taken_back_answers_unavailable(
    tmp_path: Path,
) -> None:
    """The soak's hang: a call had read the connection and was about to take a session when
    the token host died; the monitor marked the connection down and took every session back
    for good, and the call waited for ever on an empty queue (a RotateKey, then SIGTERM, since
    the admin pool's thread never ended). Forced here: the call is held between reading the
    connection and borrowing, the sessions are taken back, then the call goes on."""
    pool, conn = _pool_with(tmp_path, sessions=2)
    read_it, go_on = threading.Event(), threading.Event()

    def held_check() -> None:
        read_it.set()
        go_on.wait(10)

    pool.check_answering = held_check  # type: ignore[method-assign]
    outcome: queue.Queue[str] = queue.Queue()
    thread = _borrow(pool, outcome)
    assert read_it.wait(10)
    pool._mark_down(conn, LOST)
    assert pool._drain(conn, timeout=1.0)
    go_on.set()
    thread.join(10)
    assert not thread.is_alive(), "the call waits for ever for a session of a dead connection"
    assert outcome.get_nowait() == f"UNAVAILABLE: token unavailable: {LOST}"


@dataclass
class _Queued:
    """Calls queued for the one session of a connection, which a call in the module holds
    (for good, as a thread stuck in p11-kit-client), when the connection is marked down."""

    pool: SessionPool
    conn: _Connection
    outcome: queue.Queue[str]
    threads: list[threading.Thread]

    def answers(self) -> list[str]:
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive(), "a call waits for ever for a session"
        return [self.outcome.get_nowait() for _ in self.threads]


def _queued(tmp_path: Path, calls: int = 1) -> _Queued:
    pool, conn = _pool_with(tmp_path, sessions=1)
    assert _hold(conn) is not None
    outcome: queue.Queue[str] = queue.Queue()
    threads = [_borrow(pool, outcome) for _ in range(calls)]
    assert _waiting(conn)
    pool._mark_down(conn, LOST)
    return _Queued(pool, conn, outcome, threads)


def test_every_thread_queued_for_a_session_of_an_abandoned_connection_answers(
    tmp_path: Path,
) -> None:
    """Several calls queued for the one session (more admin threads than admin sessions) when
    the connection is abandoned: each answers, none is left waiting (GONE is passed on)."""
    queued = _queued(tmp_path, calls=3)
    queued.pool._abandon_dead()
    assert queued.answers() == [f"UNAVAILABLE: token unavailable: {LOST}"] * 3


def test_a_waiter_moves_to_a_new_connection_once(tmp_path: Path) -> None:
    """Waiting on the old connection when it was given up, with a new one up by then: the call
    borrows from the new one (nothing had reached the token yet) rather than failing."""
    queued = _queued(tmp_path)
    _, new = _pool_with(tmp_path, sessions=1)
    queued.pool._conn = new  # as _try_connect leaves it after a reconnect
    queued.conn.give_up()
    assert queued.answers() == ["borrowed"]


def test_close_wakes_waiters_of_a_dead_connection(tmp_path: Path) -> None:
    """The review's path: the token host gone, a session held for good by a stuck thread, a
    call queued; the monitor never drains (the main connection stays down); SIGTERM closes
    the pool: the queued call answers instead of holding shutdown for ever."""
    queued = _queued(tmp_path)
    queued.pool.close()
    assert queued.answers() == [f"UNAVAILABLE: token unavailable: {LOST}"]


def test_a_waiter_notices_its_connection_went_down_without_being_given_up(
    tmp_path: Path,
) -> None:
    """The backstop: a connection marked down whose sessions are all held (no drain yet, no
    abandon): a call waiting for one answers within the borrow check, not never."""
    queued = _queued(tmp_path)
    assert queued.answers() == [f"UNAVAILABLE: token unavailable: {LOST}"]


def test_a_drain_that_times_out_gives_the_sessions_back(tmp_path: Path) -> None:
    """A session still held: the drain fails, what it took goes back, the connection is not
    given up, and the next borrower gets a session (not GONE)."""
    pool, conn = _pool_with(tmp_path, sessions=2)
    held = _hold(conn)
    assert not pool._drain(conn, timeout=0.05)
    conn.free.put(held)
    outcome: queue.Queue[str] = queue.Queue()
    _borrow(pool, outcome).join(10)
    assert outcome.get_nowait() == "borrowed"
