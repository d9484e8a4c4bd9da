"""The audit log on PostgreSQL (issue 16): :class:`PostgresAuditStore`, the same hash chain as
the SQLite store's in a database's schema. Chosen by ``[audit] path = "postgresql://..."``
(:func:`signer._internal.audit._store.open_audit_store`); SQLite stays the default. Its reads
and writes are :class:`~signer._internal.audit._store.Tables`', shared with SQLite.

* **One writer, which vouches for what it signs.** The writer chains its records in memory;
  the append checks, under the chain's transaction-scoped lock and in the transaction that
  inserts them, that the log's head is where the writer left it, and a checkpoint that it
  follows the newest one: a record forged into a running log, or a second writer, stops the log
  (:class:`~signer._internal.audit._store.ChainMoved`) rather than being signed over (REVIEW.md
  1 and 2: an append that chained after whatever head it found did that). The writer's
  connection holds a session lock, so a second service on the same log is refused at start.
* **The schema is the service's**, through the key store's ``schema_version`` mechanism
  (:func:`signer._internal.pgstore.migrate`, component ``audit``). Locks are named per schema.
* **Fail closed, not hang**: ``lock_timeout`` (the SQLite store's busy timeout) fails a write
  whose lock is held too long; ``synchronous_commit`` is raised to ``on`` where weaker; a
  read-only server (a standby behind the same name) is refused by ``target_session_attrs``.
  Every psycopg fault is one line, class and SQLSTATE: callers' statuses carry no host or role.
* **A COMMIT whose connection broke** has an unknown outcome:
  :class:`~signer._internal.audit._store.CommitUnknown`; the writer reads back whether its
  records are there before it answers their calls.
* **verify reads one snapshot**: a read-only store is one REPEATABLE READ, read-only
  transaction, so records, checkpoints and archives are of one moment while the writer goes on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeAlias, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from signer._internal.audit._store import CommitUnknown, StoreUnavailable, Tables
from signer._internal.config import _validate_store, store_parameters, store_schema
from signer._internal.pgstore import (
    LOCK_NAMESPACE,
    CommitCutOff,
    check_schema,
    migrate,
    service_conninfo,
    transaction,
    xact_lock,
)
from signer._internal.store import translating
from signer.errors import FailedPrecondition

P = ParamSpec("P")
R = TypeVar("R")
Connection: TypeAlias = psycopg.Connection[tuple[Any, ...]]

# (version, SQL): applied in order, never edited once released, only appended to.
AUDIT_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE records (
    seq BIGINT NOT NULL,
    time TEXT NOT NULL,
    caller TEXT NOT NULL,
    operation TEXT NOT NULL,
    key TEXT NOT NULL,
    version BIGINT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    chain TEXT COLLATE "C" NOT NULL DEFAULT '',
    PRIMARY KEY (chain, seq)
);
CREATE TABLE checkpoints (
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    time TEXT NOT NULL,
    signature BYTEA NOT NULL,
    prev BIGINT,
    refs TEXT NOT NULL DEFAULT '',
    chain TEXT COLLATE "C" NOT NULL DEFAULT '',
    PRIMARY KEY (chain, seq)
);
CREATE TABLE audit_key (
    id INTEGER NOT NULL CHECK (id = 1),
    key_id BYTEA NOT NULL,
    public_key BYTEA NOT NULL,
    chain TEXT COLLATE "C" NOT NULL DEFAULT '',
    PRIMARY KEY (chain, id)
);
CREATE TABLE archives (
    last_seq BIGINT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_hash TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    chain TEXT COLLATE "C" NOT NULL DEFAULT '',
    PRIMARY KEY (chain, last_seq)
);
""",
    ),
)

_SYNCHRONOUS = (
    "SELECT set_config('synchronous_commit', 'on', false) "
    "WHERE current_setting('synchronous_commit') IN ('off', 'local')"
)
# The writer's session lock: held by its connection for as long as it lives, so a second
# service writing the same log is refused at its start, by name (the head check in every append
# would stop one of them anyway, later and less clearly). Released by the server when the
# connection goes, so a writer that died holds nothing. Connecting again (after a cut), the
# writer waits for it up to lock_timeout: its old session may not be gone yet.
_WRITER_LOCK = (
    "SELECT pg_{}advisory_lock(%s, hashtext(coalesce(current_schema(), '') || ':' || %s))"
)
# Ends the server process given if it holds that writer lock still (a two-int advisory lock
# shows as classid, objid as an unsigned oid, objsubid 2): this writer's old session, never
# another's, whatever became of its pid.
_END_OLD_SESSION = (
    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND pid = %s AND classid = %s AND objsubid = 2 AND objid = "
    "((hashtext(coalesce(current_schema(), '') || ':' || %s))::bigint & 4294967295)::oid"
)
# A lost peer noticed in seconds over TCP, on both sides (the server's keepalives end a session
# whose client is gone, and with it the writer lock; none of this applies to a Unix socket).
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "connect_timeout": "10",
}
_SERVER_KEEPALIVES = (
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
)

log = logging.getLogger("signer.audit")


def _mapped(fn: Callable[P, R]) -> Callable[P, R]:
    """Every psycopg fault as one line naming its class and SQLSTATE (the log puts it in refused
    calls' statuses and health, which must not carry the server's host, port or role); the
    whole message goes to the service's log."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except psycopg.Error as exc:
            raise _unavailable(exc) from None

    return call


def _unavailable(exc: psycopg.Error) -> StoreUnavailable:
    log.warning("audit database error", extra={"error": _why(exc)})
    code = f", SQLSTATE {exc.sqlstate}" if exc.sqlstate else ""
    return StoreUnavailable(f"the audit database cannot be used ({type(exc).__name__}{code})")


def _checked(conn: Connection, schema: str) -> Connection:
    try:
        check_schema(conn, schema)
    except BaseException:
        conn.close()
        raise
    return conn


def _why(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@translating(_mapped)
class PostgresAuditStore(Tables):
    """The audit log in a PostgreSQL database (the schema on the DSN's search_path). One
    connection (the log's writer is one thread), opened again after it breaks; it holds the
    log's writer lock. ``timeout``: how long a write waits for a lock before failing (closed)."""

    def __init__(
        self,
        dsn: str,
        read_only: bool = False,
        timeout: float = 2.0,
        chain: str = "",
        writer: bool = True,
    ) -> None:
        self.chain = chain
        self._read_only = read_only
        self._writer = writer and not read_only
        # As the configuration checks it, and as the key store connects: the schema the URL
        # names, checked on every connection; a primary only (verify may read a standby).
        _validate_store(dsn, "audit.path")
        self._schema = store_schema(store_parameters(dsn, "audit.path"), "audit.path")
        # Added to the DSN's own options (its search_path), not in their place.
        ours = f"-c lock_timeout={int(timeout * 1000)} -c statement_timeout=30000"
        given = conninfo_to_dict(dsn)
        theirs = str(given.get("options") or "")
        self._conninfo = make_conninfo(
            service_conninfo(dsn),
            options=f"{theirs} {ours} {_SERVER_KEEPALIVES}".strip(),
            target_session_attrs="any" if read_only else "read-write",
            **{k: v for k, v in _KEEPALIVES.items() if k not in given},
        )
        self._conn: Connection | None = None
        # The server process of the session holding this writer's lock (None: never held):
        # connecting again, the writer waits for the lock, after ending that session.
        self._backend: int | None = None
        try:
            conn = self._connection()
            if read_only:
                if not self._has_log(conn):
                    raise FileNotFoundError("no audit log in this database")
            else:
                migrate(conn, "audit", AUDIT_MIGRATIONS)
        except psycopg.Error as exc:
            self.close()
            raise _unavailable(exc) from None
        except BaseException:  # a newer database refused, no log, another writer
            self.close()
            raise

    def _connection(self) -> Connection:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._read_only:
            # One snapshot for everything verify reads (the transaction ends at close).
            conn = psycopg.connect(self._conninfo, autocommit=False)
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            _checked(conn, self._schema)
        else:
            conn = _checked(psycopg.connect(self._conninfo, autocommit=True), self._schema)
            if not self._writer:
                conn.execute(_SYNCHRONOUS)
                self._conn = conn
                return conn
            purpose = (LOCK_NAMESPACE, f"audit-writer:{self.chain}")
            try:
                conn.execute(_SYNCHRONOUS)
                first = self._backend is None
                if not first:
                    # The session this writer lost may live on at the server, lock and all,
                    # until its TCP keepalive gives up (hours by default on a half-open
                    # connection): ended here if it still holds this writer's lock.
                    conn.execute(_END_OLD_SESSION, (self._backend, *purpose))
                lock = _WRITER_LOCK.format("try_" if first else "")
                row = conn.execute(lock, purpose).fetchone()
            except BaseException:
                conn.close()
                raise
            if first and not (row and row[0]):
                conn.close()
                raise FailedPrecondition(
                    "another service is writing this audit log (its writer lock is held): one "
                    "writer per log"
                )
            self._backend = conn.info.backend_pid
        self._conn = conn
        return conn

    @staticmethod
    def _has_log(conn: Connection) -> bool:
        row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return False
        row = conn.execute(
            "SELECT version FROM schema_version WHERE component = 'audit'"
        ).fetchone()
        if row is None:
            return False
        if int(row[0]) > AUDIT_MIGRATIONS[-1][0]:
            raise FailedPrecondition(
                f"the database's audit schema is version {row[0]}, newer than this code's "
                f"{AUDIT_MIGRATIONS[-1][0]}: upgrade signer"
            )
        return True

    def _read(self) -> Connection:
        return self._connection()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """BEGIN ... COMMIT holding the chain's lock. Lost before COMMIT was sent: nothing
        written (the server rolls back). Lost during it: :class:`CommitUnknown`."""
        conn = self._connection()
        try:
            with transaction(conn):
                xact_lock(conn, f"audit-chain:{self.chain}")
                yield conn
        except CommitCutOff as exc:
            log.warning("audit database error at COMMIT", extra={"error": _why(exc)})
            raise CommitUnknown(
                "the audit database's connection broke during COMMIT: its outcome is unknown"
            ) from None

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        conn = self._connection()
        if self._read_only or conn.info.transaction_status != TransactionStatus.IDLE:
            yield  # verify's connection is one snapshot already
            return
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield
        finally:
            if not conn.broken:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("COMMIT")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
