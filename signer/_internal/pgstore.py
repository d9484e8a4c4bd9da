"""Key metadata on PostgreSQL (issue 16): :class:`PostgresStore`, the :class:`~signer._internal.
store.Store` that replicas share. Chosen by ``[store] path = "postgresql://..."``; SQLite stays
the default (:func:`signer._internal.store.open_store`).

What differs from the SQLite store, and why:

* **The schema is the service's.** :func:`migrate` creates and upgrades it through a
  ``schema_version`` table, in one transaction under a transaction-scoped advisory lock, so that
  N replicas starting at once migrate once and never by hand; a database newer than this code
  is refused, not used.
* **Names and scopes are ``COLLATE "C"``**, in the schema, so that the comparison, the ORDER BY
  and the index of ListKeys' paging agree with SQLite's byte order whatever the database's
  collation (under ICU en-US, ``ORDER BY name`` gives ``a, B, k-2, K0``; C gives ``B, K0, a,
  k-2``).
* **A key and its versions are read in one statement**, one snapshot: under READ COMMITTED two
  statements could mix two states of one key.
* **Connections come from a pool** in autocommit (a read is one round trip: 143 µs against 273
  with an implicit BEGIN and ROLLBACK, PLAN.md 2), checked at checkout; writes are an explicit
  BEGIN ... COMMIT. Its reconnect backoff is capped (:class:`_CappedBackoff`): psycopg_pool's
  doubles without bound, and after an 8 s outage it took 5.7 s to serve again; capped at
  0.5 s, 0.33 s (PLAN.md 6).
* **Faults map through one table**, :data:`ERRORS`, by SQLSTATE class (the server gone or
  shutting down, a read-only database, a lock or statement timeout, a full disk, a pool
  timeout): UNAVAILABLE with a one-line reason and the SQLSTATE, never libpq's text, which
  names the host, port and role (that goes to the service log); a COMMIT whose connection broke
  has an unknown outcome, and is :class:`~signer.errors.StoreUncertain`, as the SQLite store's
  COMMIT that failed with an I/O error.
* **The connection is the URL's alone** (:func:`service_conninfo`): ``target_session_attrs=
  read-write`` (a standby behind the primary's name is refused at connect, not written to), no
  ``PG*`` variable from the environment, and the schema named in the URL, checked on every
  connection (REVIEW.md 5, 7, 12).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeAlias, TypeVar

import psycopg
import psycopg_pool
import psycopg_pool.pool
from psycopg.conninfo import make_conninfo
from psycopg_pool.base import AttemptWithBackoff

from signer._internal.config import _validate_store, store_parameters, store_schema
from signer._internal.store import KeyTables, translating
from signer.errors import (
    FailedPrecondition,
    SignerError,
    StoreUncertain,
    Unavailable,
)

log = logging.getLogger("signer.store")  # named for the component: signer._internal.logs

Connection: TypeAlias = psycopg.Connection[tuple[Any, ...]]

# (version, SQL): applied in order, never edited once released, only appended to.
STORE_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE keys (
    name            TEXT COLLATE "C" PRIMARY KEY,
    algorithm       TEXT NOT NULL,
    primary_version INTEGER NOT NULL,
    scope           TEXT COLLATE "C" NOT NULL DEFAULT '',
    labels          TEXT NOT NULL DEFAULT '{}',
    created         DOUBLE PRECISION NOT NULL
);
CREATE TABLE versions (
    name        TEXT COLLATE "C" NOT NULL REFERENCES keys(name),
    version     INTEGER NOT NULL,
    algorithm   TEXT NOT NULL,
    state       TEXT NOT NULL,
    key_id      BYTEA NOT NULL CONSTRAINT versions_key_id UNIQUE,
    public_key  BYTEA NOT NULL CONSTRAINT versions_public_key UNIQUE,
    created     DOUBLE PRECISION NOT NULL,
    destroy_at  DOUBLE PRECISION,
    PRIMARY KEY (name, version)
);
CREATE INDEX versions_destroy_at ON versions(destroy_at) WHERE destroy_at IS NOT NULL;
CREATE INDEX keys_scope ON keys(scope, name);
CREATE TABLE import_tokens (
    token       TEXT COLLATE "C" PRIMARY KEY,
    key_id      BYTEA NOT NULL CONSTRAINT import_tokens_key_id UNIQUE,
    public_key  BYTEA NOT NULL,
    created     DOUBLE PRECISION NOT NULL,
    expires     DOUBLE PRECISION NOT NULL,
    destroyed   INTEGER NOT NULL DEFAULT 0,
    caller      TEXT NOT NULL DEFAULT '',
    used        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX import_tokens_live ON import_tokens(expires) WHERE destroyed = 0;
""",
    ),
    # Issue 17: a key's next primary version and when it becomes primary (a rotation with a
    # lead time), and when a version stopped or stops being primary (an issuer's JWKS keeps it
    # for a grace period after). Nullable, without a default: no row is rewritten.
    (
        2,
        """
ALTER TABLE keys ADD COLUMN next_primary INTEGER, ADD COLUMN next_primary_at DOUBLE PRECISION;
ALTER TABLE versions ADD COLUMN retired_at DOUBLE PRECISION;
""",
    ),
)

# Advisory locks are the database's, the service's tables the schema's: every lock is named by
# this namespace and a hash of (schema, purpose), so that two deployments (or staging and
# production) in one database never serialise each other (REVIEW.md 4).
LOCK_NAMESPACE = 0x5167
# Its SQL: one argument, the purpose (e.g. "migrate", "audit-chain").
XACT_LOCK = (
    "SELECT pg_advisory_xact_lock(%s, hashtext(coalesce(current_schema(), '') || ':' || %s))"
)


# locked(): a session lock, released explicitly (pg_advisory_unlock), or by the server when
# the connection goes. Its key as xact_lock's: namespace, hash of (schema, purpose).
_SESSION_LOCK = "SELECT pg_advisory_lock(%s, hashtext(coalesce(current_schema(), '') || ':' || %s))"
_SESSION_UNLOCK = (
    "SELECT pg_advisory_unlock(%s, hashtext(coalesce(current_schema(), '') || ':' || %s))"
)


# How long a read-decide-write waits for its key's lock: longer than the session's lock_timeout,
# since its holder may be waiting on the token (a key generated: an RSA-4096 pair takes
# seconds), and an emergency DisableKeyVersion must wait that out rather than fail (the
# review's finding 6: it failed after 5 s; SQLite's in-process lock waits).
KEY_LOCK_WAIT = "30s"


def _lock(conn: Connection, args: tuple[int, str]) -> None:
    """Takes a session lock, waiting up to :data:`KEY_LOCK_WAIT` (SET LOCAL: the session's
    own timeout is back after it, whether the lock was taken or not; a session lock outlives
    the transaction that took it)."""
    with transaction(conn):
        conn.execute(f"SET LOCAL lock_timeout = '{KEY_LOCK_WAIT}'")
        conn.execute(_SESSION_LOCK, args)


def _unlock(conn: Connection, args: tuple[int, str]) -> None:
    """Releases a session lock before its connection goes back to the pool; a connection that
    cannot say it did is closed (the pool then drops it, and the server releases the lock)."""
    if conn.broken or conn.closed:
        return
    try:
        conn.execute(_SESSION_UNLOCK, args)
    except psycopg.Error:
        conn.close()


class CommitCutOff(Exception):
    """The connection broke during COMMIT: the write may or may not be on record. Each store
    says so in its own terms (the key store: StoreUncertain; the audit log: CommitUnknown)."""


@contextmanager
def transaction(conn: Connection) -> Iterator[None]:
    """BEGIN ... COMMIT on an autocommit connection (one round trip fewer for a lone read than
    psycopg's implicit transactions). A connection lost before COMMIT was sent leaves nothing
    (the server rolls back); lost during COMMIT: :class:`CommitCutOff`."""
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        if not conn.broken:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except psycopg.Error as exc:
        if conn.broken:
            raise CommitCutOff(str(exc).strip()) from None
        raise


def xact_lock(conn: Connection, purpose: str) -> None:
    """Takes ``purpose``'s transaction-scoped lock in this connection's schema: released at
    COMMIT or ROLLBACK, or when the connection is lost, so never held by a holder that is gone."""
    conn.execute(XACT_LOCK, (LOCK_NAMESPACE, purpose))


def service_conninfo(dsn: str) -> str:
    """The conninfo the service connects to ``dsn`` with (both stores): a primary only
    (``target_session_attrs=read-write``: after a failover onto a standby behind the same name,
    or with several hosts, a read-only server is refused at connect rather than pooled and
    failing every write, REVIEW.md 5).

    It also removes every ``PG*`` variable from this process's environment: libpq reads
    PGPASSWORD, PGSERVICE, PGSSLMODE, PGHOST... for any parameter the URL leaves out, and
    DESIGN.md 9 keeps secrets and settings out of the environment (REVIEW.md 7). Removing them
    rather than spelling out every parameter in the conninfo also covers the variables a newer
    libpq adds (PGREQUIREAUTH, PGLOADBALANCEHOSTS came in 16); and the service has nothing else
    that should read them."""
    for name in [n for n in os.environ if n.startswith("PG")]:
        log.warning(
            "ignoring %s from the environment: the store URL alone says how to connect", name
        )
        del os.environ[name]
    return make_conninfo(dsn, target_session_attrs="read-write")


# Per connection, as the SQLite store's busy_timeout: a lock held too long fails the call
# (UNAVAILABLE), it does not hang it. synchronous_commit is raised to on where the server's
# default is weaker: an OK answer stands for a durable write.
_SESSION = (
    "SET lock_timeout = '5s'; SET statement_timeout = '30s'; "
    "SELECT set_config('synchronous_commit', 'on', false) "
    "WHERE current_setting('synchronous_commit') IN ('off', 'local')"
)
# Reconnecting after an outage: a try at most this often (psycopg_pool's default doubles from
# 1 s without bound).
RECONNECT_MAX_SECONDS = 0.5


# What a fault is matched by: a class of exception, or an SQLSTATE or its two-character class.
Match: TypeAlias = "type[BaseException] | str"

# The one table between psycopg's errors and ours, most specific first (as httpx's
# HTTPCORE_EXC_MAP), with the reason a caller is given. By SQLSTATE, not psycopg's classes:
# a read-only database's 25006 is an InternalError, a deadlock's 40P01 an OperationalError.
# IntegrityError is not here: each write names its own conflict. The rest (a syntax or data
# error, a program limit) are bugs, left to answer INTERNAL.
ERRORS: tuple[tuple[Match, type[SignerError], str], ...] = (
    (
        CommitCutOff,
        StoreUncertain,
        "the connection broke during COMMIT: the write may be on record",
    ),
    ("25006", Unavailable, "the database is read-only: a standby?"),
    ("55P03", Unavailable, "a lock was held too long"),
    ("57014", Unavailable, "a statement ran too long"),
    ("08", Unavailable, "the connection failed"),
    ("40", Unavailable, "a serialization failure or deadlock"),
    ("53", Unavailable, "the database server is out of resources"),
    ("57", Unavailable, "the database server is shutting down or restarting"),
    ("58", Unavailable, "a system error on the database server"),
    (psycopg_pool.PoolTimeout, Unavailable, "no database connection in time"),
    # Failures to connect have no SQLSTATE (libpq's own): by their class.
    (psycopg.OperationalError, Unavailable, "the database cannot be reached"),
    # "the connection is closed": one the pool handed out as the server went away.
    (psycopg.InterfaceError, Unavailable, "the connection is closed"),
)


# libpq refuses a read-only server at connect (target_session_attrs=read-write) in its own
# words, with no SQLSTATE: taken as the 25006 a write on it would get.
_READ_ONLY_AT_CONNECT = ("session is read-only", "server is in hot standby mode")


def _sqlstate(exc: BaseException) -> str | None:
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate
    if isinstance(exc, psycopg.OperationalError) and any(
        words in str(exc) for words in _READ_ONLY_AT_CONNECT
    ):
        return "25006"
    return None


def _matches(exc: BaseException, theirs: Match) -> bool:
    if isinstance(theirs, str):
        sqlstate = _sqlstate(exc)
        return sqlstate is not None and sqlstate.startswith(theirs)
    if theirs is psycopg.OperationalError:
        # Only a failure to connect (no SQLSTATE): one from the server is matched above or left.
        return isinstance(exc, theirs) and _sqlstate(exc) is None
    return isinstance(exc, theirs)


def fault(exc: BaseException) -> SignerError | None:
    """``exc`` as :data:`ERRORS` maps it, in one line: the reason and the SQLSTATE, never
    libpq's text, which names the host, port and role (that goes to the service log only);
    None if unmapped."""
    for theirs, ours, reason in ERRORS:
        if _matches(exc, theirs):
            log.warning(
                "key store: %s: %s: %s", reason, type(exc).__name__, " ".join(str(exc).split())
            )
            sqlstate = getattr(exc, "sqlstate", None)
            code = f", SQLSTATE {sqlstate}" if sqlstate else ""
            return ours(f"the key store cannot be used ({reason}{code})")
    return None


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Translates what :data:`ERRORS` lists (:func:`fault`); the rest goes on."""
    try:
        yield
    except psycopg.IntegrityError:
        raise
    except Exception as exc:
        ours = fault(exc)
        if ours is None:
            raise
        raise ours from None


P = ParamSpec("P")
R = TypeVar("R")


def _translated(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        with mapped_errors():
            return fn(*args, **kwargs)

    return call


class _CappedBackoff(AttemptWithBackoff):
    """psycopg_pool's reconnect attempt, its delay capped at :data:`RECONNECT_MAX_SECONDS`."""

    INITIAL_DELAY = RECONNECT_MAX_SECONDS

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        # Jittered under the cap (psycopg_pool jitters its first delay only): N replicas back
        # from one outage do not retry in lockstep.
        self.delay = min(self.delay, RECONNECT_MAX_SECONDS * random.uniform(0.8, 1.0))  # noqa: S311 (a delay)


# psycopg_pool has no public setting for it: its pool module's name is replaced (a private
# detail, hence the <3.4 bound on psycopg-pool in pyproject.toml and the test that pins it).
psycopg_pool.pool.AttemptWithBackoff = _CappedBackoff  # type: ignore[attr-defined]


# How long a migration may wait for another replica's, and run: minutes, not the session's
# seconds, lest every replica starting during a long migration fail (REVIEW.md 11).
MIGRATION_TIMEOUT = "10min"


def _schema_version(conn: Connection, component: str) -> int:
    """``component``'s version in this schema, 0 without a ``schema_version`` table: read,
    never created, so that a migrated database needs no CREATE privilege, nor a writable one."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute(
        "SELECT version FROM schema_version WHERE component = %s", (component,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def migrate(conn: Connection, component: str, steps: tuple[tuple[int, str], ...]) -> int:
    """Brings ``component``'s schema to the newest of ``steps`` and returns that version, in
    one transaction under the schema's ``migrate`` lock: a second migrator waits, then finds
    nothing left to do. A database newer than this code (a replica not yet upgraded) is refused.

    The version is read before any lock or DDL: a schema already at the newest version is used
    as it is (by a role without CREATE, on a read-only database); one that needs migrating on
    a read-only database (a standby) is refused in one line, UNAVAILABLE (REVIEW.md 5)."""
    newest = steps[-1][0]
    with conn.transaction():
        have = _schema_version(conn, component)
        if have < newest:
            row = conn.execute("SELECT current_setting('transaction_read_only')").fetchone()
            if row is not None and row[0] == "on":
                raise Unavailable(
                    f"the database is read-only (a standby?): the {component} schema is at "
                    f"version {have}, this service needs {newest}, and it cannot be migrated"
                )
            conn.execute(f"SET LOCAL lock_timeout = '{MIGRATION_TIMEOUT}'")
            conn.execute(f"SET LOCAL statement_timeout = '{MIGRATION_TIMEOUT}'")
            xact_lock(conn, "migrate")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                '(component TEXT COLLATE "C" PRIMARY KEY, version INTEGER NOT NULL)'
            )
            have = _schema_version(conn, component)
        if have > newest:
            raise FailedPrecondition(
                f"the database's {component} schema is version {have}, newer than this "
                f"service's {newest}: upgrade the service"
            )
        for number, statements in steps:
            if number > have:
                conn.execute(statements)
        if have < newest:
            conn.execute(
                "INSERT INTO schema_version (component, version) VALUES (%s, %s) "
                "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                (component, newest),
            )
    return newest


def check_schema(conn: Connection, schema: str) -> None:
    """Fails closed unless the connection's schema is the one the URL names: a schema dropped
    or renamed leaves ``current_schema()`` NULL, and nothing is then created elsewhere
    (REVIEW.md 12)."""
    row = conn.execute("SELECT current_schema()").fetchone()
    current = None if row is None else row[0]
    if current != schema:
        raise FailedPrecondition(
            f"the store's schema {schema!r} (options=-csearch_path= in its URL) "
            + ("does not exist" if current is None else f"is not the connection's ({current!r})")
            + ": create it, or correct the URL"
        )


def _configure(conn: Connection, schema: str) -> None:
    conn.execute(_SESSION)
    check_schema(conn, schema)


def make_pool(
    conninfo: str, schema: str, min_size: int = 2, max_size: int = 8, timeout: float = 2.0
) -> psycopg_pool.ConnectionPool[Connection]:
    """An open pool of autocommit connections to ``conninfo`` (:func:`service_conninfo`), on
    ``schema`` (:func:`check_schema`), each checked at checkout; a caller that waits
    ``timeout`` for one gets PoolTimeout (UNAVAILABLE)."""
    return psycopg_pool.ConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        kwargs={"autocommit": True},
        configure=functools.partial(_configure, schema=schema),
        check=psycopg_pool.ConnectionPool.check_connection,
        name="store",
        open=True,
    )


@translating(_translated)
class PostgresStore(KeyTables):
    """The key store in a PostgreSQL database, in the schema its URL names."""

    INTEGRITY = psycopg.IntegrityError

    def __init__(self, dsn: str) -> None:
        # As the configuration checks it: a store never connects with a URL it would refuse.
        _validate_store(dsn)
        schema = store_schema(store_parameters(dsn))
        conninfo = service_conninfo(dsn)
        # The first connection is the pool's peer, not its own: a server that refuses it (a
        # standby, a bad password) fails the start saying why, not with a pool timeout.
        with mapped_errors(), psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(_SESSION)
            check_schema(conn, schema)
            migrate(conn, "store", STORE_MIGRATIONS)
        self._pool = make_pool(conninfo, schema)
        self._held = threading.local()  # the connection holding this thread's locked()

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """``name``'s lock in the database, so replicas sharing it serialise their
        read-decide-writes on a key (or import token): a session advisory lock on one pooled
        connection, which this thread's store calls then use (each still its own transaction,
        committed as it returns). If that connection is lost, so is the lock, and so does every
        later write of the block fail: nothing is written by a holder that no longer holds.
        Waits up to the session's lock_timeout (UNAVAILABLE after). Nested locks ride on the
        same connection."""
        held: Connection | None = getattr(self._held, "conn", None)
        args = (LOCK_NAMESPACE, name)
        if held is not None:
            with mapped_errors():
                _lock(held, args)
            try:
                yield
            finally:
                _unlock(held, args)
            return
        # The checkout too: a pool with no connection free in time is UNAVAILABLE, as a call's.
        with mapped_errors(), self._pool.connection() as conn:
            _lock(conn, args)
            self._held.conn = conn
            try:
                yield
            finally:
                self._held.conn = None
                _unlock(conn, args)

    @contextmanager
    def _conn(self) -> Iterator[Connection]:
        held: Connection | None = getattr(self._held, "conn", None)
        if held is not None:
            yield held
            return
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._conn() as conn, transaction(conn):
            yield conn
