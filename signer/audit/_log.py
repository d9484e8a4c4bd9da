"""The writer: one thread appends whatever has queued, in one transaction, and signs
checkpoints with the audit key in the token."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from signer.audit._chain import Checkpoint, Event, Signing, chain, checkpoint_message, iso
from signer.audit._store import AuditStore
from signer.errors import SignerError, Unavailable
from signer.lanes import hand_back

log = logging.getLogger(__name__)

MakeKey = Callable[[tuple[bytes, bytes] | None], tuple[Signing, bytes]]
_BATCH = 1024


class AuditLog:
    """:meth:`record` queues an event and returns its sequence number once committed, or fails
    UNAVAILABLE if it cannot be."""

    def __init__(
        self, store: AuditStore, checkpoint_every: int = 1000, checkpoint_interval: float = 10.0
    ) -> None:
        self.store = store
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self._seq, self._hash = store.head()
        self._checkpointed = max(store.last_checkpoint(), 0)
        self._last_checkpoint = time.monotonic()
        self._queue: queue.Queue[tuple[Event, asyncio.Future[int]] | None] = queue.Queue()
        self._signing: Signing | None = None
        self._make_key: MakeKey | None = None
        self._pin_to: Path | None = None
        self._writer: threading.Thread | None = None

    def start(self, make_key: MakeKey, pin_to: Path) -> None:
        """Starts writing. Checkpoints are signed with the audit key that ``make_key`` returns
        (given the recorded one, if any; it generates one in the token otherwise), made when
        the first checkpoint is due, so records are written even while the token host is away.
        The key's public half is recorded and pinned in ``pin_to``; a key that differs from the
        pinned one is refused."""
        self._make_key, self._pin_to = make_key, pin_to
        self._writer = threading.Thread(target=self._write_forever, name="audit", daemon=True)
        self._writer.start()

    async def record(self, event: Event) -> int:
        """Queues ``event``; returns the record's sequence number once committed, or raises
        UNAVAILABLE if it cannot be. The callers of one commit are answered in one wake-up of
        their event loop."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self._writer is None or not self._writer.is_alive():
            raise Unavailable("the audit log is not running: refusing the call")
        self._queue.put((event, fut))
        return await fut

    def close(self) -> None:
        """Writes what is queued, a last checkpoint, and stops."""
        if self._writer is not None and self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=30)
        self.store.close()

    # --- the writer thread --------------------------------------------------------------------

    def _write_forever(self) -> None:
        while True:
            wait = self._last_checkpoint + self.checkpoint_interval - time.monotonic()
            try:
                item = self._queue.get(timeout=max(0.0, wait) if self._unsigned else None)
            except queue.Empty:
                self._checkpoint_quietly()
                continue
            batch = [item]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            self._commit([b for b in batch if b is not None])
            if self._unsigned >= self.checkpoint_every or stop:
                self._checkpoint_quietly()
            if stop:
                return

    @property
    def _unsigned(self) -> int:
        return self._seq - self._checkpointed

    def _commit(self, batch: list[tuple[Event, asyncio.Future[int]]]) -> None:
        if not batch:
            return
        records, seq, prev = [], self._seq, self._hash
        for event, _ in batch:
            seq += 1
            records.append(chain(seq, event, prev))
            prev = records[-1].hash
        try:
            self.store.append(records)
        except Exception as exc:  # the store's own error type: sqlite3.Error, psycopg.Error...
            log.error("audit log write failed", extra={"error": str(exc), "records": len(batch)})
            error = Unavailable(
                f"the audit log cannot be written ({exc}); refusing the call until it can"
            )
            hand_back([(fut, False, error) for _, fut in batch])
            return
        self._seq, self._hash = seq, prev
        hand_back([(fut, True, r.seq) for (_, fut), r in zip(batch, records, strict=True)])

    def _checkpoint_quietly(self) -> None:
        try:
            self.checkpoint()
        except Exception as exc:  # a token host away, a store that refuses: retried later
            message = exc.message if isinstance(exc, SignerError) else str(exc)
            log.error("audit checkpoint failed", extra={"error": message})
        self._last_checkpoint = time.monotonic()

    def checkpoint(self) -> None:
        """Signs the newest record's (sequence, hash) in the token, if there are new records."""
        if self._unsigned <= 0:
            return
        signing = self._ensure_key()
        seq, hash_, at = self._seq, self._hash, iso(datetime.now(UTC))
        signature = signing(checkpoint_message(seq, hash_, at))
        self.store.add_checkpoint(Checkpoint(seq, hash_, at, signature))
        self._checkpointed = seq
        log.info("audit checkpoint", extra={"seq": seq, "hash": hash_})

    def _ensure_key(self) -> Signing:
        if self._signing is not None:
            return self._signing
        assert self._make_key is not None
        assert self._pin_to is not None
        recorded = self.store.audit_key()
        signing, public_der = self._make_key(recorded)
        pem = serialization.load_der_public_key(public_der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if self._pin_to.exists() and self._pin_to.read_bytes() != pem:
            raise SignerError(f"the audit key does not match the one pinned in {self._pin_to}")
        if recorded is None:
            self.store.set_audit_key(signing.key_id, public_der)
        if not self._pin_to.exists():
            self._pin_to.write_bytes(pem)
        self._signing = signing
        return signing
