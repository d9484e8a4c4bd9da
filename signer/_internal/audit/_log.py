"""The writer: one thread appends whatever has queued, in one transaction, and signs
checkpoints with the audit key in the token."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from signer._internal.audit._chain import (
    Checkpoint,
    Event,
    Record,
    Signing,
    chain,
    checkpoint_message,
    iso,
)
from signer._internal.audit._store import AuditStore, ChainMoved, CommitUnknown, left_behind
from signer._internal.audit._verify import pinned_der, unsigned_tail_fault
from signer._internal.audit._witness import MESSAGE, FileWitness, Witness, fields
from signer._internal.files import write_atomic
from signer._internal.lanes import hand_back
from signer._internal.metrics import OFF, Metrics
from signer.errors import SignerError, Unavailable

log = logging.getLogger("signer.audit")  # named for the component: signer._internal.logs

# make_key(recorded, pinned): the audit key, as (how to sign, its public key DER). Given the key
# the log records (id, public key DER): that one. Else, given the pinned public key (DER): the
# token's audit key with that public key (a first checkpoint cut short after the pin was
# written), or None if the token holds none. Given neither: a new one, generated in the token.
MakeKey = Callable[[tuple[bytes, bytes] | None, bytes | None], tuple[Signing, bytes] | None]
_BATCH = 1024


class _Wake:
    """What :meth:`AuditLog.wake` queues."""


WAKE = _Wake()
# While records cannot be written, the writer tries again this often.
RETRY_SECONDS = 1.0
# The status a record keeps when it could not be written before its call was answered.
NOT_ANSWERED = " (answered UNAVAILABLE: the audit log could not be written)"


class AuditLog:
    """:meth:`record` queues an event and returns its sequence number once committed, or fails
    UNAVAILABLE if it cannot be.

    Bounded signing. No more than ``max_unsigned_records`` records are ever under no signed
    checkpoint: the writer signs one before committing past the bound. When it cannot (the token
    host away, a witness that cannot be written), the records of calls that ran are still
    committed (a change is never left unrecorded), and new calls are refused (:meth:`check`:
    UNAVAILABLE, health NOT_SERVING) from three quarters of the bound until a checkpoint
    succeeds; the calls in flight then (``server.max_calls_in_flight``, at most a quarter of the
    bound) fit in the rest. Calls refused so are not recorded one by one: one ``AuditPaused``
    record counts them once a checkpoint is signed. ``verify`` and the writer at start hold a
    log to the bound: one whose checkpoints were removed cannot pass for a young one, unless
    what follows the last checkpoint left is short (only a witness shows that).

    The writer vouches for what it signs. At :meth:`start`, the part of the log no checkpoint
    covers is checked as ``verify`` would (it follows the newest checkpoint, which the pinned
    key signed, and fits the bound; the key is pinned, and in the log once it has a
    checkpoint; a file witness shows no newer checkpoint); a checkpoint key that is not the
    pinned one is caught when it is first used. Either stops the log for good
    (:attr:`failure`): every call refused until an operator has looked and restarts.

    Nothing that ran goes unrecorded. When records cannot be written (a full disk, an I/O
    error, a lock held too long by an archiving job), the calls waiting on them are answered
    UNAVAILABLE (a signature is never released without its record), but what they did has
    happened: their records are kept, in order, with that answer in their status, and written
    as soon as the store takes them, tried every ``RETRY_SECONDS``. Meanwhile :meth:`check`
    refuses every new call (health NOT_SERVING), so what is kept is bounded by the calls
    already running. Only a crash of the service before the store recovers loses them; the
    service's log then says how many.
    """

    # From this share of the bound, while checkpoints fail, new calls are refused.
    GATE = 0.75

    def __init__(
        self,
        store: AuditStore,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 10.0,
        max_unsigned_records: int | None = None,
        witnesses: Sequence[Witness] = (),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics = OFF,
    ) -> None:
        self.store = store
        self._metrics = metrics  # commits and checkpoints; the queue is read when scraped
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.max_unsigned_records = max_unsigned_records or 2 * checkpoint_every
        self._witnesses = list(witnesses)
        self._clock = clock  # the service's: the clock the records' times come from
        self._seq, self._hash = store.head()
        self._checkpointed = max(store.last_checkpoint(), 0)
        self._last_checkpoint = time.monotonic()
        # Records to write; None: stop; WAKE: try a failed checkpoint again now.
        self._queue: queue.Queue[tuple[Event, asyncio.Future[int]] | _Wake | None] = queue.Queue()
        # Taken to queue a record and to stop taking them: none is queued after the last drain.
        self._accepting = threading.Lock()
        self._closed = False
        self._signing: Signing | None = None
        # The key being made the log's: generated but not pinned yet (kept, so that a pinning
        # that could not be written is tried again with it, not with a key generated anew).
        self._made: tuple[Signing, bytes] | None = None
        # The audit key, pinned, that the log does not record yet: recorded with the first
        # checkpoint, in its transaction.
        self._unrecorded: tuple[bytes, bytes] | None = None
        self._make_key: MakeKey | None = None
        self._pin_to: Path | None = None
        self._writer: threading.Thread | None = None
        self._stopping = threading.Event()  # close() called: stop waiting on the store
        self._moved = False  # the log is not where this writer left it: write nothing more
        self._cut: Checkpoint | None = None  # a checkpoint whose COMMIT was cut off
        self.failure: str | None = None  # why the log refuses everything, for good
        self._failing: str | None = None  # why the last checkpoint could not be signed
        self._paused = 0  # calls refused by check() since the last checkpoint, to be recorded
        # Counted on the event loop, taken by the writer: ``+=`` on both sides would lose some.
        self._paused_lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._batch: list[tuple[Event, asyncio.Future[int]]] = []  # being committed
        # Events of calls already answered whose records could not be written yet, in order.
        self._kept: list[Event] = []
        self._write_failing: str | None = None  # why the last write failed, while it does
        self._left_behind = False  # whether the last failed write may be in the file all the same

    def start(self, make_key: MakeKey, pin_to: Path) -> None:
        """Starts writing. Checkpoints are signed with the audit key that ``make_key`` returns
        (:data:`MakeKey`), made when the first checkpoint is due, so records are written even
        while the token host is away. A new key's public half is pinned in ``pin_to`` before
        anything is signed with it, and recorded in the log with the first checkpoint; a key
        that differs from the pinned one is refused. The unsigned part of the log is checked
        first."""
        self._make_key, self._pin_to = make_key, pin_to
        unwritable = _can_write_beside(pin_to)
        if unwritable is not None:
            self._stop_for_good(
                f"the audit log's halt file cannot be written beside its pin {pin_to} "
                f"({unwritable}): the pin's directory must be the service's to write, or a "
                "stop for good on tampering would be forgotten by the next start"
            )
        if self.halted is not None and self.halted.exists():
            self._moved = True
            self._stop_for_good(
                f"the audit log was stopped for good ({_halt_reason(self.halted)}): nothing is "
                f"written or signed until an operator has looked (signer audit-log verify) and "
                f"removed {self.halted}"
            )
        pinned = pin_to.read_bytes() if pin_to.exists() else None
        with self.store.snapshot():  # an archive job meanwhile must not tear what is read
            self._seq, self._hash = self.store.head()
            self._checkpointed = max(self.store.last_checkpoint(), 0)
            bad = unsigned_tail_fault(
                self.store,
                pinned,
                self.max_unsigned_records,
                [w.path for w in self._witnesses if isinstance(w, FileWitness)],
            )
        if bad is not None:
            self._stop_for_good(
                f"the audit log does not verify ({bad}); no checkpoint will be signed over it: "
                "an operator must look (signer audit-log verify; see the README)"
            )
        self._writer = threading.Thread(target=self._write_forever, name="audit", daemon=True)
        self._writer.start()

    def on_change(self, listener: Callable[[], None]) -> None:
        """``listener()``, from the writer thread, after every checkpoint signed or failed and
        when the log stops for good: whenever :meth:`check`'s answer may have changed."""
        self._listeners.append(listener)

    def check(self) -> None:
        """Raises :class:`AuditPaused` (UNAVAILABLE, saying why) while new calls must not
        start: for good after a tamper signal; while checkpoints fail and the unsigned records
        near the bound. The caller counts such a refusal with :meth:`paused` instead of
        recording it."""
        if self.failure is not None:
            raise AuditPaused(self.failure)
        unwritable = self._write_failing
        if unwritable is not None:
            raise AuditPaused(
                f"the audit log cannot be written ({unwritable}): calls are refused until it "
                "can; the records of calls already made are kept and written then"
            )
        failing = self._failing
        if failing is not None and self._unsigned >= self.GATE * self.max_unsigned_records:
            raise AuditPaused(
                f"the audit log cannot sign a checkpoint ({failing}), and its unsigned records "
                f"near audit.max_unsigned_records ({self.max_unsigned_records}): calls are "
                "refused until one is signed"
            )

    @property
    def queued(self) -> int:
        """Records waiting for the writer (and wake-ups; a moment's value, for a gauge)."""
        return self._queue.qsize()

    def paused(self) -> None:
        """Counts a call :meth:`check` refused, for one record once a checkpoint is signed."""
        with self._paused_lock:
            self._paused += 1

    async def record(self, event: Event) -> int:
        """Queues ``event``; returns the record's sequence number once committed, or raises
        UNAVAILABLE if it cannot be. The callers of one commit are answered in one wake-up of
        their event loop."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        with self._accepting:
            if self._writer is None or self._closed:
                raise Unavailable(self.failure or "the audit log is not running: refusing the call")
            self._queue.put((event, fut))
        return await fut

    def wake(self) -> None:
        """Tries a failed checkpoint again now rather than at the next interval: the token is
        back (the soak: calls stayed refused for up to checkpoint_interval_seconds after it
        was, since nothing else made the writer look)."""
        if self._failing is not None:
            self._queue.put(WAKE)

    def close(self) -> None:
        """Writes what is queued, a last checkpoint, and stops."""
        self._stopping.set()
        if self._writer is not None and self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=30)
        self.store.close()
        for witness in self._witnesses:
            witness.close()

    # --- the writer thread --------------------------------------------------------------------

    def _write_forever(self) -> None:
        try:
            self._write_until_stopped()
        except BaseException as exc:  # a bug: nothing may wait on a writer that is gone
            log.exception("audit writer stopped")
            self._stop_for_good(f"the audit log's writer stopped ({type(exc).__name__})")
            error = Unavailable(self.failure or "the audit log has stopped")
            hand_back([(fut, False, error) for _, fut in self._batch])
        self._refuse_queued()

    def _write_until_stopped(self) -> None:
        while True:
            wait = self._last_checkpoint + self.checkpoint_interval - time.monotonic()
            if self._kept:
                # What is tried then is the kept records (a checkpoint waits for them), so every
                # RETRY_SECONDS however overdue the checkpoint: min() with its wait, negative
                # once the interval had passed, retried without pause (9,000 times in 3 s).
                wait = RETRY_SECONDS
            try:
                item = self._queue.get(
                    timeout=max(0.0, wait) if self._unsigned or self._kept else None
                )
            except queue.Empty:
                if self._kept:
                    self._write_kept()
                else:
                    self._checkpoint_quietly()
                continue
            batch = [item]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if all(b is WAKE for b in batch):
                if self._failing is not None:
                    self._checkpoint_quietly()  # what failed may work now
                continue
            stop = None in batch
            self._batch = [b for b in batch if isinstance(b, tuple)]
            self._commit(self._batch)
            self._batch = []
            if self._unsigned >= self.checkpoint_every or stop:
                self._checkpoint_quietly()
            if stop:
                self._record_paused()  # if the last checkpoint failed
                if self._kept:
                    log.critical(
                        "audit records lost: the log could not be written before the stop",
                        extra={"records": len(self._kept), "error": self._write_failing},
                    )
                return

    def _refuse_queued(self) -> None:
        """Takes no more records, and answers those queued."""
        with self._accepting:
            self._closed = True
        error = Unavailable(self.failure or "the audit log has stopped: refusing the call")
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                hand_back([(item[1], False, error)])

    @property
    def _unsigned(self) -> int:
        return self._seq - self._checkpointed

    def _fitting(self, batch: list[tuple[Event, asyncio.Future[int]]]) -> int:
        """How many of ``batch``'s first events can be committed without leaving more records
        under no signed checkpoint than the bound allows."""
        return max(0, min(len(batch), self.max_unsigned_records - self._unsigned))

    def _commit(self, batch: list[tuple[Event, asyncio.Future[int]]]) -> None:
        if self._kept and not self._write_kept():
            self._keep(
                batch, Unavailable(f"the audit log cannot be written ({self._write_failing})")
            )
            return
        while batch:
            n = self._fitting(batch)
            if n == 0:  # a checkpoint first; after one, the first events fit
                self._checkpoint_quietly()
                # Without one, these calls' records go in all the same: they have run, and what
                # they did must be on record; check() keeps new calls out meanwhile.
                n = self._fitting(batch) or len(batch)
            error = self._append(batch[:n])
            if error is not None:
                self._keep(batch, error, rewrite=self._left_behind)
                return
            batch = batch[n:]

    def _keep(
        self,
        batch: list[tuple[Event, asyncio.Future[int]]],
        error: Unavailable,
        rewrite: bool = False,
    ) -> None:
        """Answers ``batch``'s calls with ``error`` and keeps their events to write later.

        ``rewrite``: their failed commit may have left their records in the file all the same
        (:func:`left_behind`: an fsync that failed), for a crash to bring back saying OK to
        calls answered UNAVAILABLE. So before the calls are answered they are written once
        more, saying how, over what the failed commit left: what a crash brings back is then
        true (and if this write goes through, they are on record at once). Only a write that
        fails before it overwrites anything leaves the first one's records to a crash."""
        self._kept += [replace(e, status=e.status + NOT_ANSWERED) for e, _ in batch]
        if rewrite:
            self._write_kept()
        hand_back([(fut, False, error) for _, fut in batch])

    def _write_kept(self) -> bool:
        """Writes the kept records (their calls were answered long ago); whether it could."""
        while self._kept:
            n = min(len(self._kept), self.max_unsigned_records - self._unsigned, _BATCH)
            if n <= 0:
                self._checkpoint_quietly()
                n = min(len(self._kept), _BATCH)  # they ran: on record all the same
            if self._write(self._kept[:n]) is None:
                return False
            del self._kept[:n]
        log.warning("audit log writable again; kept records written")
        self._record_paused()
        self._changed()
        return True

    def _write(self, events: list[Event]) -> list[Record] | None:
        """Chains and commits ``events``; None (and the log marked unwritable) if the store
        refuses them."""
        records, seq, prev = [], self._seq, self._hash
        for event in events:
            seq += 1
            records.append(chain(seq, event, prev))
            prev = records[-1].hash
        if self._moved:
            return None  # nothing is chained after a head this writer did not leave
        began = time.perf_counter()
        try:
            try:
                self.store.append(records)
            except CommitUnknown as exc:
                self._failed(exc)
                if not self._landed(records):
                    raise
        except ChainMoved as exc:
            self._failed(exc)
            self._halt(exc)
            return None
        except Exception as exc:  # the store's own error type: sqlite3.Error, psycopg.Error...
            self._failed(exc)
            return None
        self._metrics.audit_committed(len(records), time.perf_counter() - began)
        self._seq, self._hash = seq, prev
        if self._write_failing is not None:
            self._write_failing = None
            self._changed()
        return records

    def _failed(self, exc: Exception) -> None:
        why = exc.message if isinstance(exc, SignerError) else str(exc)
        log.error("audit log write failed", extra={"error": why})
        newly = self._write_failing is None
        self._write_failing = why
        self._left_behind = left_behind(exc)
        if newly:
            self._changed()

    def _landed(self, records: list[Record]) -> bool:
        """After a COMMIT cut off: whether ``records`` are in the log after all, read back
        before their calls are answered, every RETRY_SECONDS while the store cannot say (the
        writer holds everything meanwhile; health says NOT_SERVING). In: their calls are
        answered as if the COMMIT had said so, and the log is true. Not in: answered UNAVAILABLE,
        their records kept to write as such. Still unknown at the stop: answered UNAVAILABLE,
        and the log may say otherwise (logged; REVIEW.md 3). ChainMoved if another record is
        where they would be."""
        last = records[-1]
        while True:
            try:
                found = self.store.record(last.seq)
                if found is not None and found.hash == last.hash:
                    log.warning("audit commit cut off had landed", extra={"records": len(records)})
                    return True
                if found is None and self.store.head() == (self._seq, self._hash):
                    return False
                raise ChainMoved(
                    f"record {last.seq} is not the one whose COMMIT was cut off: another "
                    "writer, or a change made to the log"
                )
            except ChainMoved:
                raise
            except Exception as exc:
                log.warning("audit commit outcome not known yet", extra={"error": str(exc)})
            if self._stopping.wait(RETRY_SECONDS):
                log.critical(
                    "audit records may say OK for calls answered UNAVAILABLE: a COMMIT was cut "
                    "off and the store could not say before the stop whether it landed",
                    extra={"first": records[0].seq, "last": last.seq},
                )
                return False

    def _append(self, batch: list[tuple[Event, asyncio.Future[int]]]) -> Unavailable | None:
        """Commits ``batch`` and answers its calls; or the error to answer them with."""
        records = self._write([event for event, _ in batch])
        if records is None:
            return Unavailable(
                f"the audit log cannot be written ({self.failure or self._write_failing}); "
                "refusing the call until it can"
            )
        hand_back([(fut, True, r.seq) for (_, fut), r in zip(batch, records, strict=True)])
        return None

    def _checkpoint_quietly(self) -> None:
        try:
            self.checkpoint()
        except AuditKeyMismatch as exc:
            self._metrics.checkpoint(False)
            self._stop_for_good(exc.message)
        except ChainMoved as exc:
            self._metrics.checkpoint(False)
            self._halt(exc)
        except Exception as exc:  # a token host away, a store or a witness that refuses
            self._metrics.checkpoint(False)
            self._failing = exc.message if isinstance(exc, SignerError) else str(exc)
            log.error("audit checkpoint failed; retried", extra={"error": self._failing})
            self._changed()
        else:
            self._failing = None
            self._record_paused()
            self._changed()
        self._last_checkpoint = time.monotonic()

    def _record_paused(self) -> None:
        """One record for the calls refused while no checkpoint could be signed: after the
        next checkpoint, or at stop if the bound leaves room (else the count goes to the
        service's log only)."""
        with self._paused_lock:
            count, self._paused = self._paused, 0
        if not count:
            return
        if self._unsigned >= self.max_unsigned_records:
            log.error(
                "calls refused while the audit log could not sign, not recorded",
                extra={"calls": count},
            )
            return
        event = Event(self._clock(), "signer", "AuditPaused", "", count, "", "UNAVAILABLE")
        # Through the one write path (a COMMIT cut off read back, a moved head stopping the
        # log); not written, it is kept as an answered call's record is, and retried with them.
        if self._write([event]) is None and not self._moved:
            self._kept.append(event)

    def _halt(self, exc: ChainMoved) -> None:
        """Stops for good on a tamper signal the start-up checks could not see again: a record
        or checkpoint in the log that this writer did not write, chained as it would have
        been, passes them, and a restart would sign it. So the stop is also written down, in
        the :attr:`halted` file beside the pin (outside the database), and the log does not
        start while it is there (the review's finding 3)."""
        self._moved = True
        why = (
            f"{exc.message}; nothing more is written or signed: an operator must look "
            "(signer audit-log verify; see the README)"
        )
        if self.halted is not None and not self.halted.exists():
            note = {"time": iso(datetime.now(UTC)), "why": exc.message, "head": self._seq}
            try:
                write_atomic(self.halted, json.dumps(note).encode() + b"\n")
            except OSError as error:
                log.critical("audit stop not written down", extra={"error": str(error)})
        self._stop_for_good(why)

    @property
    def halted(self) -> Path | None:
        """Where a stop for good on a moved chain is written down: beside the pin."""
        return None if self._pin_to is None else Path(f"{self._pin_to}.halted")

    def _stop_for_good(self, why: str) -> None:
        if self.failure is None:
            log.critical("audit log stopped: every call is refused", extra={"error": why})
            self.failure = why
            self._changed()

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("audit log listener failed")

    def checkpoint(self) -> None:
        """Signs the newest record's (sequence, hash), with the previous checkpoint's sequence,
        in the token, if there are new records; writes it to every witness, then the store."""
        if self.failure is not None:
            return
        self._settle_cut_checkpoint()
        if self._unsigned <= 0:
            return
        signing = self._ensure_key()
        seq, hash_, at, prev = self._seq, self._hash, iso(datetime.now(UTC)), self._checkpointed
        # The other chains' newest checkpoints (replicas: each its own chain), signed with it.
        refs = tuple(self.store.others())
        message = checkpoint_message(seq, hash_, at, prev, refs, self.store.chain)
        c = Checkpoint(seq, hash_, at, signing(message), prev, refs, self.store.chain)
        for witness in self._witnesses:
            witness.write(c)
        # The first checkpoint records the key with it, in one transaction: a log that names
        # its key always has a checkpoint (a crash before leaves the pin alone: adopted).
        try:
            self.store.add_checkpoint(c, self._unrecorded)
        except CommitUnknown:
            self._cut = c  # in or not: read back before the next one
            raise
        self._signed(c)

    def _signed(self, c: Checkpoint) -> None:
        self._metrics.checkpoint(True)
        self._unrecorded = None
        self._checkpointed = c.seq
        log.info(MESSAGE, extra=fields(c))

    def _settle_cut_checkpoint(self) -> None:
        """A checkpoint whose COMMIT was cut off (the review's finding 1): if it is the log's
        newest, it is this writer's and stands; if the newest is still the one before, it never
        landed; anything else is ChainMoved. (Signing the next one after the wrong one was
        refused as another writer's, and stopped the log for good over a network blip.)"""
        c = self._cut
        if c is None:
            return
        newest = self.store.last_checkpoint()
        if newest == c.seq:
            stored = [x for x in self.store.checkpoints() if x.seq == c.seq]
            if not stored or (stored[0].hash, stored[0].signature) != (c.hash, c.signature):
                raise ChainMoved(
                    f"the checkpoint at {c.seq} is not the one whose COMMIT was cut off: "
                    "another writer, or a change made to the log"
                )
            log.warning("audit checkpoint cut off had landed", extra={"seq": c.seq})
            self._signed(c)
        elif newest != self._checkpointed:
            raise ChainMoved(
                f"the log's newest checkpoint is {newest}, neither the one this writer signed "
                f"last ({self._checkpointed}) nor the one whose COMMIT was cut off ({c.seq})"
            )
        self._cut = None

    def _ensure_key(self) -> Signing:
        """The audit key, the pinned one. A new key is pinned (atomically, synced) before
        anything is signed with it; the log records it with its first checkpoint. So a crash
        leaves: before the pin, a token object nothing names (``signer keys reconcile``); after
        it, a pin the log does not record yet, which the next start adopts (the token's audit
        key with that public key) and records with its first checkpoint."""
        if self._signing is not None:
            return self._signing
        assert self._make_key is not None
        assert self._pin_to is not None
        recorded = self.store.audit_key()
        pinned = self._pinned()
        if recorded is not None and pinned is None:
            # A key only this log names, its pinned copy gone, is not to be pinned now: it may
            # be one that whoever removed that copy put there.
            raise self._mismatch("the log names an audit key, and none is pinned")
        if recorded is None and pinned is None:
            made = self._made or self._make_key(None, None)
            if made is None:
                raise Unavailable("the token gave no audit key")
            self._made = made
            write_atomic(self._pin_to, _pem(made[1]))
            log.info(
                "audit key pinned", extra={"key_id": made[0].key_id.hex(), "pin": str(self._pin_to)}
            )
            pinned = made[1]
        else:
            made = self._make_key(recorded, pinned)
            if made is None:
                raise self._mismatch(
                    "the pinned audit key is not in the token (a first checkpoint cut short "
                    "would have left it there)"
                )
        signing, public_der = made
        if public_der != pinned:
            raise self._mismatch("the token's audit key is another")
        if recorded is None:
            self._unrecorded = (signing.key_id, public_der)
        self._made = None
        self._signing = signing
        return signing

    def _pinned(self) -> bytes | None:
        """The pinned public key (DER), None if none is pinned; a pin file that holds no public
        key (emptied, damaged) is a refusal, not a key to replace."""
        assert self._pin_to is not None
        try:
            pem = self._pin_to.read_bytes()
        except FileNotFoundError:
            return None
        der = pinned_der(pem)
        if der is None:
            raise self._mismatch(f"{self._pin_to} holds no public key (emptied or damaged)")
        return der

    def _mismatch(self, why: str) -> AuditKeyMismatch:
        return AuditKeyMismatch(
            f"the audit key is not the one pinned in {self._pin_to} ({why}): the log or its key "
            "was replaced; signing stops until an operator has looked (see the README)"
        )


def _halt_reason(path: Path) -> str:
    """What the halt file says, in one bounded line (it goes into refused calls' statuses)."""
    try:
        note = json.loads(path.read_bytes()[:4096])
        why = " ".join(str(note["why"]).split())[:300]
        return f"{why}, at {str(note['time'])[:40]}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} says so"


def _can_write_beside(path: Path) -> str | None:
    """Why a file cannot be created beside ``path`` (None: it can): a halt must be able to be
    written down, or a restart would sign what it refused."""
    probe = Path(f"{path}.halted.probe")
    try:
        probe.unlink(missing_ok=True)  # one a crash left
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _pem(public_der: bytes) -> bytes:
    return serialization.load_der_public_key(public_der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class AuditKeyMismatch(Unavailable):
    """The key that would sign checkpoints is not the pinned one."""


class AuditPaused(Unavailable):
    """A new call refused because the audit log could not record it (:meth:`AuditLog.check`)."""
