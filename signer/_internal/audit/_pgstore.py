"""The audit log on PostgreSQL (issue 16): :class:`PostgresAuditStore`, one hash chain that every
replica appends to, serialised in the database. Chosen by ``[audit] path = "postgresql://..."``
(:func:`signer._internal.audit._store.open_audit_store`); SQLite stays the default.

* **One chain, one lock.** :meth:`PostgresAuditStore.append_events` takes the chain's
  transaction-scoped advisory lock (:data:`CHAIN_LOCK`), reads the head *under it*, chains the
  batch from there and inserts it, in one transaction: several writers (replicas) serialise on
  the lock, and none can fork the chain from a head it read earlier (DESIGN.md 7, "decide on the
  state you act on"). Group commit is the caller's (one transaction per batch).
* **The schema is the service's**, through the key store's ``schema_version`` mechanism
  (:func:`signer._internal.pgstore.migrate`, component ``audit``).
* **Fail closed, not hang**: ``lock_timeout`` (the SQLite store's busy timeout) fails a write
  whose lock is held too long; ``synchronous_commit`` is raised to ``on`` where weaker.
* **A COMMIT whose connection broke** has an unknown outcome: :class:`AuditCommitUnknown`, for
  which :func:`~signer._internal.audit._store.left_behind` says yes.
* **verify reads one snapshot**: a read-only store is one REPEATABLE READ, read-only
  transaction, so records, checkpoints and archives are of one moment while writers go on.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, ParamSpec, TypeAlias, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from signer._internal.audit._chain import GENESIS, Checkpoint, Event, Record, chain, iso
from signer._internal.audit._store import Archived
from signer._internal.pgstore import migrate
from signer.errors import FailedPrecondition, Unavailable

Connection: TypeAlias = psycopg.Connection[tuple[Any, ...]]

# (version, SQL): applied in order, never edited once released, only appended to.
AUDIT_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE records (
    seq BIGINT PRIMARY KEY,
    time TEXT NOT NULL,
    caller TEXT NOT NULL,
    operation TEXT NOT NULL,
    key TEXT NOT NULL,
    version BIGINT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE checkpoints (
    seq BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    time TEXT NOT NULL,
    signature BYTEA NOT NULL,
    prev BIGINT
);
CREATE TABLE audit_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    key_id BYTEA NOT NULL,
    public_key BYTEA NOT NULL
);
CREATE TABLE archives (
    last_seq BIGINT PRIMARY KEY,
    first_seq BIGINT NOT NULL,
    last_hash TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
""",
    ),
)

# pg_advisory_xact_lock's key for the chain: every append (and archiving, which moves its start)
# holds it until its COMMIT.
CHAIN_LOCK = 0x5167_0017
_SYNCHRONOUS = (
    "SELECT set_config('synchronous_commit', 'on', false) "
    "WHERE current_setting('synchronous_commit') IN ('off', 'local')"
)
_INSERT = "INSERT INTO records VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"


class AuditUnavailable(Unavailable):
    """The database cannot be used (gone, shutting down, a lock or statement timeout, a full
    disk: psycopg's OperationalError), named by the first line of its message. Nothing of a
    write that failed so is in the log (:func:`~signer._internal.audit._store.left_behind`)."""

    may_be_written = False


class AuditCommitUnknown(Unavailable):
    """The connection broke during COMMIT: the records may or may not be in the log."""

    may_be_written = True


def _why(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


P = ParamSpec("P")
R = TypeVar("R")


def _mapped(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise AuditUnavailable(f"{_why(exc)}") from None

    return call


def _mapping(cls: type[R]) -> type[R]:
    """Every public method's psycopg faults as :class:`AuditUnavailable` (one line, as the
    SQLite store's 'database is locked'): the log puts the message in statuses and health."""
    for name, member in list(vars(cls).items()):
        if callable(member) and not name.startswith("_"):
            setattr(cls, name, _mapped(member))
    return cls


@_mapping
class PostgresAuditStore:
    """The audit log in a PostgreSQL database (the schema on the DSN's search_path). One
    connection (the log's writer is one thread), opened again after it breaks. ``timeout``: how
    long a write waits for a lock before failing (closed)."""

    def __init__(self, dsn: str, read_only: bool = False, timeout: float = 2.0) -> None:
        self._read_only = read_only
        # Added to the DSN's own options (a search_path, say), not in their place.
        ours = f"-c lock_timeout={int(timeout * 1000)} -c statement_timeout=30000"
        theirs = str(conninfo_to_dict(dsn).get("options") or "")
        self._conninfo = make_conninfo(dsn, options=f"{theirs} {ours}".strip())
        self._conn: Connection | None = None
        conn = self._connection()
        if read_only:
            try:
                if not self._has_log(conn):
                    raise FileNotFoundError("no audit log in this database")
            except BaseException:
                self.close()
                raise
            return
        try:
            migrate(conn, "audit", AUDIT_MIGRATIONS)
        except psycopg.OperationalError as exc:
            self.close()
            raise AuditUnavailable(_why(exc)) from None
        except BaseException:  # a newer database refused
            self.close()
            raise

    def _connection(self) -> Connection:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        try:
            if self._read_only:
                # One snapshot for everything verify reads (the transaction ends at close).
                conn = psycopg.connect(self._conninfo, autocommit=False)
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
            else:
                conn = psycopg.connect(self._conninfo, autocommit=True)
                conn.execute(_SYNCHRONOUS)
        except psycopg.OperationalError as exc:
            raise AuditUnavailable(_why(exc)) from None
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

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Connection]:
        """BEGIN ... COMMIT. Lost before COMMIT was sent: nothing written (the server rolls
        back). Lost during it: :class:`AuditCommitUnknown`."""
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            yield conn
        except BaseException:
            if not conn.broken:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            if conn.broken:
                why = _why(exc)
                raise AuditCommitUnknown(f"COMMIT cut off, its outcome unknown: {why}") from None
            raise

    def _head(self, conn: Connection) -> tuple[int, str]:
        row = conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        if row:
            return int(row[0]), str(row[1])
        row = conn.execute(
            "SELECT last_seq, last_hash FROM archives ORDER BY last_seq DESC LIMIT 1"
        ).fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def head(self) -> tuple[int, str]:
        return self._head(self._connection())

    def append_events(self, events: Sequence[Event]) -> list[Record]:
        """Chains ``events`` after the head read under :data:`CHAIN_LOCK`, in the transaction
        that inserts them: writers serialise, and the chain never forks."""
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
            seq, prev = self._head(conn)
            records = []
            for event in events:
                seq += 1
                records.append(chain(seq, event, prev))
                prev = records[-1].hash
            self._insert(conn, records)
        return records

    def append(self, records: Sequence[Record]) -> None:
        """Records chained already (a copy: ``signer store migrate``); refused unless they
        follow the head."""
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
            if records and self._head(conn) != (records[0].seq - 1, records[0].prev_hash):
                raise FailedPrecondition("the records do not follow the audit log's head")
            self._insert(conn, records)

    @staticmethod
    def _insert(conn: Connection, records: Sequence[Record]) -> None:
        rows = [
            (
                r.seq,
                iso(r.event.time),
                r.event.caller,
                r.event.operation,
                r.event.key,
                r.event.version,
                r.event.payload_sha256,
                r.event.status,
                r.prev_hash,
                r.hash,
            )
            for r in records
        ]
        with conn.cursor() as cur:
            cur.executemany(_INSERT, rows)

    def add_checkpoint(
        self, checkpoint: Checkpoint, audit_key: tuple[bytes, bytes] | None = None
    ) -> None:
        c = checkpoint
        with self._tx() as conn:
            if audit_key is not None:
                conn.execute(
                    "INSERT INTO audit_key (id, key_id, public_key) VALUES (1, %s, %s)", audit_key
                )
            conn.execute(
                "INSERT INTO checkpoints (seq, hash, time, signature, prev) "
                "VALUES (%s, %s, %s, %s, %s)",
                (c.seq, c.hash, c.time, c.signature, c.prev),
            )

    def last_checkpoint(self) -> int:
        row = self._connection().execute("SELECT MAX(seq) FROM checkpoints").fetchone()
        return int(row[0] or 0) if row else 0

    def checkpoints(self) -> list[Checkpoint]:
        rows = (
            self._connection()
            .execute("SELECT seq, hash, time, signature, prev FROM checkpoints ORDER BY seq")
            .fetchall()
        )
        return [Checkpoint(int(r[0]), r[1], r[2], bytes(r[3]), r[4]) for r in rows]

    def record(self, seq: int) -> Record | None:
        return next(self.records(first=seq, upto=seq), None)

    def records(self, upto: int | None = None, first: int = 0) -> Iterator[Record]:
        rows = (
            self._connection()
            .execute(
                "SELECT seq, time, caller, operation, key, version, payload_sha256, status, "
                "prev_hash, hash FROM records WHERE seq >= %s AND seq <= %s ORDER BY seq",
                (first, upto if upto is not None else 2**62),
            )
            .fetchall()
        )
        return iter(
            [
                Record(int(r[0]), Event(datetime.fromisoformat(r[1]), *r[2:8]), r[8], r[9])
                for r in rows
            ]
        )

    def audit_key(self) -> tuple[bytes, bytes] | None:
        row = self._connection().execute("SELECT key_id, public_key FROM audit_key").fetchone()
        return (bytes(row[0]), bytes(row[1])) if row else None

    def archives(self) -> list[Archived]:
        rows = (
            self._connection()
            .execute(
                "SELECT first_seq, last_seq, last_hash, file, sha256 FROM archives "
                "ORDER BY last_seq"
            )
            .fetchall()
        )
        return [Archived(*r) for r in rows]

    def archived(self, segment: Archived) -> None:
        s = segment
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
            conn.execute(
                "INSERT INTO archives (last_seq, first_seq, last_hash, file, sha256) "
                "VALUES (%s, %s, %s, %s, %s)",
                (s.last_seq, s.first_seq, s.last_hash, s.file, s.sha256),
            )
            conn.execute("DELETE FROM records WHERE seq <= %s", (s.last_seq,))
            conn.execute("DELETE FROM checkpoints WHERE seq < %s", (s.last_seq,))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
