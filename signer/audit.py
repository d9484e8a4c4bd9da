"""The audit log: every RPC outcome, hash-chained, checkpoints signed in the token.

Each record holds the time, the caller, the operation, the key and version, the SHA-256 of the
payload (never the payload) and the status. Its hash covers its fields and the previous record's
hash, so changing, removing, inserting or reordering a record breaks the chain from there on.
Every ``checkpoint_every`` records, every ``checkpoint_interval_seconds`` with new records, and
at shutdown, the service signs (sequence, hash, time) with the *audit key*, an EC key pair it
generated in the token on first start; its public key is pinned in a file beside the log. A log
rewritten from some record on, hashes and all, then disagrees with a signature nobody outside
the token can make.

Writing is fail-closed: a call's record is committed before its response is sent, and if it
cannot be, the call fails UNAVAILABLE (a signature already made is thrown away). Records are
written by one thread that commits whatever has queued up in one transaction (group commit), so
the cost of durability (SQLite WAL, ``synchronous=FULL``) is shared by concurrent calls.

What a hash chain cannot show by itself: records cut from the end together with the checkpoints
that covered them. Each checkpoint is also written to the service's log (sequence and hash), an
independent place to compare with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from signer.errors import SignerError, Unavailable
from signer.keys import (
    ALGORITHMS,
    Padding,
    SigFormat,
    SignMechanism,
    format_signature,
    to_be_signed,
    verify,
)

log = logging.getLogger(__name__)

AUDIT_ALGORITHM = ALGORITHMS["ec-p256"]
GENESIS = "0" * 64
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
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_key (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    key_id BLOB NOT NULL,
    public_key BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class Event:
    """What happened, as the server saw it."""

    time: datetime
    caller: str
    operation: str
    key: str
    version: int
    payload_sha256: str
    status: str


@dataclass(frozen=True)
class Record:
    seq: int
    event: Event
    prev_hash: str
    hash: str


def record_hash(seq: int, e: Event, prev_hash: str) -> str:
    fields = [
        seq, _iso(e.time), e.caller, e.operation, e.key, e.version, e.payload_sha256, e.status
    ]  # fmt: skip
    body = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(prev_hash.encode() + b"\n" + body).hexdigest()


def checkpoint_message(seq: int, hash_: str, at: str) -> bytes:
    return f"signer-audit-checkpoint:{seq}:{hash_}:{at}".encode()


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def _connect(path: str, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=2.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
    return db


class Signing:
    """How the audit log signs: the token's ``sign`` and the audit key's id."""

    def __init__(self, sign: Callable[[bytes, SignMechanism, bytes], bytes], key_id: bytes) -> None:
        self._sign = sign
        self.key_id = key_id

    def __call__(self, message: bytes) -> bytes:
        mech, data = to_be_signed(AUDIT_ALGORITHM, message, None, Padding.PSS)
        raw = self._sign(self.key_id, mech, data)
        return format_signature(AUDIT_ALGORITHM, raw, SigFormat.DER)


class AuditLog:
    """The writer. :meth:`submit` queues an event; its future resolves once committed."""

    def __init__(
        self,
        path: str | Path,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 10.0,
    ) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self._db = _connect(self.path)
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        self._seq: int = row[0] if row else 0
        self._hash: str = row[1] if row else GENESIS
        row = self._db.execute("SELECT MAX(seq) FROM checkpoints").fetchone()
        self._checkpointed = row[0] or 0
        self._last_checkpoint = time.monotonic()
        self._queue: queue.Queue[tuple[Event, Future[int]] | None] = queue.Queue()
        self._signing: Signing | None = None
        self._make_key: Callable[[tuple[bytes, bytes] | None], tuple[Signing, bytes]] | None = None
        self._pin_to: Path | None = None
        self._writer: threading.Thread | None = None

    # --- the audit key ------------------------------------------------------------------------

    def audit_key(self) -> tuple[bytes, bytes] | None:
        """(key id in the token, public key DER), if the log has one."""
        row = self._db.execute("SELECT key_id, public_key FROM audit_key").fetchone()
        return (bytes(row[0]), bytes(row[1])) if row else None

    def start(
        self,
        make_key: Callable[[tuple[bytes, bytes] | None], tuple[Signing, bytes]],
        pin_to: Path,
    ) -> None:
        """Starts writing. Checkpoints are signed with the audit key that ``make_key`` returns
        (given the recorded one, if any; it generates one in the token otherwise), made when
        the first checkpoint is due, so records are written even while the token host is away.
        The key's public half is recorded and pinned in ``pin_to``; a key that differs from the
        pinned one is refused."""
        self._make_key = make_key
        self._pin_to = pin_to
        self._writer = threading.Thread(target=self._write_forever, name="audit", daemon=True)
        self._writer.start()

    def _ensure_key(self) -> Signing:
        if self._signing is not None:
            return self._signing
        assert self._make_key is not None
        assert self._pin_to is not None
        recorded = self.audit_key()
        signing, public_der = self._make_key(recorded)
        pem = serialization.load_der_public_key(public_der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if self._pin_to.exists() and self._pin_to.read_bytes() != pem:
            raise SignerError(f"the audit key does not match the one pinned in {self._pin_to}")
        if recorded is None:
            self._db.execute(
                "INSERT INTO audit_key (id, key_id, public_key) VALUES (1, ?, ?)",
                (signing.key_id, public_der),
            )
        if not self._pin_to.exists():
            self._pin_to.write_bytes(pem)
        self._signing = signing
        return signing

    # --- writing ------------------------------------------------------------------------------

    def submit(self, event: Event) -> Future[int]:
        fut: Future[int] = Future()
        if self._writer is None or not self._writer.is_alive():
            fut.set_exception(Unavailable("the audit log is not running: refusing the call"))
        else:
            self._queue.put((event, fut))
        return fut

    def _write_forever(self) -> None:
        while True:
            timeout = max(0.0, self._last_checkpoint + self.checkpoint_interval - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout if self._seq > self._checkpointed else None)
            except queue.Empty:
                self._checkpoint_quietly()
                continue
            batch = [item]
            while len(batch) < 1024:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            self._commit([b for b in batch if b is not None])
            if self._seq - self._checkpointed >= self.checkpoint_every:
                self._checkpoint_quietly()
            if stop:
                self._checkpoint_quietly()
                return

    def _commit(self, batch: list[tuple[Event, Future[int]]]) -> None:
        if not batch:
            return
        seq, prev = self._seq, self._hash
        rows = []
        for event, _ in batch:
            seq += 1
            h = record_hash(seq, event, prev)
            rows.append((
                seq, _iso(event.time), event.caller, event.operation, event.key, event.version,
                event.payload_sha256, event.status, prev, h,
            ))  # fmt: skip
            prev = h
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            log.error("audit log write failed", extra={"error": str(exc), "records": len(rows)})
            error = Unavailable(
                f"the audit log cannot be written ({exc}); refusing the call until it can"
            )
            for _, fut in batch:
                fut.set_exception(error)
            return
        self._seq, self._hash = seq, prev
        for (_, fut), row in zip(batch, rows, strict=True):
            fut.set_result(row[0])

    def _checkpoint_quietly(self) -> None:
        try:
            self.checkpoint()
        except (SignerError, sqlite3.Error) as exc:
            message = exc.message if isinstance(exc, SignerError) else str(exc)
            log.error("audit checkpoint failed", extra={"error": message})
        self._last_checkpoint = time.monotonic()

    def checkpoint(self) -> None:
        """Signs the newest record's (sequence, hash) in the token, if there are new records."""
        if self._seq <= self._checkpointed:
            return
        signing = self._ensure_key()
        seq, hash_, at = self._seq, self._hash, _iso(datetime.now(UTC))
        signature = signing(checkpoint_message(seq, hash_, at))
        self._db.execute("INSERT INTO checkpoints VALUES (?,?,?,?)", (seq, hash_, at, signature))
        self._checkpointed = seq
        log.info("audit checkpoint", extra={"seq": seq, "hash": hash_})

    def close(self) -> None:
        """Writes what is queued, a last checkpoint, and stops."""
        if self._writer is not None and self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=30)
        self._db.close()


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    records: int
    checkpoints: int
    last_checkpoint: int
    first_bad: tuple[int, str] | None  # (seq, what is wrong)

    @property
    def whole(self) -> bool:
        return self.first_bad is None

    @property
    def unsigned_tail(self) -> int:
        return max(0, self.records_end - self.last_checkpoint) if self.whole else 0

    records_end: int = 0


def _records(db: sqlite3.Connection) -> Iterator[Record]:
    for row in db.execute(
        "SELECT seq, time, caller, operation, key, version, payload_sha256, status, prev_hash, "
        "hash FROM records ORDER BY rowid"
    ):
        event = Event(datetime.fromisoformat(row[1]), *row[2:8])
        yield Record(row[0], event, row[8], row[9])


def verify_log(path: str | Path, public_key_pem: bytes) -> Verdict:
    """Checks the chain record by record (in storage order) and every checkpoint's signature
    with the pinned audit key; names the first bad record."""
    if not Path(path).exists():
        raise SignerError(f"no audit log at {path}")
    public_der = serialization.load_pem_public_key(public_key_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with contextlib.closing(_connect(str(path), read_only=True)) as db:
        row = db.execute("SELECT public_key FROM audit_key").fetchone()
        checkpoints = db.execute("SELECT seq, hash, time, signature FROM checkpoints").fetchall()
        count = 0
        expected_seq, prev = 1, GENESIS
        hashes: dict[int, str] = {}
        bad: tuple[int, str] | None = None
        if row is not None and bytes(row[0]) != public_der:
            bad = (0, "the audit key recorded in the log is not the pinned one")
        for rec in _records(db) if bad is None else ():
            count += 1
            if rec.seq != expected_seq:
                what = "missing (deleted)" if rec.seq > expected_seq else "out of order"
                bad = (expected_seq if rec.seq > expected_seq else rec.seq, f"record {what}")
                break
            if rec.prev_hash != prev:
                bad = (rec.seq, "does not follow the record before it (inserted or reordered)")
                break
            if record_hash(rec.seq, rec.event, rec.prev_hash) != rec.hash:
                bad = (rec.seq, "its contents do not match its hash (modified)")
                break
            hashes[rec.seq] = rec.hash
            prev = rec.hash
            expected_seq += 1
        last = expected_seq - 1
        signed = 0
        for seq, hash_, at, signature in sorted(checkpoints) if bad is None else ():
            message = checkpoint_message(seq, hash_, at)
            if not verify(
                public_der, AUDIT_ALGORITHM, bytes(signature), message, None, Padding.PSS,
                SigFormat.DER,
            ):  # fmt: skip
                bad = (seq, "its checkpoint's signature does not verify")
                break
            if seq > last:
                bad = (last + 1, f"missing: the log ends at {last}, a checkpoint signed {seq}")
                break
            if hashes.get(seq) != hash_:
                bad = (
                    signed + 1,
                    f"records {signed + 1} to {seq} differ from what the checkpoint at {seq} "
                    "signed (rewritten, hashes and all)",
                )
                break
            signed = max(signed, seq)
        return Verdict(count, len(checkpoints), signed, bad, records_end=last)
