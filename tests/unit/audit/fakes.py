"""The audit key in software, and what the audit log's tests do to a log.

The token's signing is stood in for by a software EC key (the integration tests use the real
token); everything else is the real AuditLog on a real store: an SQLite file, or a schema of the
session's throwaway PostgreSQL cluster (:class:`Backend`; every test runs on both). ``write``
records an event as the server does; ``rows`` and ``rewrite`` read and tamper with the store
underneath.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from signer._internal.audit import (
    AuditLog,
    AuditStore,
    Event,
    FileWitness,
    Signing,
    SQLiteAuditStore,
    verify_log,
)
from signer.keys import SignMechanism

T0 = datetime(2026, 11, 22, tzinfo=UTC)
_schemas = itertools.count(1)


class Cursor(Protocol):
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Tamper(Protocol):
    """What a test does to the store underneath: SQL with ``?`` placeholders, on both."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class _PgTamper:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cur: Cursor = self._conn.execute(sql.replace("?", "%s"), params)
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)


class Backend:
    """Where a test's audit log lives. A test names its logs by paths under tmp_path, as on
    SQLite; on PostgreSQL each path is a schema of its own in the session's cluster
    (:meth:`location`: its DSN). Pinned keys, witnesses and archives stay files under tmp_path
    on both (they are outside the database by design)."""

    def __init__(self, name: str, dsn: Callable[[str], str] | None = None) -> None:
        self.name = name
        self._dsn = dsn  # PostgreSQL: a schema's DSN by its name
        self._schemas: dict[str, str] = {}  # path -> schema
        self.store_class: type[Any] = SQLiteAuditStore
        # What a write held off by a lock fails with.
        self.locked = "database is locked"
        if name == "postgresql":
            from signer._internal.audit._pgstore import PostgresAuditStore

            self.store_class = PostgresAuditStore
            self.locked = r"the audit database cannot be used \(LockNotAvailable, SQLSTATE 55P03"

    @property
    def schemas(self) -> list[str]:
        return list(self._schemas.values())

    def location(self, path: Path) -> str | Path:
        """The log's location as the service and verify take it: the path, or a DSN."""
        if self._dsn is None:
            return path
        schema = self._schemas.setdefault(str(path), f"a{next(_schemas)}")
        return self._dsn(schema)

    def store(self, path: Path, read_only: bool = False) -> AuditStore:
        store: AuditStore = self.store_class(self.location(path), read_only=read_only)
        return store

    @contextlib.contextmanager
    def sql(self, path: Path) -> Iterator[Tamper]:
        """A connection to the store underneath, committed at the end."""
        if self._dsn is None:
            db = sqlite3.connect(path)
            try:
                with db:
                    yield db  # type: ignore[misc]
            finally:
                db.close()
            return
        import psycopg

        with psycopg.connect(str(self.location(path))) as conn:  # commits unless it raised
            yield _PgTamper(conn)

    @contextlib.contextmanager
    def locked_out(self, path: Path) -> Iterator[None]:
        """Another process holds the store (SQLite: the file's lock; PostgreSQL: the tables')
        until the block ends."""
        if self._dsn is None:
            db = sqlite3.connect(path, isolation_level=None)
            try:
                db.execute("BEGIN EXCLUSIVE")
                yield
                db.execute("ROLLBACK")
            finally:
                db.close()
            return
        import psycopg

        with psycopg.connect(str(self.location(path))) as conn:
            conn.execute("LOCK TABLE records, checkpoints IN ACCESS EXCLUSIVE MODE")
            yield
            conn.rollback()


class SoftKey:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public_der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.asked: list[tuple[tuple[bytes, bytes] | None, bytes | None]] = []

    @staticmethod
    def der_of(pem: bytes) -> bytes:
        return serialization.load_pem_public_key(pem).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, key_id: bytes, mech: SignMechanism, digest: bytes) -> bytes:
        assert mech is SignMechanism.ECDSA
        r, s = decode_dss_signature(self.key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def make(
        self, recorded: tuple[bytes, bytes] | None, pinned: bytes | None
    ) -> tuple[Signing, bytes] | None:
        """The token holds this one key: a pinned key that is another is not in it."""
        self.asked.append((recorded, pinned))
        if recorded is None and pinned is not None and pinned != self.public_der:
            return None
        return Signing(self.sign, b"audit"), self.public_der


def write(log: AuditLog, e: Event) -> int:
    """One record, as the server writes it: awaited on an event loop until committed."""
    return asyncio.run(asyncio.wait_for(log.record(e), 30))


def event(i: int, status: str = "OK") -> Event:
    return Event(T0 + timedelta(seconds=i), "x509:CN=app", "Sign", "tokens", 1, f"{i:064x}", status)


def pinned(path: Path) -> bytes:
    return Path(f"{path}.key.pem").read_bytes()


def verdict_of(backend: Backend, path: Path) -> tuple[int, str] | None:
    return verify_log(backend.location(path), pinned(path)).first_bad


def rows(backend: Backend, path: Path) -> list[list[Any]]:
    with backend.sql(path) as db:
        return [
            list(r)
            for r in db.execute(
                "SELECT seq, time, caller, operation, key, version, payload_sha256, status, "
                "prev_hash, hash FROM records ORDER BY seq"
            )
        ]


def rewrite(backend: Backend, path: Path, new_rows: list[list[Any]]) -> None:
    with backend.sql(path) as db:
        db.execute("DELETE FROM records")
        db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?)", new_rows)


def witnessed_log(backend: Backend, tmp_path: Path, soft: SoftKey, n: int) -> tuple[Path, Path]:
    path = tmp_path / "audit.db"
    witness = tmp_path / "elsewhere" / "checkpoints.jsonl"
    witness.parent.mkdir()
    log = AuditLog(
        backend.store(path),
        checkpoint_every=4,
        checkpoint_interval=60,
        witnesses=[FileWitness(witness)],
    )
    log.start(soft.make, tmp_path / "audit.db.key.pem")
    for i in range(1, n + 1):
        write(log, event(i))
    log.close()
    return path, witness
