"""Where the audit log lives: one small interface, SQLite behind it, and PostgreSQL
(signer._internal.audit._pgstore, issue 16) chosen by a ``postgresql://`` location."""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from signer._internal.audit._chain import (
    GENESIS,
    Checkpoint,
    Event,
    Record,
    Ref,
    iso,
    refs_of,
    refs_text,
)
from signer._internal.files import private_database
from signer.errors import FailedPrecondition, SignerError, Unavailable

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
    prev INTEGER,
    refs TEXT NOT NULL DEFAULT ''
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
    frame, written last, without which nothing is replayed. (PostgreSQL's one such case, a
    COMMIT cut off, is :class:`CommitUnknown`: its outcome is read back, not written over.)"""
    if isinstance(exc, sqlite3.Error):  # the module's own (a closed connection) carry no code
        code: int | None = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF == sqlite3.SQLITE_IOERR
    # A store that says (PostgreSQL's: nothing is written unless COMMIT was acknowledged);
    # another store's error: assume the worst.
    return bool(getattr(exc, "may_be_written", True))


class StoreUnavailable(Unavailable):
    """The log's database cannot be used (gone, shutting down, read-only, a lock or statement
    timeout, a full disk), in one line: it goes into refused calls' statuses and health."""

    may_be_written = False


class CommitUnknown(Unavailable):
    """The connection broke during COMMIT: the records may or may not be in the log. The
    writer reads back which before it answers their calls (a log in a database cannot be
    written over, as SQLite's WAL is by :func:`left_behind`'s rewrite)."""

    may_be_written = False


class ChainMoved(SignerError):
    """The log is not where its one writer left it (its head, or its newest checkpoint): a
    second writer, or a change made underneath. Nothing is chained or signed over it."""


@dataclass(frozen=True)
class Archived:
    """A segment moved out of the live log: records ``first_seq``..``last_seq`` in ``file``."""

    first_seq: int
    last_seq: int
    last_hash: str
    file: str
    sha256: str


class AuditStore(Protocol):
    # The chain this store reads and writes ("": a log's one chain; replicas: each its own).
    chain: str

    def head(self) -> tuple[int, str]:
        """The newest record's sequence and hash (of the archived one if none is live;
        (0, GENESIS) for an empty log)."""
        ...

    def append(self, records: Sequence[Record]) -> None:
        """All or none, durably; :class:`ChainMoved` unless they follow the head, read under
        the chain's lock in the transaction that inserts them (the writer chained them after
        the head it left: anything else there it did not write, and will not sign)."""
        ...

    def add_checkpoint(
        self, checkpoint: Checkpoint, audit_key: tuple[bytes, bytes] | None = None
    ) -> None:
        """Stores ``checkpoint``, durably; with the log's first, ``audit_key`` (key id, public
        key DER) too, in the same transaction: a log never names its key without a checkpoint
        the key signed (a crash between the two would leave what a removal leaves).
        :class:`ChainMoved` unless it follows the newest checkpoint and signs a record as it is."""
        ...

    def snapshot(self) -> AbstractContextManager[None]:
        """Reads within are of one moment (a writer's start-up checks: an archive job running
        meanwhile must not make the log look broken)."""
        ...

    def last_checkpoint(self) -> int: ...
    def checkpoints(self) -> list[Checkpoint]: ...
    def records(self, upto: int | None = None, first: int = 0) -> Iterator[Record]: ...
    def record(self, seq: int) -> Record | None: ...
    def audit_key(self) -> tuple[bytes, bytes] | None: ...
    def archives(self) -> list[Archived]: ...
    def archived(self, segment: Archived) -> None:
        """Records ``segment`` and removes its records, and the checkpoints before its last
        (the one at ``last_seq`` stays: it anchors the live records); refused unless the
        segment starts where the live log does (two archive jobs must not overlap)."""
        ...

    def others(self) -> list[Ref]:
        """The newest checkpoint of every other chain in the store, (chain, seq, hash): what
        this chain's next checkpoint refers to (none in a file: it holds one chain)."""
        ...

    def chains(self) -> list[str]:
        """Every chain the store holds anything of."""
        ...

    def on_chain(self, chain: str) -> AuditStore:
        """This store's connection, reading ``chain`` (verify's view of another chain)."""
        ...

    def close(self) -> None: ...


class Tables:
    """The audit log's reads and writes, written once for every store in DB-API terms: SQL with
    ``%(name)s`` parameters (SQLite's ``:name`` substituted), on the store's one chain. A store
    gives the connection to read from and the write transaction that holds the chain's lock.

    A database holds several chains (replicas: :attr:`chain` names the store's), each with its
    own records, checkpoints, archives and audit key; a file holds one, named ``""``, and no
    ``chain`` column (:attr:`CHAINED`)."""

    CHAINED = True
    chain = ""
    _refs = "refs"  # the column; "''" in a file from before it (read only: not added)

    def _sql(self, query: str) -> str:
        """``query`` in the store's terms: ``[chain]`` its condition on the chain, ``[, x]``
        what a chained store inserts besides, ``[refs]`` that column, in its parameter style
        (worked out once per statement and store kind)."""
        return _rendered(query, self.CHAINED, self._refs)

    def _args(self, **values: Any) -> dict[str, Any]:
        return {"chain": self.chain, **values}

    def _read(self) -> Any:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _one(self, conn: Any, query: str, **values: Any) -> Any:
        return conn.execute(self._sql(query), self._args(**values)).fetchone()

    def _all(self, conn: Any, query: str, **values: Any) -> list[Any]:
        return list(conn.execute(self._sql(query), self._args(**values)).fetchall())

    def _head(self, conn: Any) -> tuple[int, str]:
        row = self._one(
            conn, "SELECT seq, hash FROM records WHERE [chain] ORDER BY seq DESC LIMIT 1"
        )
        if row:
            return int(row[0]), str(row[1])
        row = self._one(
            conn,
            "SELECT last_seq, last_hash FROM archives WHERE [chain] ORDER BY last_seq DESC LIMIT 1",
        )
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def head(self) -> tuple[int, str]:
        return self._head(self._read())

    def append(self, records: Sequence[Record]) -> None:
        if not records:
            return
        rows = [
            self._args(
                seq=r.seq,
                time=iso(r.event.time),
                caller=r.event.caller,
                operation=r.event.operation,
                key=r.event.key,
                version=r.event.version,
                payload=r.event.payload_sha256,
                status=r.event.status,
                prev=r.prev_hash,
                hash=r.hash,
            )
            for r in records
        ]
        insert = self._sql(
            "INSERT INTO records (seq, time, caller, operation, key, version, payload_sha256, "
            "status, prev_hash, hash[, chain]) VALUES (%(seq)s, %(time)s, %(caller)s, "
            "%(operation)s, %(key)s, %(version)s, %(payload)s, %(status)s, %(prev)s, %(hash)s"
            "[, %(chain)s])"
        )
        with self._write() as conn:
            head = self._head(conn)
            if head != (records[0].seq - 1, records[0].prev_hash):
                raise ChainMoved(
                    f"the audit log's newest record is {head[0]}, not the one its writer "
                    f"chained record {records[0].seq} after: another writer, or a change made "
                    "to the log"
                )
            cur = conn.cursor()
            cur.executemany(insert, rows)
            cur.close()

    def add_checkpoint(
        self, checkpoint: Checkpoint, audit_key: tuple[bytes, bytes] | None = None
    ) -> None:
        c = checkpoint
        with self._write() as conn:
            row = self._one(conn, "SELECT MAX(seq) FROM checkpoints WHERE [chain]")
            newest = int(row[0] or 0)
            signed = self._one(
                conn, "SELECT hash FROM records WHERE [chain] AND seq = %(s)s", s=c.seq
            )
            if c.prev != newest or c.seq <= newest or signed is None or signed[0] != c.hash:
                raise ChainMoved(
                    f"the checkpoint at {c.seq} does not follow the log's newest ({newest}) or "
                    "sign its record as it is: another writer, or a change made to the log"
                )
            self._insert_checkpoint(conn, c, audit_key)

    def restore(
        self,
        archives: Sequence[Archived] = (),
        checkpoint: Checkpoint | None = None,
        audit_key: tuple[bytes, bytes] | None = None,
    ) -> None:
        """For ``signer store migrate`` alone (signer._internal.transfer): what a log being
        copied holds that :meth:`append` and :meth:`add_checkpoint` rightly refuse, inserted as
        it is, in one transaction: ``archives``' rows into a chain that holds nothing yet, with
        the checkpoint that anchors them (its record is archived, not live); a checkpoint from
        before checkpoints chained (``prev`` None); ``audit_key`` with the first checkpoint.
        Only the order is checked here (a checkpoint after the newest): no writer vouches for
        these rows, so the migration verifies the source before (verify_log) and the copy
        after, and nothing else may call this."""
        with self._write() as conn:
            if archives:
                held = self._one(conn, "SELECT 1 FROM records WHERE [chain] LIMIT 1") or self._one(
                    conn, "SELECT 1 FROM archives WHERE [chain] LIMIT 1"
                )
                if held:
                    raise ChainMoved("archives are restored into an empty chain only")
                for segment in archives:
                    self._insert_archive(conn, segment)
            if checkpoint is None:
                return
            c = checkpoint
            row = self._one(conn, "SELECT MAX(seq) FROM checkpoints WHERE [chain]")
            if c.seq <= int(row[0] or 0):
                raise ChainMoved(f"the checkpoint at {c.seq} is not after the chain's newest")
            self._insert_checkpoint(conn, c, audit_key)

    def _insert_checkpoint(
        self, conn: Any, c: Checkpoint, audit_key: tuple[bytes, bytes] | None
    ) -> None:
        if audit_key is not None:
            conn.execute(
                self._sql(
                    "INSERT INTO audit_key (id, key_id, public_key[, chain]) "
                    "VALUES (1, %(key_id)s, %(public_key)s[, %(chain)s])"
                ),
                self._args(key_id=audit_key[0], public_key=audit_key[1]),
            )
        conn.execute(
            self._sql(
                "INSERT INTO checkpoints (seq, hash, time, signature, prev, refs[, chain]) "
                "VALUES (%(seq)s, %(hash)s, %(time)s, %(signature)s, %(prev)s, %(refs)s"
                "[, %(chain)s])"
            ),
            self._args(
                seq=c.seq,
                hash=c.hash,
                time=c.time,
                signature=c.signature,
                prev=c.prev,
                refs=refs_text(c.refs) if c.refs else "",
            ),
        )

    def _insert_archive(self, conn: Any, s: Archived) -> None:
        conn.execute(
            self._sql(
                "INSERT INTO archives (last_seq, first_seq, last_hash, file, sha256[, chain]) "
                "VALUES (%(last)s, %(first)s, %(hash)s, %(file)s, %(sha256)s[, %(chain)s])"
            ),
            self._args(
                last=s.last_seq, first=s.first_seq, hash=s.last_hash, file=s.file, sha256=s.sha256
            ),
        )

    def last_checkpoint(self) -> int:
        row = self._one(self._read(), "SELECT MAX(seq) FROM checkpoints WHERE [chain]")
        return int(row[0] or 0) if row else 0

    def checkpoints(self) -> list[Checkpoint]:
        rows = self._all(
            self._read(),
            "SELECT seq, hash, time, signature, prev, [refs] FROM checkpoints "
            "WHERE [chain] ORDER BY seq",
        )
        return [
            Checkpoint(int(r[0]), r[1], r[2], bytes(r[3]), r[4], refs_of(r[5]), self.chain)
            for r in rows
        ]

    def record(self, seq: int) -> Record | None:
        return next(self.records(first=seq, upto=seq), None)

    def records(self, upto: int | None = None, first: int = 0) -> Iterator[Record]:
        # Read whole, here: a store's faults are raised (and translated) by this call, not by
        # a later step of an iteration (every caller lists them anyway).
        rows = self._all(
            self._read(),
            "SELECT seq, time, caller, operation, key, version, payload_sha256, status, "
            "prev_hash, hash FROM records WHERE [chain] AND seq >= %(first)s "
            "AND seq <= %(upto)s ORDER BY seq",
            first=first,
            upto=upto if upto is not None else 2**62,
        )
        return iter(
            [
                Record(int(r[0]), Event(datetime.fromisoformat(r[1]), *r[2:8]), r[8], r[9])
                for r in rows
            ]
        )

    def audit_key(self) -> tuple[bytes, bytes] | None:
        row = self._one(self._read(), "SELECT key_id, public_key FROM audit_key WHERE [chain]")
        return (bytes(row[0]), bytes(row[1])) if row else None

    def archives(self) -> list[Archived]:
        rows = self._all(
            self._read(),
            "SELECT first_seq, last_seq, last_hash, file, sha256 FROM archives WHERE [chain] "
            "ORDER BY last_seq",
        )
        return [Archived(*r) for r in rows]

    def archived(self, segment: Archived) -> None:
        s = segment
        with self._write() as conn:
            row = self._one(conn, "SELECT MIN(seq) FROM records WHERE [chain]")
            if row is None or row[0] is None or int(row[0]) != s.first_seq:
                raise FailedPrecondition(
                    f"the segment {s.first_seq}..{s.last_seq} does not start where the live "
                    "log does: another archive job moved it meanwhile"
                )
            self._insert_archive(conn, s)
            args = self._args(last=s.last_seq)
            conn.execute(self._sql("DELETE FROM records WHERE [chain] AND seq <= %(last)s"), args)
            conn.execute(
                self._sql("DELETE FROM checkpoints WHERE [chain] AND seq < %(last)s"), args
            )

    def others(self) -> list[Ref]:
        if not self.CHAINED:
            return []
        rows = self._all(
            self._read(),
            "SELECT DISTINCT ON (chain) chain, seq, hash FROM checkpoints "
            "WHERE chain <> %(chain)s ORDER BY chain, seq DESC",
        )
        return [(str(r[0]), int(r[1]), str(r[2])) for r in rows]

    def on_chain(self, chain: str) -> Any:
        view = copy.copy(self)
        view.chain = chain
        return view

    def chains(self) -> list[str]:
        if not self.CHAINED:
            return [""]
        rows = self._all(
            self._read(),
            "SELECT chain FROM records UNION SELECT chain FROM checkpoints "
            "UNION SELECT chain FROM archives UNION SELECT chain FROM audit_key ORDER BY 1",
        )
        return [str(r[0]) for r in rows]


_NAMED = re.compile(r"%\((\w+)\)s")


@functools.lru_cache(maxsize=128)
def _rendered(query: str, chained: bool, refs: str) -> str:
    query = query.replace("[refs]", refs)
    if chained:
        return query.replace("[chain]", "chain = %(chain)s").replace("[, ", ", ").replace("])", ")")
    query = re.sub(r"\[, [^\]]*\]", "", query.replace("[chain]", "TRUE"))
    return _NAMED.sub(r":\1", query)


class SQLiteAuditStore(Tables):
    """One SQLite file, WAL, ``synchronous=FULL``: a committed record survives a crash and a
    power cut. ``timeout``: how long a write waits for a lock before failing (closed). The
    chain's lock is the file's write lock (BEGIN IMMEDIATE)."""

    CHAINED = False

    def __init__(self, path: str | Path, read_only: bool = False, timeout: float = 2.0) -> None:
        self.path = str(path)
        if read_only:
            if not Path(self.path).exists():
                raise FileNotFoundError(self.path)
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
            if "refs" not in self._columns("checkpoints"):
                self._refs = "''"
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        private_database(self.path)
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=timeout
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = self._columns("checkpoints")
        if "prev" not in columns:  # a log from before checkpoints chained
            self._db.execute("ALTER TABLE checkpoints ADD COLUMN prev INTEGER")
        if "refs" not in columns:  # from before a checkpoint could name other chains
            self._db.execute("ALTER TABLE checkpoints ADD COLUMN refs TEXT NOT NULL DEFAULT ''")

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _read(self) -> sqlite3.Connection:
        return self._db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN")  # deferred: the first read fixes the snapshot
        try:
            yield
        finally:
            self._roll_back()

    def _roll_back(self) -> None:
        """After a failed write: SQLite may have rolled back already (a full disk at COMMIT),
        and a ROLLBACK that fails too must not hide the error that matters."""
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def close(self) -> None:
        self._db.close()


def is_database(location: str | Path) -> bool:
    """Whether an audit log location is a PostgreSQL database (a libpq URL), not a file."""
    from signer._internal.store import is_postgres

    return isinstance(location, str) and is_postgres(location)


def open_audit_store(
    location: str | Path, read_only: bool = False, chain: str = "", writer: bool = True
) -> AuditStore:
    """The audit log ``[audit] path`` names: a ``postgresql://`` URL, else an SQLite file (as
    :func:`signer._internal.store.open_store`; psycopg is imported only for the first). Read
    only: FileNotFoundError where there is no log. ``chain``: a database's chain (replicas);
    ``writer`` False: not the service's writer (an archive job: it leaves the writer's lock
    alone, and serialises with it on the chain's)."""
    if is_database(location):
        from signer._internal.audit._pgstore import PostgresAuditStore

        return PostgresAuditStore(str(location), read_only=read_only, chain=chain, writer=writer)
    if chain:
        raise FailedPrecondition("an audit log in a file has one chain: name none")
    return SQLiteAuditStore(location, read_only=read_only)
