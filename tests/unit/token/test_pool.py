"""signer._internal.token._pool: the key-handle cache of a token session is bounded, least
recently used first out; a connection given up wakes every thread waiting for its sessions."""

from __future__ import annotations

import queue
import threading
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
    free: queue.Queue[Slot | None] = queue.Queue()
    for slot in slots:
        free.put(slot)
    conn = _Connection(token=None, slots=slots, free=free, mechanisms=frozenset(), label="t")
    pool._conn = conn
    return pool, conn


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


def test_every_thread_queued_for_a_session_of_a_connection_given_up_answers(
    tmp_path: Path,
) -> None:
    """Several calls queued for the one session (more admin threads than admin sessions) when
    the connection is given up: each answers, none is left waiting (GONE is passed on)."""
    pool, conn = _pool_with(tmp_path, sessions=1)
    held = conn.free.get()  # a call in the module holds the only session
    outcome: queue.Queue[str] = queue.Queue()
    threads = [_borrow(pool, outcome) for _ in range(3)]
    pool._mark_down(conn, LOST)
    conn.give_up()  # as _abandon_dead does: the held session never comes back
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    answers = [outcome.get_nowait() for _ in threads]
    assert answers == [f"UNAVAILABLE: token unavailable: {LOST}"] * 3
    assert held is not None


def test_a_drain_that_times_out_gives_the_sessions_back(tmp_path: Path) -> None:
    """A session still held: the drain fails, what it took goes back, the connection is not
    given up, and the next borrower gets a session (not GONE)."""
    pool, conn = _pool_with(tmp_path, sessions=2)
    held = conn.free.get()
    assert not pool._drain(conn, timeout=0.05)
    conn.free.put(held)
    outcome: queue.Queue[str] = queue.Queue()
    _borrow(pool, outcome).join(10)
    assert outcome.get_nowait() == "borrowed"
