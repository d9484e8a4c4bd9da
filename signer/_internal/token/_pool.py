"""The connection to the token: its session pool and the health monitor that keeps it up.

Session and lock policy (issue #2, "concurrency, correctly")
------------------------------------------------------------
* One module instance (one ``C_Initialize``), logged in once, with a fixed pool of read-write
  sessions. Each session is used by one thread at a time: a thread borrows it from a queue for one
  operation and gives it back. No session is ever shared between threads, so two threads never
  run ``C_FindObjectsInit`` or ``C_SignInit`` on the same session (the cause of the GeneralError
  seen when threads shared a session).
* python-pkcs11 calls ``C_Initialize(NULL)``: no locking callbacks, no ``CKF_OS_LOCKING_OK``. A
  module is then entitled to assume it is called from one thread at a time; SoftHSM2 takes that
  literally and disables its mutexes (the in-process segfault with 4 threads). p11-kit's client
  locks internally whatever the flags, so the pool is concurrent for it; for any other module the
  pool has one session and every call is serialised (``token.thread_safe`` overrides this).
* Object handles are looked up once per (session, key) and cached on the session: no object
  search per signature. A reconnect starts with empty caches, because handles are only valid
  within the connection (each p11-kit connection is served by its own ``p11-kit-remote``).
* A lost token host (DeviceError and friends) marks the connection down at once, so calls fail
  fast with UNAVAILABLE; a monitor thread reconnects, logs in again and flips health back.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11e
from pkcs11 import _pkcs11 as _p11

from signer._internal.config import TokenConfig
from signer._internal.metrics import OFF, SIGNING, Metrics
from signer._internal.token._direct import DirectSign
from signer._internal.token._errors import CONNECTION_LOST, PIN_REFUSED, STALE_HANDLE, map_errors
from signer._internal.token._logins import LoginGuard
from signer._internal.token.pin import Pin
from signer._internal.token.uri import TokenURI
from signer.errors import ConfigError, FailedPrecondition, LoginRefused, SignerError, Unavailable

log = logging.getLogger("signer.token")  # named for the component: signer._internal.logs


@dataclass
class Slot:
    """One pooled session and the private-key objects already found on it: at most
    ``_KEYS_PER_SESSION``, the least recently used going first (the soak: the administrative
    connection's sessions kept a handle for every key, import and wrapping key they ever made,
    about 3 KB each, since destruction runs on the other connection)."""

    session: Any
    keys: _Handles = field(default_factory=lambda: _Handles(_KEYS_PER_SESSION))
    # Signs on this connection in two calls, or None: python-pkcs11 signs (:mod:`._direct`).
    direct: DirectSign | None = None


_KEYS_PER_SESSION = 256

# A dead connection's calls fail at once (its socket is gone): a session not back this long
# after is held by a thread stuck in the module for good (see SessionPool._abandon_dead).
ABANDON_AFTER_SECONDS = 5.0
# How often a call waiting for a session looks whether its connection is still the one.
_BORROW_CHECK_SECONDS = 0.5


class _Handles(OrderedDict[bytes, Any]):
    """A dict of key handles that keeps its ``most`` most recently used."""

    def __init__(self, most: int) -> None:
        super().__init__()
        self.most = most

    def get(self, key: bytes, default: Any = None) -> Any:
        found = super().get(key, default)
        if found is not default:
            self.move_to_end(key)
        return found

    def __setitem__(self, key: bytes, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.most:
            self.popitem(last=False)


@dataclass
class _Connection:
    token: Any
    slots: list[Slot]
    # The sessions not in a thread's hands, and, once the connection is given up, GONE.
    free: queue.Queue[Slot | None]
    mechanisms: frozenset[int]
    label: str

    gone: bool = False

    def give_up(self) -> None:
        """Wakes every thread waiting for one of this connection's sessions, now and later,
        with GONE: it answers UNAVAILABLE rather than wait for a session nobody gives back."""
        self.gone = True
        self.free.put(GONE)


# In a connection's queue of free sessions: the connection is given up (its sessions taken
# back for good, or abandoned to a stuck thread). Each waiter that takes it puts it back.
GONE = None


class SessionPool:
    """A logged-in connection to a PKCS#11 token with a session pool; thread-safe.

    ``follows``: another connection to the same token; this one logs in only while that one is
    up. A second connection (the service's administrative one) then never adds failed logins
    of its own to an HSM that counts them and locks the user out after a few.

    ``metrics``: where logins and reconnects are counted, as connection ``connection``
    (:data:`signer._internal.metrics.SIGNING` or ``ADMIN``); whether it is up is read from
    :attr:`available` when scraped."""

    def __init__(
        self,
        cfg: TokenConfig,
        pin: Pin,
        follows: SessionPool | None = None,
        *,
        metrics: Metrics = OFF,
        connection: str = SIGNING,
    ) -> None:
        self._cfg = cfg
        self._metrics, self._connection = metrics, connection
        self._connected_before = False
        metrics.watch_token(connection, lambda: self.available)
        self._pin = pin
        self._follows = follows
        self._uri = TokenURI.parse(cfg.uri)
        self._pool_size = cfg.sessions if cfg.concurrent else 1
        self._lib: Any = None
        self._conn: _Connection | None = None
        # A connection marked down whose sessions may still be in a thread's hands.
        self._dead: _Connection | None = None
        self._dead_since = 0.0
        # Module instances given up with their connection (see _abandon_dead): kept, never
        # finalized or freed, since a thread is still inside them.
        self._abandoned: list[tuple[Any, _Connection]] = []
        self._down_reason = "not connected to the token yet"
        self._state_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._listeners: list[Callable[[bool], None]] = []
        self._abandon_listeners: list[Callable[[float], None]] = []
        stamp = pin.stamp  # what tells an operator's new file from the one that was refused
        self._logins = LoginGuard(cfg.max_failed_logins, cfg.pin_file, stamp)
        # Failed connection attempts in a row: the monitor backs off between them.
        self._connect_failures = 0
        self._checks = 0
        # A health check that has not come back, and whether it has been out too long.
        self._ping: _Ping | None = None
        self._stalled = False
        # Why the connection signs through python-pkcs11 rather than directly ("" if directly).
        self._direct_off = ""

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, wait: bool = False) -> None:
        """Connects (or keeps trying in the background) and starts the health monitor."""
        if self._cfg.server_address:
            # p11-kit-client.so reads its server address from the environment when initialised.
            os.environ["P11_KIT_SERVER_ADDRESS"] = self._cfg.server_address
        if not Path(self._cfg.module).exists():
            raise FailedPrecondition(f"PKCS#11 module not found: {self._cfg.module}")
        self._try_connect()
        if wait and self._conn is None:
            raise self._why_down()
        self._monitor = threading.Thread(
            target=self._run_monitor, name="token-monitor", daemon=True
        )
        self._monitor.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        with self._state_lock:
            conn, self._conn = self._conn, None
            if self._dead is not None:
                self._dead.give_up()  # calls still waiting on it end now, not never
            if conn is not None:
                if not self._drain(conn):
                    conn.give_up()
                for slot in conn.slots:
                    self._quietly(slot.session.close)
            if self._lib is not None:
                self._quietly(self._lib.finalize)
        self._pin.wipe()

    def wake(self) -> None:
        """Checks the connection (or tries to make it) now rather than at the next interval."""
        self._wake.set()

    def on_abandon(self, listener: Callable[[float], None]) -> None:
        """``listener(since)`` is called when a dead connection is given up with calls stuck
        in it (see :meth:`_abandon_dead`); ``since``: when it died (time.monotonic())."""
        self._abandon_listeners.append(listener)

    def on_availability(self, listener: Callable[[bool], None]) -> None:
        """``listener(True/False)`` is called whenever the token becomes reachable or not."""
        self._listeners.append(listener)

    @property
    def available(self) -> bool:
        return self._conn is not None and not self._stalled

    @property
    def checks(self) -> int:
        """How many times the monitor has looked at the connection (or tried to make it)."""
        return self._checks

    @property
    def failed_logins(self) -> int:
        """Failed logins in a row (see :mod:`signer._internal.token._logins`)."""
        return self._logins.failures

    def check_answering(self) -> None:
        """UNAVAILABLE while the token host is connected but not answering. For a call about
        to queue for a thread that would only wait on the token with the calls already stuck
        there (threads, sessions, callers' deadlines): fail fast instead, until it answers
        again. (A token that is down makes calls fail fast by itself.)"""
        if self._stalled:
            raise Unavailable(
                "token unavailable: the token host has not answered a health check for more "
                f"than {self._cfg.stall_seconds:g} s"
            )

    def _why_down(self) -> SignerError:
        """What a call meets while there is no connection: FAILED_PRECONDITION when the PIN is
        the problem (waiting will not cure it), else UNAVAILABLE."""
        refusal = self._logins.refusal
        if refusal is not None:
            return LoginRefused(refusal)
        return Unavailable(f"token unavailable: {self._down_reason}")

    @property
    def label(self) -> str:
        conn = self._conn
        return conn.label if conn is not None else (self._uri.token or "")

    @property
    def mechanisms(self) -> frozenset[int]:
        """What the module offers: ``Mechanism`` members, plain ints for those python-pkcs11
        has no name for."""
        conn = self._conn
        if conn is None:
            raise self._why_down()
        return conn.mechanisms

    def ping(self) -> None:
        """One cheap round trip to the token host (C_GetSessionInfo through python-pkcs11)."""
        with self._session() as slot:
            slot.session.token.slot.get_token()

    # --- internals ----------------------------------------------------------------------------

    def _borrow(self, conn: _Connection) -> tuple[_Connection, Slot]:
        """A free session of ``conn``, waiting as long as ``conn`` is the connection. A
        connection given up (GONE) or replaced while this waits answers UNAVAILABLE, or, if a
        new connection is up by then, the wait goes on there once (nothing has reached the
        token yet). The bounded waits are a backstop for a connection that goes away without
        being given up (down, with its sessions still held)."""
        moved = False
        while True:
            try:
                slot = conn.free.get(timeout=_BORROW_CHECK_SECONDS)
            except queue.Empty:
                if self._conn is conn:
                    continue
                slot = GONE
            if slot is not GONE:
                return conn, slot
            if conn.gone:
                conn.give_up()  # for the next waiter
            fresh = self._conn
            if fresh is None:
                raise self._why_down()
            if fresh is conn or moved:
                raise Unavailable(f"token unavailable: {self._down_reason}")
            conn, moved = fresh, True

    @contextmanager
    def _session(self) -> Iterator[Slot]:
        conn = self._conn
        if conn is None:
            raise self._why_down()
        self.check_answering()
        conn, slot = self._borrow(conn)
        try:
            with map_errors():
                try:
                    yield slot
                except CONNECTION_LOST as exc:
                    # Not through the table: the connection is marked down first, and the
                    # answer says why the token is down.
                    self._mark_down(conn, f"lost the token host ({type(exc).__name__})")
                    raise Unavailable(f"token unavailable: {self._down_reason}") from None
                except STALE_HANDLE:
                    slot.keys.clear()  # the cached handle may be the stale one; NOT_FOUND
                    raise
        finally:
            conn.free.put(slot)

    def _mark_down(self, conn: _Connection, reason: str) -> None:
        with self._state_lock:
            if self._conn is not conn:
                return
            self._conn = None
            self._dead = conn
            self._dead_since = time.monotonic()
            self._down_reason = reason
        log.warning("token unavailable", extra={"reason": reason})
        self._notify(False)
        self._wake.set()

    def _notify(self, up: bool) -> None:
        for listener in self._listeners:
            try:
                listener(up)
            except Exception:
                log.exception("availability listener failed")

    def _drain(self, conn: _Connection, timeout: float = 10.0) -> bool:
        """Takes every session of ``conn`` back for good (calls on a dead connection fail fast)
        and gives the connection up. A thread that had taken ``conn`` and was about to borrow a
        session (or was queued for one) then answers UNAVAILABLE instead of waiting for ever:
        the soak's RotateKey, queued for one of the administrative connection's two sessions
        when the token host was killed, never returned, and SIGTERM then hung on its thread."""
        taken: list[Slot | None] = []
        try:
            for _ in conn.slots:
                taken.append(conn.free.get(timeout=timeout))
        except queue.Empty:
            for slot in taken:
                conn.free.put(slot)
            return False
        conn.give_up()
        return True

    def _try_connect(self) -> bool:
        if self._follows is not None and not self._follows.available:
            self._down_reason = "waiting for the main connection to the token"
            return False
        if not self._logins.may_try():
            return False
        with self._state_lock:
            if self._conn is not None:
                return True
            if self._dead is not None:
                # Calls on a dead connection fail fast; wait for them before C_Finalize.
                if self._drain(self._dead, timeout=1.0):
                    self._dead = None
                elif time.monotonic() - self._dead_since < ABANDON_AFTER_SECONDS:
                    return False
                else:
                    self._abandon_dead()
            try:
                conn = self._connect()
            except (p11e.PKCS11Error, Unavailable, ConfigError, OSError) as exc:
                # Not through the table: a failed attempt is no call's error; its reason is kept
                # for the calls that meet the token down. ConfigError: the PIN file missing or
                # opened up for a moment while an operator rotates it; the next attempt reads it
                # again.
                reason = exc.message if isinstance(exc, SignerError) else type(exc).__name__
                self._down_reason = f"cannot reach the token ({reason})"
                self._connect_failures += 1
                return False
            self._conn = conn
            self._connect_failures = 0
            again, self._connected_before = self._connected_before, True
        self._metrics.token_connected(self._connection, again)
        log.info(
            "token connected",
            extra={
                "token": conn.label,
                "sessions": len(conn.slots),
                # two PKCS#11 calls per signature, or why python-pkcs11's three
                "signing": self._direct_off or "direct",
            },
        )
        self._notify(True)
        return True

    def _abandon_dead(self) -> None:
        """Gives up on a dead connection whose sessions do not come back: a thread is stuck in
        the module for good. p11-kit-client 0.24 does that (rpc_socket_read): when the token
        host dies while several calls wait on one connection, a call whose reply header another
        thread had read, and whose body then fails, leaves the others waiting on a condition
        nobody signals again. C_Finalize under a thread inside the module is undefined, so the
        old instance is kept, unfinalized and referenced, and a fresh one (a new connection)
        takes over; the stuck thread's caller is answered by the lanes (Lanes.replace_stuck).
        Found by the soak: the service stayed NOT_SERVING for good after a token host restart."""
        assert self._dead is not None
        held = len(self._dead.slots) - self._dead.free.qsize()
        log.error(
            "token connection abandoned: calls stuck in the PKCS#11 module never returned",
            extra={"sessions_held": held, "seconds": round(time.monotonic() - self._dead_since)},
        )
        self._abandoned.append((self._lib, self._dead))
        self._dead.give_up()
        died = self._dead_since
        self._lib, self._dead = None, None
        if self._ping is not None and self._ping.thread.is_alive():
            self._ping, self._stalled = None, False  # that health check is stuck with them
        for listener in self._abandon_listeners:
            try:
                listener(died)
            except Exception:
                log.exception("abandon listener failed")

    def _connect(self) -> _Connection:
        if self._lib is None:
            # A fresh lib object, not pkcs11.lib()'s process-wide cache: the pool owns its module.
            self._lib = _p11.lib(self._cfg.module)
        elif not self._lib.initialized:
            self._lib.initialize()
        else:
            self._lib.reinitialize()
        token = self._find_token()
        slots: list[Slot] = []
        try:
            first = self._pin.login(token)
        except tuple(PIN_REFUSED) as exc:
            # Not through the table: a refused attempt is counted, as _logins says.
            self._logins.failed(PIN_REFUSED[type(exc)])
            self._metrics.login(self._connection, PIN_REFUSED[type(exc)])
            log.error(
                "token login refused",
                extra={"error": type(exc).__name__, "failed_logins": self._logins.failures},
            )
            raise Unavailable(f"the token refused the login ({type(exc).__name__})") from None
        self._logins.succeeded()
        self._metrics.login(self._connection, "ok")
        found = (
            DirectSign.of(first, self._lib)
            if self._cfg.direct_sign
            else "turned off (token.direct_sign)"
        )
        direct = found if isinstance(found, DirectSign) else None
        self._direct_off = found if isinstance(found, str) else ""
        try:
            slots.append(Slot(first, direct=direct))
            for _ in range(self._pool_size - 1):
                slots.append(Slot(token.open(rw=True), direct=direct))
            mechs = frozenset(token.slot.get_mechanisms())
        except BaseException:
            for slot in slots:
                self._quietly(slot.session.close)
            raise
        free: queue.Queue[Slot | None] = queue.Queue()
        for slot in slots:
            free.put(slot)
        return _Connection(token, slots, free, mechs, token.label)

    def _find_token(self) -> Any:
        slots = self._lib.get_slots(token_present=True)
        if not slots:
            # p11-kit-client.so shows no slot at all when its server cannot be reached.
            where = f" at {self._cfg.server_address}" if self._cfg.server_address else ""
            raise Unavailable(f"the PKCS#11 module shows no token; is the token host{where} up?")
        for slot in slots:
            tok = slot.get_token()
            serial = tok.serial.decode("ascii", "replace").strip()
            if self._uri.matches(tok.label, serial, tok.manufacturer_id, tok.model):
                return tok
        raise Unavailable(f"no token matches {self._uri}")

    def _next_check(self) -> float:
        """Seconds until the monitor looks again: the health interval while connected, doubling
        after each failed connection attempt up to ``token.reconnect_max_seconds`` (a network
        HSM, or a token host coming back, is not helped by a reconnect storm). ``wake()``
        cuts the wait short, e.g. when a supervisor has just restarted the token host."""
        interval = self._cfg.health_interval_seconds
        if self._conn is not None or self._connect_failures == 0:
            return interval
        backoff: float = interval * 2.0 ** min(self._connect_failures - 1, 16)
        return min(backoff, max(interval, self._cfg.reconnect_max_seconds))

    def _run_monitor(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._next_check())
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._check()
            except Exception:
                # A bug here must not end the only thread that brings the token back.
                log.exception("token check failed")
            self._checks += 1

    def _check(self) -> None:
        conn = self._conn
        if conn is None:
            if not self._try_connect():
                log.debug("token still unavailable", extra={"reason": self._down_reason})
            return
        # The round trip runs on a thread of its own, so a token host that stops answering (a
        # frozen process, a hung network HSM) is noticed after ``token.stall_seconds`` rather
        # than never; only one is ever out.
        ping = self._ping
        if ping is None:
            ping = self._ping = _Ping(self.ping)
        ping.thread.join(self._cfg.stall_seconds)
        if ping.thread.is_alive():
            if not self._stalled:
                self._stalled = True
                log.warning("token not answering", extra={"seconds": self._cfg.stall_seconds})
                self._notify(False)
            return
        self._ping = None
        if self._stalled:
            self._stalled = False
            log.info("token answering again")
            self._notify(True)
        if isinstance(ping.error, Unavailable):
            return  # _session has marked it down; reconnect on the next tick
        if isinstance(ping.error, SignerError):
            # The token answers, but not as a working token does: fail closed and start afresh
            # rather than keep reporting it healthy.
            self._mark_down(conn, f"health check failed ({ping.error.message})")
        elif ping.error is not None:
            raise ping.error

    @staticmethod
    def _quietly(fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            log.debug("ignored during cleanup", extra={"error": type(exc).__name__})


class _Ping:
    """One health check running on a thread of its own; its error, if it failed."""

    def __init__(self, ping: Callable[[], None]) -> None:
        self.error: Exception | None = None

        def run() -> None:
            try:
                ping()
            except Exception as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, name="token-ping", daemon=True)
        self.thread.start()
