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
* **Faults map through one table**, :data:`ERRORS`: every ``psycopg.OperationalError`` (the
  server gone or shutting down, a pool timeout, a lock or statement timeout, a full disk) is
  UNAVAILABLE naming why; a COMMIT whose connection broke has an unknown outcome, and is
  :class:`~signer.errors.StoreUncertain`, as the SQLite store's COMMIT that failed with an I/O
  error.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, ParamSpec, TypeAlias, TypeVar

import psycopg
import psycopg_pool
import psycopg_pool.pool
from psycopg_pool.base import AttemptWithBackoff

from signer._internal.store import _dt, _import_token, _version, translating
from signer.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    SignerError,
    StoreUncertain,
    Unavailable,
)
from signer.keys import ImportToken, Key, State, Version

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
)

# Advisory locks are the database's, the service's tables the schema's: every lock is named by
# this namespace and a hash of (schema, purpose), so that two deployments (or staging and
# production) in one database never serialise each other (REVIEW.md 4).
LOCK_NAMESPACE = 0x5167
# Its SQL: one argument, the purpose (e.g. "migrate", "audit-chain").
XACT_LOCK = (
    "SELECT pg_advisory_xact_lock(%s, hashtext(coalesce(current_schema(), '') || ':' || %s))"
)


def xact_lock(conn: Connection, purpose: str) -> None:
    """Takes ``purpose``'s transaction-scoped lock in this connection's schema: released at
    COMMIT or ROLLBACK, or when the connection is lost, so never held by a holder that is gone."""
    conn.execute(XACT_LOCK, (LOCK_NAMESPACE, purpose))

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


class _CommitUnknown(Exception):
    """The connection broke during COMMIT: the write may or may not be on record."""


# The one table between psycopg's errors and ours, most specific first (as httpx's
# HTTPCORE_EXC_MAP). IntegrityError is not here: each write names its own conflict.
# ProgrammingError and DataError are bugs, left to answer INTERNAL.
ERRORS: tuple[tuple[type[BaseException], type[SignerError]], ...] = (
    (_CommitUnknown, StoreUncertain),
    # The server gone, shutting down or refusing (57P0x, 08xxx), PoolTimeout, lock_timeout
    # (55P03), statement_timeout (57014), a full disk (53100), an I/O error (58030), a
    # serialization failure or deadlock (40xxx): all subclass OperationalError.
    (psycopg.OperationalError, Unavailable),
    # "the connection is closed": one the pool handed out as the server went away.
    (psycopg.InterfaceError, Unavailable),
)


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Translates what :data:`ERRORS` lists, naming why (the first line of the error: never
    the DSN's password, which libpq's messages do not carry)."""
    try:
        yield
    except psycopg.IntegrityError:
        raise
    except Exception as exc:
        for theirs, ours in ERRORS:
            if isinstance(exc, theirs):
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ours(f"the key store cannot be used ({why})") from None
        raise


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
        self.delay = min(self.delay, RECONNECT_MAX_SECONDS)


# psycopg_pool has no public setting for it: its pool module's name is replaced (a private
# detail, hence the <3.4 bound on psycopg-pool in pyproject.toml and the test that pins it).
psycopg_pool.pool.AttemptWithBackoff = _CappedBackoff  # type: ignore[attr-defined]


def migrate(conn: Connection, component: str, steps: tuple[tuple[int, str], ...]) -> int:
    """Brings ``component``'s schema to the newest of ``steps`` and returns that version, in
    one transaction under the schema's ``migrate`` lock: a second migrator waits, then finds nothing
    left to do. A database newer than this code (a replica not yet upgraded) is refused."""
    newest = steps[-1][0]
    with conn.transaction():
        xact_lock(conn, "migrate")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            '(component TEXT COLLATE "C" PRIMARY KEY, version INTEGER NOT NULL)'
        )
        row = conn.execute(
            "SELECT version FROM schema_version WHERE component = %s", (component,)
        ).fetchone()
        have = 0 if row is None else int(row[0])
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


def _configure(conn: Connection) -> None:
    conn.execute(_SESSION)


def make_pool(
    dsn: str, min_size: int = 2, max_size: int = 8, timeout: float = 2.0
) -> psycopg_pool.ConnectionPool[Connection]:
    """An open pool of autocommit connections to ``dsn``, each checked at checkout; a caller
    that waits ``timeout`` for one gets PoolTimeout (UNAVAILABLE)."""
    return psycopg_pool.ConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout,
        kwargs={"autocommit": True},
        configure=_configure,
        check=psycopg_pool.ConnectionPool.check_connection,
        name="store",
        open=True,
    )


# A key and its versions in one statement, one snapshot (under READ COMMITTED, two statements
# could mix two states of one key): the key's columns, then its versions' (none: NULLs).
_GET_KEY = (
    "SELECT k.name, k.algorithm, k.primary_version, k.scope, k.labels, k.created, v.name, "
    "v.version, v.algorithm, v.state, v.key_id, v.public_key, v.created, v.destroy_at "
    "FROM keys k LEFT JOIN versions v ON v.name = k.name WHERE k.name = %s ORDER BY v.version"
)
_LIST_KEYS = (
    "SELECT k.name, k.algorithm, k.primary_version, k.scope, k.labels, k.created, v.name, "
    "v.version, v.algorithm, v.state, v.key_id, v.public_key, v.created, v.destroy_at "
    "FROM (SELECT * FROM keys WHERE name > %s ORDER BY name LIMIT %s) k "
    "LEFT JOIN versions v ON v.name = k.name ORDER BY k.name, v.version"
)
_LIST_SCOPE_KEYS = (
    "SELECT k.name, k.algorithm, k.primary_version, k.scope, k.labels, k.created, v.name, "
    "v.version, v.algorithm, v.state, v.key_id, v.public_key, v.created, v.destroy_at "
    "FROM (SELECT * FROM keys WHERE scope = %s AND name > %s ORDER BY name LIMIT %s) k "
    "LEFT JOIN versions v ON v.name = k.name ORDER BY k.name, v.version"
)


@translating(_translated)
class PostgresStore:
    """The key store in a PostgreSQL database (the schema on the DSN's search_path)."""

    def __init__(self, dsn: str) -> None:
        self._pool = make_pool(dsn)
        try:
            with mapped_errors(), self._pool.connection() as conn:
                migrate(conn, "store", STORE_MIGRATIONS)
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _conn(self) -> Iterator[Connection]:
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """BEGIN ... COMMIT on one pooled connection. A connection lost before COMMIT was sent
        leaves nothing (the server rolls back); lost during COMMIT, the outcome is unknown."""
        with self._conn() as conn:
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
                    raise _CommitUnknown(str(exc).strip()) from None
                raise

    # --- reads --------------------------------------------------------------------------------

    def _keys(self, conn: Connection, query: str, args: tuple[Any, ...]) -> list[Key]:
        rows = conn.execute(query, args)
        found: dict[str, tuple[tuple[Any, ...], list[Version]]] = {}
        for row in rows:
            key_row, version_row = row[:6], row[6:]
            _, versions = found.setdefault(key_row[0], (key_row, []))
            if version_row[0] is not None:
                versions.append(_version(version_row))
        keys = []
        for (name, alg, primary, scope, labels, created), versions in found.values():
            created_dt = _dt(created)
            assert created_dt is not None
            keys.append(
                Key(name, alg, primary, scope, json.loads(labels), created_dt, tuple(versions))
            )
        return keys

    def get_key(self, name: str) -> Key:
        with self._conn() as conn:
            keys = self._keys(conn, _GET_KEY, (name,))
        if not keys:
            raise NotFound(f"key {name!r} not found")
        return keys[0]

    def get_version(self, name: str, version: int) -> Version:
        """One version (0: the primary) in one query: this is on every signature's path."""
        with self._conn() as conn:
            row = conn.execute(
                "SELECT v.name, v.version, v.algorithm, v.state, v.key_id, v.public_key, "
                "v.created, v.destroy_at FROM keys k JOIN versions v ON v.name = k.name "
                "AND v.version = (CASE WHEN %(v)s = 0 THEN k.primary_version ELSE %(v)s END) "
                "WHERE k.name = %(n)s",
                {"n": name, "v": version},
            ).fetchone()
            if row is not None:
                return _version(row)
            if conn.execute("SELECT 1 FROM keys WHERE name = %s", (name,)).fetchone() is None:
                raise NotFound(f"key {name!r} not found")
        raise NotFound(f"key {name!r} has no version {version}")

    def list_keys(self, after: str, limit: int, scope: str | None = None) -> list[Key]:
        """Keys after ``after`` in name order (byte order: the columns are COLLATE "C"); with
        ``scope``, that scope's only, by its index."""
        args: tuple[str | int, ...] = (after, limit)
        query = _LIST_KEYS
        if scope is not None:
            query, args = _LIST_SCOPE_KEYS, (scope, after, limit)
        with self._conn() as conn:
            return self._keys(conn, query, args)

    def due_for_destruction(self, now: datetime) -> list[Version]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT name, version, algorithm, state, key_id, public_key, created, destroy_at "
                "FROM versions WHERE state = %s AND destroy_at <= %s ORDER BY destroy_at",
                (State.DESTRUCTION_SCHEDULED.value, now.timestamp()),
            ).fetchall()
        return [_version(r) for r in rows]

    def get_import_token(self, token: str) -> ImportToken:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT token, key_id, public_key, created, expires, destroyed, caller, used "
                "FROM import_tokens WHERE token = %s",
                (token,),
            ).fetchone()
        if row is None:
            raise NotFound("import token not found")
        return _import_token(row)

    def spent_import_tokens(self, now: datetime) -> list[ImportToken]:
        """Used or expired tokens whose wrapping keys are still in the token."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT token, key_id, public_key, created, expires, destroyed, caller, used "
                "FROM import_tokens WHERE destroyed = 0 AND (used = 1 OR expires <= %s) "
                "ORDER BY expires",
                (now.timestamp(),),
            ).fetchall()
        return [_import_token(r) for r in rows]

    def live_import_tokens(self, now: datetime) -> list[ImportToken]:
        """Tokens still usable for an import, oldest first."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT token, key_id, public_key, created, expires, destroyed, caller, used "
                "FROM import_tokens WHERE destroyed = 0 AND used = 0 AND expires > %s "
                "ORDER BY created",
                (now.timestamp(),),
            ).fetchall()
        return [_import_token(r) for r in rows]

    # --- writes -------------------------------------------------------------------------------

    def add_import_token(self, token: ImportToken) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO import_tokens "
                "(token, key_id, public_key, created, expires, destroyed, caller, used) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    token.token,
                    token.key_id,
                    token.public_key_der,
                    token.created.timestamp(),
                    token.expires.timestamp(),
                    int(token.destroyed),
                    token.caller,
                    int(token.used),
                ),
            )

    def set_import_token_destroyed(self, token: str) -> None:
        with self._tx() as conn:
            cur = conn.execute("UPDATE import_tokens SET destroyed = 1 WHERE token = %s", (token,))
            if cur.rowcount != 1:
                raise NotFound("import token not found")

    def create_key(self, key: Key, import_token: str | None = None) -> None:
        try:
            with self._tx() as conn:
                if import_token is not None:
                    _use_import_token(conn, import_token)
                conn.execute(
                    "INSERT INTO keys (name, algorithm, primary_version, scope, labels, created) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    (
                        key.name,
                        key.algorithm,
                        key.primary,
                        key.scope,
                        json.dumps(key.labels, sort_keys=True),
                        key.created.timestamp(),
                    ),
                )
                for v in key.versions:
                    _insert_version(conn, v)
        except psycopg.IntegrityError as exc:
            raise _already(exc, f"key {key.name!r} already exists") from None

    def add_version(
        self, version: Version, make_primary: bool, import_token: str | None = None
    ) -> None:
        try:
            with self._tx() as conn:
                if import_token is not None:
                    _use_import_token(conn, import_token)
                _insert_version(conn, version)
                if make_primary:
                    conn.execute(
                        "UPDATE keys SET primary_version = %s WHERE name = %s",
                        (version.version, version.name),
                    )
        except psycopg.IntegrityError as exc:
            raise _already(
                exc, f"key {version.name!r} already has version {version.version}"
            ) from None

    def set_primary(self, name: str, version: int) -> None:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE keys SET primary_version = %s WHERE name = %s", (version, name)
            )
            if cur.rowcount != 1:
                raise NotFound(f"key {name!r} not found")

    def set_state(self, name: str, version: int, state: State, destroy_at: datetime | None) -> None:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE versions SET state = %s, destroy_at = %s WHERE name = %s AND version = %s",
                (
                    state.value,
                    None if destroy_at is None else destroy_at.timestamp(),
                    name,
                    version,
                ),
            )
            if cur.rowcount != 1:
                raise NotFound(f"key {name!r} has no version {version}")


def _already(exc: psycopg.IntegrityError, otherwise: str) -> AlreadyExists:
    """By the constraint's name, not the message's text (the SQLite store has only the text)."""
    constraint = exc.diag.constraint_name or ""
    if constraint == "versions_key_id":
        return AlreadyExists("another key version already has this token object id")
    if constraint == "versions_public_key":
        return AlreadyExists(
            "this key pair is already a key version in this service: a key pair is imported "
            "once (import a new key pair instead)"
        )
    return AlreadyExists(otherwise)


def _use_import_token(conn: Connection, token: str) -> None:
    """Marks ``token`` used, in the transaction that stores what it imported: single use (the
    UPDATE re-checks ``used = 0`` under the row's lock, so two replicas cannot both use it)."""
    cur = conn.execute("UPDATE import_tokens SET used = 1 WHERE token = %s AND used = 0", (token,))
    if cur.rowcount != 1:
        raise FailedPrecondition(
            "import_token was already used: each import needs its own (call GetImportParameters)"
        )


def _insert_version(conn: Connection, v: Version) -> None:
    # Named before the insert, as the SQLite store does: a second version of one token object
    # also repeats its public key, and the object is the more telling of the two.
    if conn.execute("SELECT 1 FROM versions WHERE key_id = %s", (v.key_id,)).fetchone():
        raise AlreadyExists("another key version already has this token object id")
    conn.execute(
        "INSERT INTO versions "
        "(name, version, algorithm, state, key_id, public_key, created, destroy_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            v.name,
            v.version,
            v.algorithm,
            v.state.value,
            v.key_id,
            v.public_key_der,
            v.created.timestamp(),
            None if v.destroy_at is None else v.destroy_at.timestamp(),
        ),
    )
