"""Where the audit log lives: one small interface, and SQLite behind it (PostgreSQL can follow
by implementing :class:`AuditStore`)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from signer._internal.audit._chain import GENESIS, Checkpoint, Event, Record, iso
from signer._internal.files import private_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    caller TEXT NOT NULL,
    operation TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    payload_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    time TEXT NOT NULL,
    signature BLOB NOT NULL,
    prev INTEGER
);
CREATE TABLE IF NOT EXISTS audit_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    key_id BLOB NOT NULL,
    public_key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS archives (
    last_seq INTEGER PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    last_hash TEXT NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
"""


def left_behind(exc: BaseException) -> bool:
    """Whether an :meth:`AuditStore.append` that raised ``exc`` may have left its records in the
    file all the same, to come back after a crash. SQLite rolls back, for this process, a COMMIT
    whose fsync failed; but the WAL frames written before it are whole, and if the process
    dies before a later COMMIT overwrites them, the recovery at the next open replays them (an
    EIO injected into fdatasync: tests/integration/test_io_errors.py; or the WAL index that
    could not be updated after them). Only an I/O error can be that: a lock never taken writes
    nothing, and on a full disk the frame that ran out of room is at the latest the commit
    frame, written last, without which nothing is replayed."""
    if isinstance(exc, sqlite3.Error):  # the module's own (a closed connection) carry no code
        code: int | None = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_IOERR
    return True  # another store's error: assume the worst


@dataclass(frozen=True)
class Archived:
    """A segment moved out of the live log: records ``first_seq``..``last_seq`` in ``file``."""

    first_seq: int
    last_seq: int
    last_hash: str
    file: str
    sha256: str


class AuditStore(Protocol):
    def head(self) -> tuple[int, str]:
        """The newest record's sequence and hash (of the archived one if none is live;
        (0, GENESIS) for an empty log)."""
        ...

    def append(self, records: Sequence[Record]) -> None:
        """All or none, durably."""
        ...

    def add_checkpoint(
        self, checkpoint: Checkpoint, audit_key: tuple[bytes, bytes] | None = None
    ) -> None:
        """Stores ``checkpoint``, durably; with the log's first, ``audit_key`` (key id, public
        key DER) too, in the same transaction: a log never names its key without a checkpoint
        the key signed (a crash between the two would leave what a removal leaves)."""
        ...

    def last_checkpoint(self) -> int: ...
    def checkpoints(self) -> list[Checkpoint]: ...
    def records(self, upto: int | None = None, first: int = 0) -> Iterator[Record]: ...
    def record(self, seq: int) -> Record | None: ...
    def audit_key(self) -> tuple[bytes, bytes] | None: ...
    def archives(self) -> list[Archived]: ...
    def archived(self, segment: Archived) -> None:
        """Records ``segment`` and removes its records, and the checkpoints before its last
        (the one at ``last_seq`` stays: it anchors the live records)."""
        ...

    def close(self) -> None: ...


class SQLiteAuditStore:
    """One SQLite file, WAL, ``synchronous=FULL``: a committed record survives a crash and a
    power cut. ``timeout``: how long a write waits for a lock before failing (closed)."""

    def __init__(self, path: str | Path, read_only: bool = False, timeout: float = 2.0) -> None:
        self.path = str(path)
        if read_only:
            if not Path(self.path).exists():
                raise FileNotFoundError(self.path)
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        private_database(self.path)
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=timeout
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(checkpoints)")}
        if "prev" not in columns:  # a log from before checkpoints chained
            self._db.execute("ALTER TABLE checkpoints ADD COLUMN prev INTEGER")

    def head(self) -> tuple[int, str]:
        row = self._db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        if row:
            return int(row[0]), str(row[1])
        archives = self.archives()
        return (archives[-1].last_seq, archives[-1].last_hash) if archives else (0, GENESIS)

    def append(self, records: Sequence[Record]) -> None:
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
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise

    def add_checkpoint(
        self, checkpoint: Checkpoint, audit_key: tuple[bytes, bytes] | None = None
    ) -> None:
        c = checkpoint
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if audit_key is not None:
                self._db.execute(
                    "INSERT INTO audit_key (id, key_id, public_key) VALUES (1, ?, ?)", audit_key
                )
            self._db.execute(
                "INSERT INTO checkpoints (seq, hash, time, signature, prev) VALUES (?,?,?,?,?)",
                (c.seq, c.hash, c.time, c.signature, c.prev),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise

    def last_checkpoint(self) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM checkpoints").fetchone()
        return int(row[0] or 0)

    def checkpoints(self) -> list[Checkpoint]:
        rows = self._db.execute(
            "SELECT seq, hash, time, signature, prev FROM checkpoints ORDER BY seq"
        )
        return [Checkpoint(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]

    def record(self, seq: int) -> Record | None:
        return next(self.records(first=seq, upto=seq), None)

    def records(self, upto: int | None = None, first: int = 0) -> Iterator[Record]:
        query = (
            "SELECT seq, time, caller, operation, key, version, payload_sha256, status, "
            "prev_hash, hash FROM records WHERE seq >= ? AND seq <= ? ORDER BY seq"
        )
        params = (first, upto if upto is not None else 2**62)
        for row in self._db.execute(query, params):
            event = Event(datetime.fromisoformat(row[1]), *row[2:8])
            yield Record(row[0], event, row[8], row[9])

    def audit_key(self) -> tuple[bytes, bytes] | None:
        row = self._db.execute("SELECT key_id, public_key FROM audit_key").fetchone()
        return (bytes(row[0]), bytes(row[1])) if row else None

    def archives(self) -> list[Archived]:
        rows = self._db.execute(
            "SELECT first_seq, last_seq, last_hash, file, sha256 FROM archives ORDER BY last_seq"
        )
        return [Archived(*r) for r in rows]

    def archived(self, segment: Archived) -> None:
        s = segment
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT INTO archives VALUES (?,?,?,?,?)",
                (s.last_seq, s.first_seq, s.last_hash, s.file, s.sha256),
            )
            self._db.execute("DELETE FROM records WHERE seq <= ?", (s.last_seq,))
            self._db.execute("DELETE FROM checkpoints WHERE seq < ?", (s.last_seq,))
            self._db.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise

    def _roll_back(self) -> None:
        """After a failed write: SQLite may have rolled back already (a full disk at COMMIT),
        and a ROLLBACK that fails too must not hide the error that matters."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def close(self) -> None:
        self._db.close()
