"""Key metadata: names, versions, states, public keys. SQLite by default.

The token holds the private keys; this holds everything else the service needs to know about
them. :class:`Store` is the small interface both stores implement: :class:`SQLiteStore` here,
:class:`~signer._internal.pgstore.PostgresStore` for replicas sharing a database (issue 16).
:func:`open_store` picks one from ``[store] path``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from signer._internal.config import STORE_URL_SCHEMES
from signer._internal.files import private_database
from signer._internal.locks import NamedLocks
from signer.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    StoreUncertain,
    Unavailable,
)
from signer.keys import ImportToken, Key, State, Version

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name            TEXT PRIMARY KEY,
    algorithm       TEXT NOT NULL,
    primary_version INTEGER NOT NULL,
    scope           TEXT NOT NULL DEFAULT '',
    labels          TEXT NOT NULL DEFAULT '{}',
    created         REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    name        TEXT NOT NULL REFERENCES keys(name),
    version     INTEGER NOT NULL,
    algorithm   TEXT NOT NULL,
    state       TEXT NOT NULL,
    key_id      BLOB NOT NULL UNIQUE,
    public_key  BLOB NOT NULL,
    created     REAL NOT NULL,
    destroy_at  REAL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS versions_destroy_at ON versions(destroy_at) WHERE destroy_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS keys_scope ON keys(scope, name);
CREATE TABLE IF NOT EXISTS import_tokens (
    token       TEXT PRIMARY KEY,
    key_id      BLOB NOT NULL UNIQUE,
    public_key  BLOB NOT NULL,
    created     REAL NOT NULL,
    expires     REAL NOT NULL,
    destroyed   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS import_tokens_live ON import_tokens(expires) WHERE destroyed = 0;
"""
# Columns added since the first schema, for stores made before them. Issue 11: an import token
# is bound to the caller who asked for it and is used once. Issue 17: a key's next primary
# version and when it becomes primary (a rotation with a lead time), and when a version stopped
# or stops being primary (an issuer's JWKS keeps it for a grace period after).
_ADDED_COLUMNS = {
    "import_tokens": (
        ("caller", "TEXT NOT NULL DEFAULT ''"),
        ("used", "INTEGER NOT NULL DEFAULT 0"),
    ),
    "keys": (
        ("next_primary", "INTEGER"),
        ("next_primary_at", "REAL"),
    ),
    "versions": (("retired_at", "REAL"),),
}
# One key pair, one key version: the same private key imported twice (into two keys, two
# scopes) would let one scope's signatures verify as another's (issue 11).
_UNIQUE_PUBLIC_KEYS = (
    "CREATE UNIQUE INDEX IF NOT EXISTS versions_public_key ON versions(public_key)"
)


def _ts(t: datetime) -> float:
    return t.timestamp()


def _dt(x: float | None) -> datetime | None:
    return None if x is None else datetime.fromtimestamp(x, UTC)


def _ts_or_none(t: datetime | None) -> float | None:
    return None if t is None else t.timestamp()


# (version, retired_at) pairs a primary change writes in its transaction; None clears it.
Retirements = tuple[tuple[int, datetime | None], ...]


class Store(Protocol):
    # ``import_token``: the import token a key or version was imported with, marked used in
    # the same transaction (FAILED_PRECONDITION if it already was).
    def create_key(self, key: Key, import_token: str | None = None) -> None: ...
    def get_key(self, name: str) -> Key: ...
    def list_keys(self, after: str, limit: int, scope: str | None = None) -> list[Key]: ...
    def get_version(self, name: str, version: int, now: datetime | None = None) -> Version: ...
    def add_version(
        self,
        version: Version,
        make_primary: bool,
        import_token: str | None = None,
        *,
        primary_at: datetime | None = None,
        retire: Retirements = (),
    ) -> None: ...
    def set_primary(self, name: str, version: int, *, retire: Retirements = ()) -> None: ...
    def set_state(
        self, name: str, version: int, state: State, destroy_at: datetime | None
    ) -> None: ...
    def due_for_destruction(self, now: datetime) -> list[Version]: ...
    # Import tokens: added once, used once, their wrapping keys destroyed after use or expiry.
    # Rows are kept, so a used or expired token is told apart from an unknown one.
    def add_import_token(self, token: ImportToken) -> None: ...
    def get_import_token(self, token: str) -> ImportToken: ...
    def live_import_tokens(self, now: datetime) -> list[ImportToken]: ...
    def spent_import_tokens(self, now: datetime) -> list[ImportToken]: ...
    def set_import_token_destroyed(self, token: str) -> None: ...
    def locked(self, name: str) -> AbstractContextManager[None]:
        """Holds ``name``'s lock (a key's ``key:NAME``, an import token's ``import:TOKEN``)
        for a read-decide-write: every process sharing the store waits for it (replicas on
        one database), so what is decided under it is about the state it acts on."""
        ...

    def close(self) -> None: ...


POSTGRES_SCHEMES = STORE_URL_SCHEMES


def is_postgres(location: str) -> bool:
    """Whether ``[store] path`` names a PostgreSQL database (a libpq URL) rather than a file."""
    return location.startswith(POSTGRES_SCHEMES)


def open_store(location: str) -> Store:
    """The store ``[store] path`` names: a ``postgresql://`` URL, else an SQLite file. psycopg
    is imported only for the first: a single-machine service does not load it."""
    if is_postgres(location):
        from signer._internal.pgstore import PostgresStore

        return PostgresStore(location)
    return SQLiteStore(location)


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _unavailable_on_failure(fn: Callable[P, R]) -> Callable[P, R]:
    """A store that cannot be read or written (a full disk, an I/O error, a lock held too
    long) answers UNAVAILABLE naming why: a fault of the machine, not of the call, and never
    an INTERNAL with a traceback. Integrity errors are the methods' own to translate.

    SQLite reports a read that failed with EIO as a malformed database (SQLITE_CORRUPT, on
    purpose: unixRead's SQLITE_IOERR_CORRUPTFS), though the file may be whole and the next read
    succeed (tests/integration/test_io_errors.py): the message says so, lest it send an
    operator to restore a backup for a disk that failed a read."""

    @functools.wraps(fn)
    def translated(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            why = str(exc)
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code == sqlite3.SQLITE_CORRUPT:
                why += "; SQLite says this of a read that failed with an I/O error too"
            if code == sqlite3.SQLITE_IOERR:
                raise StoreUncertain(f"the key store cannot be used ({why})") from None
            raise Unavailable(f"the key store cannot be used ({why})") from None

    return translated


def translating(wrap: Callable[[Any], Any]) -> Callable[[type[T]], type[T]]:
    """A class decorator: every public method of a store wrapped in ``wrap``, its backend's
    translation of faults into the project's errors (SQLite's here, PostgreSQL's in pgstore)."""

    def decorate(cls: type[T]) -> type[T]:
        # Its own methods and those it inherits (the audit stores' shared Tables).
        members: dict[str, Any] = {}
        for klass in reversed(cls.__mro__[:-1]):
            members.update(vars(klass))
        for name, member in members.items():
            if inspect.isfunction(member) and not name.startswith("_"):
                setattr(cls, name, wrap(member))
        return cls

    return decorate


# A key and its versions in one statement, one snapshot (under PostgreSQL's READ COMMITTED, two
# statements could mix two states of one key): the key's columns, then its versions' (none:
# NULLs). Name order is byte order on both (SQLite's BINARY; PostgreSQL's columns COLLATE "C").
_GET_KEY = (
    "SELECT k.name, k.algorithm, k.primary_version, k.scope, k.labels, k.created, "
    "k.next_primary, k.next_primary_at, v.name, v.version, v.algorithm, v.state, v.key_id, "
    "v.public_key, v.created, v.destroy_at, v.retired_at "
    "FROM keys k LEFT JOIN versions v ON v.name = k.name WHERE k.name = %s "
    "ORDER BY v.version"
)
_LIST_KEYS = (
    "SELECT k.name, k.algorithm, k.primary_version, k.scope, k.labels, k.created, "
    "k.next_primary, k.next_primary_at, v.name, v.version, v.algorithm, v.state, v.key_id, "
    "v.public_key, v.created, v.destroy_at, v.retired_at "
    "FROM (SELECT * FROM keys WHERE name > %s ORDER BY name LIMIT %s) k "
    "LEFT JOIN versions v ON v.name = k.name ORDER BY k.name, v.version"
)
_LIST_SCOPE_KEYS = (
    "SELECT k.name, k.algorithm, k.primary_version, k.scope, k.labels, k.created, "
    "k.next_primary, k.next_primary_at, v.name, v.version, v.algorithm, v.state, v.key_id, "
    "v.public_key, v.created, v.destroy_at, v.retired_at "
    "FROM (SELECT * FROM keys WHERE scope = %s AND name > %s ORDER BY name "
    "LIMIT %s) k LEFT JOIN versions v ON v.name = k.name ORDER BY k.name, v.version"
)


@functools.lru_cache(maxsize=64)
def _placeholders(query: str, placeholder: str) -> str:
    """``query`` with ``placeholder`` for ``%s``: once per statement, not on every signature."""
    return query.replace("%s", placeholder)


class KeyTables:
    """The key store's reads and writes, written once for both stores in DB-API terms (SQL with
    ``%s``; SQLite's ``?`` substituted). A store gives the connection to read with
    (:meth:`_conn`), the write transaction (:meth:`_tx`) and its integrity error's class."""

    PLACEHOLDER = "%s"
    INTEGRITY: type[Exception] = sqlite3.IntegrityError

    def _sql(self, query: str) -> str:
        return query if self.PLACEHOLDER == "%s" else _placeholders(query, self.PLACEHOLDER)

    def _conn(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    # --- reads --------------------------------------------------------------------------------

    def _keys(self, conn: Any, query: str, args: tuple[Any, ...]) -> list[Key]:
        found: dict[str, tuple[tuple[Any, ...], list[Version]]] = {}
        for row in conn.execute(self._sql(query), args).fetchall():
            key_row, version_row = tuple(row[:8]), tuple(row[8:])
            _, versions = found.setdefault(key_row[0], (key_row, []))
            if version_row[0] is not None:
                versions.append(_version(version_row))
        keys = []
        for key_row, versions in found.values():
            name, alg, primary, scope, labels, created, next_primary, next_at = key_row
            created_dt = _dt(created)
            assert created_dt is not None
            keys.append(
                Key(
                    name,
                    alg,
                    primary,
                    scope,
                    json.loads(labels),
                    created_dt,
                    tuple(versions),
                    next_primary,
                    _dt(next_at),
                )
            )
        return keys

    def get_key(self, name: str) -> Key:
        with self._conn() as conn:
            keys = self._keys(conn, _GET_KEY, (name,))
        if not keys:
            raise NotFound(f"key {name!r} not found")
        return keys[0]

    def get_version(self, name: str, version: int, now: datetime | None = None) -> Version:
        """One version (0: the primary at ``now``, the wall clock's by default: a scheduled
        next version once its time has come) in one query: this is on every signature's
        path."""
        at = _ts(now or datetime.now(UTC))
        with self._conn() as conn:
            row = conn.execute(
                self._sql(
                    "SELECT v.name, v.version, v.algorithm, v.state, v.key_id, v.public_key, "
                    "v.created, v.destroy_at, v.retired_at FROM keys k JOIN versions v "
                    "ON v.name = k.name AND v.version = (CASE WHEN %s <> 0 THEN %s "
                    "WHEN k.next_primary_at <= %s THEN k.next_primary "
                    "ELSE k.primary_version END) WHERE k.name = %s"
                ),
                (version, version, at, name),
            ).fetchone()
            if row is not None:
                return _version(tuple(row))
            known = conn.execute(self._sql("SELECT 1 FROM keys WHERE name = %s"), (name,))
            if known.fetchone() is None:
                raise NotFound(f"key {name!r} not found")
        raise NotFound(f"key {name!r} has no version {version}")

    def list_keys(self, after: str, limit: int, scope: str | None = None) -> list[Key]:
        """Keys after ``after`` in name order; with ``scope``, that scope's only (by its index:
        a JWKS costs the keys of its scope, not of the whole store)."""
        args: tuple[str | int, ...] = (after, limit)
        query = _LIST_KEYS
        if scope is not None:
            query, args = _LIST_SCOPE_KEYS, (scope, after, limit)
        with self._conn() as conn:
            return self._keys(conn, query, args)

    def _rows(self, query: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._conn() as conn:
            return [tuple(r) for r in conn.execute(self._sql(query), args).fetchall()]

    def due_for_destruction(self, now: datetime) -> list[Version]:
        rows = self._rows(
            "SELECT name, version, algorithm, state, key_id, public_key, created, destroy_at, "
            "retired_at FROM versions WHERE state = %s AND destroy_at <= %s ORDER BY destroy_at",
            (State.DESTRUCTION_SCHEDULED.value, _ts(now)),
        )
        return [_version(r) for r in rows]

    def get_import_token(self, token: str) -> ImportToken:
        rows = self._rows(
            "SELECT token, key_id, public_key, created, expires, destroyed, caller, used "
            "FROM import_tokens WHERE token = %s",
            (token,),
        )
        if not rows:
            raise NotFound("import token not found")
        return _import_token(rows[0])

    def spent_import_tokens(self, now: datetime) -> list[ImportToken]:
        """Used or expired tokens whose wrapping keys are still in the token."""
        rows = self._rows(
            "SELECT token, key_id, public_key, created, expires, destroyed, caller, used "
            "FROM import_tokens WHERE destroyed = 0 AND (used = 1 OR expires <= %s) "
            "ORDER BY expires",
            (_ts(now),),
        )
        return [_import_token(r) for r in rows]

    def live_import_tokens(self, now: datetime) -> list[ImportToken]:
        """Tokens still usable for an import, oldest first."""
        rows = self._rows(
            "SELECT token, key_id, public_key, created, expires, destroyed, caller, used "
            "FROM import_tokens WHERE destroyed = 0 AND used = 0 AND expires > %s "
            "ORDER BY created",
            (_ts(now),),
        )
        return [_import_token(r) for r in rows]

    # --- writes -------------------------------------------------------------------------------

    def add_import_token(self, token: ImportToken) -> None:
        with self._tx() as conn:
            conn.execute(
                self._sql(
                    "INSERT INTO import_tokens (token, key_id, public_key, created, expires, "
                    "destroyed, caller, used) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                ),
                (
                    token.token,
                    token.key_id,
                    token.public_key_der,
                    _ts(token.created),
                    _ts(token.expires),
                    int(token.destroyed),
                    token.caller,
                    int(token.used),
                ),
            )

    def set_import_token_destroyed(self, token: str) -> None:
        with self._tx() as conn:
            cur = conn.execute(
                self._sql("UPDATE import_tokens SET destroyed = 1 WHERE token = %s"), (token,)
            )
            if cur.rowcount != 1:
                raise NotFound("import token not found")

    def create_key(self, key: Key, import_token: str | None = None) -> None:
        try:
            with self._tx() as conn:
                if import_token is not None:
                    self._use_import_token(conn, import_token)
                conn.execute(
                    self._sql(
                        "INSERT INTO keys (name, algorithm, primary_version, scope, labels, "
                        "created, next_primary, next_primary_at) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                    ),
                    (
                        key.name,
                        key.algorithm,
                        key.primary,
                        key.scope,
                        json.dumps(key.labels, sort_keys=True),
                        _ts(key.created),
                        key.next_primary,
                        _ts_or_none(key.next_primary_at),
                    ),
                )
                for v in key.versions:
                    self._insert_version(conn, v)
        except self.INTEGRITY as exc:
            raise _already(exc, f"key {key.name!r} already exists") from None

    def add_version(
        self,
        version: Version,
        make_primary: bool,
        import_token: str | None = None,
        *,
        primary_at: datetime | None = None,
        retire: Retirements = (),
    ) -> None:
        """Adds ``version``; with ``make_primary``, it becomes primary at once (a scheduled next
        is dropped), or with ``primary_at`` too, from then: it is scheduled as the key's next
        primary. A next scheduled before must have become primary by then (the keyring refuses
        a rotation while one is pending): it is folded into ``primary_version`` here. ``retire``
        sets versions' ``retired_at`` in the same transaction."""
        try:
            with self._tx() as conn:
                if import_token is not None:
                    self._use_import_token(conn, import_token)
                self._insert_version(conn, version)
                if make_primary and primary_at is not None:
                    conn.execute(
                        self._sql(
                            "UPDATE keys SET primary_version = COALESCE(next_primary, "
                            "primary_version), next_primary = %s, next_primary_at = %s "
                            "WHERE name = %s"
                        ),
                        (version.version, _ts(primary_at), version.name),
                    )
                elif make_primary:
                    self._make_primary(conn, version.name, version.version)
                self._retire(conn, version.name, retire)
        except self.INTEGRITY as exc:
            raise _already(
                exc, f"key {version.name!r} already has version {version.version}"
            ) from None

    def set_primary(self, name: str, version: int, *, retire: Retirements = ()) -> None:
        """Makes ``version`` primary at once, dropping a scheduled next; ``retire`` as in
        :meth:`add_version`."""
        with self._tx() as conn:
            self._make_primary(conn, name, version)
            self._retire(conn, name, retire)

    def _make_primary(self, conn: Any, name: str, version: int) -> None:
        cur = conn.execute(
            self._sql(
                "UPDATE keys SET primary_version = %s, next_primary = NULL, "
                "next_primary_at = NULL WHERE name = %s"
            ),
            (version, name),
        )
        if cur.rowcount != 1:
            raise NotFound(f"key {name!r} not found")

    def _retire(self, conn: Any, name: str, retire: Retirements) -> None:
        for number, at in retire:
            conn.execute(
                self._sql("UPDATE versions SET retired_at = %s WHERE name = %s AND version = %s"),
                (_ts_or_none(at), name, number),
            )

    def set_state(self, name: str, version: int, state: State, destroy_at: datetime | None) -> None:
        with self._tx() as conn:
            cur = conn.execute(
                self._sql(
                    "UPDATE versions SET state = %s, destroy_at = %s WHERE name = %s "
                    "AND version = %s"
                ),
                (state.value, None if destroy_at is None else _ts(destroy_at), name, version),
            )
            if cur.rowcount != 1:
                raise NotFound(f"key {name!r} has no version {version}")

    def _use_import_token(self, conn: Any, token: str) -> None:
        """Marks ``token`` used, in the transaction that stores what it imported: single use
        (the UPDATE re-checks ``used = 0`` under the row's lock, so two replicas cannot both
        use it)."""
        cur = conn.execute(
            self._sql("UPDATE import_tokens SET used = 1 WHERE token = %s AND used = 0"), (token,)
        )
        if cur.rowcount != 1:
            raise FailedPrecondition(
                "import_token was already used: each import needs its own (call "
                "GetImportParameters)"
            )

    def _insert_version(self, conn: Any, v: Version) -> None:
        # Named before the insert: a second version of one token object also repeats its
        # public key, and the object is the more telling of the two.
        taken = conn.execute(self._sql("SELECT 1 FROM versions WHERE key_id = %s"), (v.key_id,))
        if taken.fetchone():
            raise AlreadyExists("another key version already has this token object id")
        conn.execute(
            self._sql(
                "INSERT INTO versions (name, version, algorithm, state, key_id, public_key, "
                "created, destroy_at, retired_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ),
            (
                v.name,
                v.version,
                v.algorithm,
                v.state.value,
                v.key_id,
                v.public_key_der,
                _ts(v.created),
                _ts_or_none(v.destroy_at),
                _ts_or_none(v.retired_at),
            ),
        )


def _already(exc: Exception, otherwise: str) -> AlreadyExists:
    """Which uniqueness a write broke: PostgreSQL names the constraint (versions_key_id,
    versions_public_key), SQLite the columns in its message."""
    diag = getattr(exc, "diag", None)
    what = (getattr(diag, "constraint_name", None) or "") + " " + str(exc)
    if "key_id" in what:
        return AlreadyExists("another key version already has this token object id")
    if "public_key" in what:
        return AlreadyExists(
            "this key pair is already a key version in this service: a key pair is imported "
            "once (import a new key pair instead)"
        )
    return AlreadyExists(otherwise)


@translating(_unavailable_on_failure)
class SQLiteStore(KeyTables):
    """One SQLite file in WAL mode; one connection per thread."""

    PLACEHOLDER = "?"
    INTEGRITY = sqlite3.IntegrityError

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            private_database(self._path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._named = NamedLocks()  # one process owns an SQLite store: its locks are its own
        # executescript manages its own transaction; every statement is IF NOT EXISTS.
        db = self._db()
        db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for column, decl in columns:
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        try:
            db.execute(_UNIQUE_PUBLIC_KEYS)
        except sqlite3.IntegrityError:
            raise FailedPrecondition(
                f"the store {self._path} holds one public key in two key versions (a key pair "
                "imported twice): this service refuses to serve it until that is resolved"
            ) from None

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        yield self._db()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk at COMMIT); a ROLLBACK that
            # fails too must not hide the error that matters.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def locked(self, name: str) -> AbstractContextManager[None]:
        return self._named.hold(name)

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()


def _version(
    row: tuple[str, int, str, str, bytes, bytes, float, float | None, float | None],
) -> Version:
    name, version, alg, state, key_id, pub, created, destroy_at, retired_at = row
    created_dt = _dt(created)
    assert created_dt is not None
    return Version(
        name,
        version,
        alg,
        State(state),
        key_id,
        pub,
        created_dt,
        _dt(destroy_at),
        _dt(retired_at),
    )


def _import_token(row: tuple[str, bytes, bytes, float, float, int, str, int]) -> ImportToken:
    token, key_id, pub, created, expires, destroyed, caller, used = row
    created_dt, expires_dt = _dt(created), _dt(expires)
    assert created_dt is not None
    assert expires_dt is not None
    return ImportToken(
        token, key_id, pub, created_dt, expires_dt, bool(destroyed), caller, bool(used)
    )
