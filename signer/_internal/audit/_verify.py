"""Proving a log whole, or naming its first bad record."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from signer._internal.audit._archive import read_archive
from signer._internal.audit._chain import GENESIS, Checkpoint, Record, Ref, record_hash
from signer._internal.audit._store import Archived, AuditStore, open_audit_store
from signer._internal.audit._witness import WitnessError, read_witness
from signer._internal.config import AuditConfig, redacted
from signer.errors import SignerError


@dataclass(frozen=True)
class Verdict:
    records: int  # live records checked
    checkpoints: int
    last_checkpoint: int  # the newest signed sequence number
    records_end: int  # the newest sequence number
    archived: int  # records in archive segments (checked only with their files)
    first_bad: tuple[int, str] | None  # (seq, what is wrong)
    witnessed: int = 0  # checkpoints of the witnesses checked against the records
    # Other chains of the database (replicas) whose records this chain's checkpoints named,
    # and were found as signed.
    cross_checked: tuple[str, ...] = ()
    # References to other chains' records that are in those chains' archives, not checked:
    # their files were not read (no ``archive_dir``).
    cross_unchecked: int = 0

    @property
    def whole(self) -> bool:
        return self.first_bad is None

    @property
    def unsigned_tail(self) -> int:
        return max(0, self.records_end - self.last_checkpoint)


class _Bad(Exception):
    def __init__(self, seq: int, what: str) -> None:
        self.seq, self.what = seq, what


def _walk(records: Iterable[Record], seq: int, prev: str, hashes: dict[int, str]) -> int:
    """Checks a run of records chained from (seq, prev); returns the last sequence number."""
    for rec in records:
        seq += 1
        if rec.seq != seq:
            if rec.seq > seq:
                raise _Bad(seq, "record missing (deleted)")
            raise _Bad(rec.seq, "record out of order")
        if rec.prev_hash != prev:
            raise _Bad(rec.seq, "does not follow the record before it (inserted or reordered)")
        if record_hash(rec.seq, rec.event, rec.prev_hash) != rec.hash:
            raise _Bad(rec.seq, "its contents do not match its hash (modified)")
        hashes[rec.seq] = prev = rec.hash
    return seq


class _Bound:
    """The pinned key, and which checkpoints of a named chain it may have signed without the
    chain's name (before checkpoints named their chain: a log migrated into the chain, or a
    replica's of before): only those before the chain's first one signed with its name."""

    def __init__(self, public_der: bytes) -> None:
        self.key = public_der
        self.first: int | None = None  # the first checkpoint signed with the chain's name

    def check(
        self, c: Checkpoint, what: str = "its checkpoint's signature does not verify"
    ) -> None:
        if c.verifies(self.key):
            if c.chain and (self.first is None or c.seq < self.first):
                self.first = c.seq
            return
        if c.verifies_unbound(self.key):
            if self.first is None or c.seq < self.first:
                return
            raise _Bad(
                c.seq,
                f"its checkpoint does not name chain {c.chain!r}, and one before it "
                f"({self.first}) does (a checkpoint of another log's, relabelled?)",
            )
        if c.chain:
            what += f" as one of chain {c.chain!r}"
        raise _Bad(c.seq, what)


def _signed(
    checkpoints: list[Checkpoint],
    bound: _Bound,
    hashes: dict[int, str],
    last: int,
    since: int = 0,
    anchor: int | None = None,
) -> int:
    """Checks every checkpoint against its signature, the records, and the checkpoint before it
    (``anchor``: the first one's predecessor is in an archive, not here); returns the newest."""
    signed, before, chained = since, since, False
    for c in sorted(checkpoints, key=lambda c: c.seq):
        bound.check(c)
        if c.seq > last:
            raise _Bad(last + 1, f"missing: the log ends at {last}, a checkpoint signed {c.seq}")
        if hashes.get(c.seq) != c.hash:
            raise _Bad(
                signed + 1,
                f"records {signed + 1} to {c.seq} differ from what the checkpoint at {c.seq} "
                "signed (rewritten, hashes and all)",
            )
        if c.prev is None:
            if chained:
                raise _Bad(c.seq, "its checkpoint is unchained, after chained ones")
        elif c.seq != anchor and c.prev != before:
            raise _Bad(
                before + 1,
                f"the checkpoint at {c.seq} follows one at {c.prev}, which the log does not "
                f"have (checkpoints removed)",
            )
        chained = chained or c.prev is not None
        signed, before = max(signed, c.seq), c.seq
    return signed


def verify_log(
    location: str | Path,
    public_key_pem: bytes | None,
    archive_dir: Path | None = None,
    *,
    max_unsigned_records: int = AuditConfig.max_unsigned_records,
    witnesses: Sequence[Path] = (),
    chain: str = "",
) -> Verdict:
    """Checks the live chain record by record; every checkpoint's signature with the pinned
    audit key, and that each follows the one before; the anchor each archive left behind and,
    given ``archive_dir``, every archive file too (its digest, chain and checkpoints); that the
    log is signed to within the bound the service keeps (``max_unsigned_*``); and that every
    checkpoint a witness saw is in it. ``public_key_pem`` None: nothing is pinned yet, which
    a young log (no checkpoint so far, no audit key recorded) may be. A log with a pinned key
    but neither a checkpoint nor the key recorded is one whose first checkpoint never completed
    (the service pins its key first, then records it with that checkpoint): whole if the rest
    holds (its records within the bound, and what a witness saw of it borne out).
    ``location``: the SQLite file, or the ``postgresql://`` URL, of the log; in a database,
    ``chain`` names the chain (a replica's: each has its own audit key, so its own pin), and
    the records of the other chains that its checkpoints name are checked to be as signed: a
    chain removed whole, or rewritten, is named by the checkpoints of every other (those in
    another chain's archives against its archive files, in ``archive_dir``; without it they
    are counted, :attr:`Verdict.cross_unchecked`). A ``chain`` the database holds nothing of
    is bad: a mistyped name, or a chain removed whole. Every checkpoint is checked as signed
    for ``chain`` (its name is signed with it), but those before the chain's first so signed,
    which come from before checkpoints named their chain."""
    pin = b"" if public_key_pem is None else pinned_der(public_key_pem)
    public_der = pin or b""
    try:
        # A file, or a database's snapshot (one REPEATABLE READ transaction).
        base = open_audit_store(location, read_only=True)
    except FileNotFoundError:
        raise SignerError(f"no audit log at {redacted(str(location))}") from None
    try:
        held = base.chains() if chain else []
        store = base.on_chain(chain) if chain else base
        recorded = store.audit_key()
        archives = store.archives()
        checkpoints = store.checkpoints()
        records = list(store.records())
        named = _named(base, checkpoints, archive_dir)
    finally:
        base.close()
    archived = sum(a.last_seq - a.first_seq + 1 for a in archives)
    hashes: dict[int, str] = {}
    seq, prev, last, signed, witnessed = 0, GENESIS, 0, 0, 0
    bound = _Bound(public_der)
    try:
        if chain and chain not in held:
            raise _Bad(
                0,
                f"the database holds no chain {chain!r} (a mistyped name, or the chain removed "
                f"whole); it holds {', '.join(repr(c) for c in held) or 'none'}",
            )
        if pin is None:
            raise _Bad(0, _UNREADABLE_PIN)
        if public_key_pem is None and (recorded is not None or checkpoints or archives):
            raise _Bad(0, "the log has an audit key or checkpoints, but no pinned key was given")
        if public_key_pem is not None and recorded is None and (checkpoints or archives):
            raise _Bad(0, "an audit key is pinned, but the log carries none (removed)")
        if public_key_pem is not None and not (recorded or checkpoints or archives or records):
            raise _Bad(0, _PINNED_BUT_EMPTY)
        if recorded is not None and recorded[1] != public_der:
            raise _Bad(0, "the audit key recorded in the log is not the pinned one")
        for a in archives:
            if archive_dir is not None:
                _check_archive(archive_dir / a.file, a.sha256, bound, a.first_seq - 1, prev, chain)
            elif a.first_seq != seq + 1:
                raise _Bad(seq + 1, f"records {seq + 1} to {a.first_seq - 1} are in no archive")
            seq, prev = a.last_seq, a.last_hash
            hashes[seq] = prev
            signed = seq
        anchor = [c for c in checkpoints if c.seq == seq] if archives else []
        if archives:
            not_anchor = "the last archive's anchor is not a signed checkpoint of the log"
            if not (anchor and anchor[0].hash == prev):
                raise _Bad(seq, not_anchor)
            bound.check(anchor[0], not_anchor)
        last = _walk(records, seq, prev, hashes)
        signed = _signed(checkpoints, bound, hashes, last, signed, seq if archives else None)
        if recorded is not None and not checkpoints:
            # It is recorded with the first checkpoint, in one transaction.
            raise _Bad(1, "the log names its audit key, but has no checkpoint (removed)")
        _within_bound(records, signed, max_unsigned_records)
        for witness in witnesses:
            witnessed += _witnessed(
                Path(witness), bound, hashes, last, seq, first=recorded is None, chain=chain
            )
        _cross_checked(named)
        bad = None
    except _Bad as exc:
        bad = (exc.seq, exc.what)
    others = tuple(sorted({n.ref[0] for n in named}))
    unchecked = sum(n.unchecked for n in named)
    return Verdict(
        len(records), len(checkpoints), signed, last, archived, bad, witnessed, others, unchecked
    )


@dataclass(frozen=True)
class _Seen:
    """What another chain holds where a checkpoint (at ``at``) says it saw ``ref``."""

    at: int
    ref: Ref
    held: str | None  # the hash of its record there; None: nothing (or see ``fault``)
    unchecked: bool = False  # in one of its archives, whose file was not read
    fault: str | None = None  # what is wrong with the archive file that holds it


def _named(
    store: AuditStore, checkpoints: list[Checkpoint], archive_dir: Path | None
) -> list[_Seen]:
    """What the other chains hold where ``checkpoints`` say they saw their newest checkpoints,
    read in the same snapshot as the rest; a record in another chain's archive is read from
    its file in ``archive_dir`` (an archives row alone is no evidence: whoever can write the
    database can insert one, with the hash the ref names), and not checked without it."""
    found: list[_Seen] = []
    files: dict[str, tuple[dict[int, Record], str | None]] = {}
    for c in checkpoints:
        for ref in c.refs:
            other, seq, _ = ref
            view = store.on_chain(other)
            record = view.record(seq)
            if record is not None:
                found.append(_Seen(c.seq, ref, record.hash))
                continue
            segment = next((a for a in view.archives() if a.first_seq <= seq <= a.last_seq), None)
            if segment is None:
                found.append(_Seen(c.seq, ref, None))
            elif archive_dir is None:
                found.append(_Seen(c.seq, ref, None, unchecked=True))
            else:
                if segment.file not in files:
                    files[segment.file] = _archived_records(archive_dir, segment, other)
                held, fault = files[segment.file]
                kept = held.get(seq)
                found.append(_Seen(c.seq, ref, kept.hash if kept else None, fault=fault))
    return found


def _archived_records(
    archive_dir: Path, segment: Archived, chain: str
) -> tuple[dict[int, Record], str | None]:
    """The records of another chain's archive file, by sequence number, each one's hash
    recomputed; or what is wrong with the file."""
    path = archive_dir / segment.file
    if not path.exists():
        return {}, f"its archive {segment.file} is missing"
    if hashlib.sha256(path.read_bytes()).hexdigest() != segment.sha256:
        return {}, f"its archive {segment.file} is not the file that was archived"
    header, records, _ = read_archive(path)
    if header.get("chain", "") not in ("", chain):
        return {}, f"its archive {segment.file} is chain {header.get('chain')!r}'s"
    return {r.seq: r for r in records if record_hash(r.seq, r.event, r.prev_hash) == r.hash}, None


def _cross_checked(named: list[_Seen]) -> None:
    for n in named:
        other, seq, hash_ = n.ref
        if n.unchecked or n.held == hash_:
            continue
        if n.fault is not None:
            what = f"holds it in an archive, and {n.fault}"
        else:
            what = "does not hold it" if n.held is None else "holds another"
        raise _Bad(
            n.at,
            f"its checkpoint saw chain {other!r}'s record {seq} signed, and that chain "
            f"{what} (removed or rewritten)",
        )


def _within_bound(records: list[Record], signed: int, most: int) -> None:
    """The service never leaves more than ``most`` records after its newest checkpoint: a
    longer unsigned tail had its checkpoints removed."""
    tail = [r for r in records if r.seq > signed]
    if len(tail) > most:
        raise _Bad(
            signed + 1,
            f"records {signed + 1} to {tail[-1].seq} ({len(tail)}) are under no signed "
            f"checkpoint; the service leaves at most {most} so (checkpoints removed?)",
        )


def _witnessed(
    path: Path,
    bound: _Bound,
    hashes: dict[int, str],
    last: int,
    archived_to: int,
    first: bool = False,
    chain: str = "",
) -> int:
    """Checks the log against every checkpoint in a witness; returns how many were checked
    (those inside archives not read with ``--archives`` are not). ``first``: the log's first
    checkpoint never completed (pinned, its key not recorded), so any the witness saw was a
    first one too, signed after no stored checkpoint."""
    if not path.exists():
        raise _Bad(0, f"witness {path} does not exist")
    checked = 0
    try:
        entries = list(read_witness(path, chain))
    except WitnessError as exc:
        raise _Bad(0, f"witness {exc}") from None
    for line, c in entries:
        where = f"the witness {path.name} (line {line})"
        if not bound.key:
            raise _Bad(
                c.seq,
                f"{where} saw a checkpoint at {c.seq}, but the log has no audit key and none is "
                "pinned (removed?)",
            )
        bound.check(c, f"{where} holds a checkpoint the pinned key did not sign")
        if first and c.prev != 0:
            raise _Bad(c.seq, _AFTER_A_STORED_ONE.format(where=where, seq=c.seq))
        if c.seq > last:
            raise _Bad(
                last + 1,
                f"records {last + 1} to {c.seq} are missing: {where} saw a checkpoint at "
                f"{c.seq}, the log ends at {last} (cut from the end)",
            )
        known = hashes.get(c.seq)
        if known is None and c.seq <= archived_to:
            continue  # inside an archive whose records were not read
        if known != c.hash:
            raise _Bad(
                c.seq, f"record {c.seq} is not what {where} saw signed (rewritten, hashes and all)"
            )
        checked += 1
    return checked


def unsigned_tail_fault(
    store: AuditStore,
    pinned_pem: bytes | None,
    most: int,
    witness_files: Sequence[Path] = (),
) -> str | None:
    """What the writer checks before it signs anything more (``None``: nothing wrong). A
    checkpoint signs every record before it, so the records after the newest one must be ones
    the writer can vouch for: they follow that checkpoint, which the pinned key signed, and fit
    the bound the writer keeps; and a witness shows no newer checkpoint that the log lost. (Issue
    11's review: otherwise a restart signed over a tail rewritten, checkpoints and all.)"""
    key = pinned_der(pinned_pem) if pinned_pem is not None else None
    recorded = store.audit_key()
    checkpoints = store.checkpoints()
    archives = store.archives()
    try:
        if pinned_pem is not None and key is None:
            raise _Bad(0, _UNREADABLE_PIN)
        if key is not None and not (recorded or checkpoints or archives or store.head()[0]):
            raise _Bad(0, _PINNED_BUT_EMPTY)
        if key is not None and recorded is None and (checkpoints or archives):
            raise _Bad(0, "an audit key is pinned, but the log carries none (removed)")
        if recorded is not None and not checkpoints:
            # It is recorded with the first checkpoint, in one transaction. (Pinned, neither
            # recorded nor a checkpoint: that first checkpoint never completed; checked on.)
            raise _Bad(1, "the log names its audit key, but has no checkpoint (removed)")
        if key is None and (recorded is not None or checkpoints or archives):
            raise _Bad(0, "the log has an audit key or checkpoints, but none is pinned (removed)")
        if recorded is not None and key is not None and recorded[1] != key:
            raise _Bad(0, "the audit key recorded in the log is not the pinned one")
        seq, prev = 0, GENESIS
        if checkpoints:
            last = checkpoints[-1]
            if key is None or not (last.verifies(key) or last.verifies_unbound(key)):
                raise _Bad(last.seq, "the newest checkpoint is not signed by the audit key")
            record = store.record(last.seq)
            signed = record.hash if record is not None else None
            if record is None and archives and archives[-1].last_seq == last.seq:
                signed = archives[-1].last_hash
            if signed != last.hash:
                raise _Bad(last.seq, "it is not what the newest checkpoint signed")
            seq, prev = last.seq, last.hash
        elif archives:
            raise _Bad(archives[-1].last_seq, "archived records, but no checkpoint anchors them")
        tail = list(store.records(first=seq + 1))
        hashes: dict[int, str] = {}
        end = _walk(tail, seq, prev, hashes)
        _within_bound(tail, seq, most)
        for path in witness_files:
            if Path(path).exists():
                newer = [(n, c) for n, c in read_witness(path, store.chain) if c.seq > seq]
                for line, c in newer:
                    if recorded is None and c.prev != 0:
                        where = f"the witness {path} (line {line})"
                        raise _Bad(c.seq, _AFTER_A_STORED_ONE.format(where=where, seq=c.seq))
                    signed_ = key is not None and (c.verifies(key) or c.verifies_unbound(key))
                    if not signed_ or c.seq > end or hashes[c.seq] != c.hash:
                        raise _Bad(
                            c.seq,
                            f"the witness {path} (line {line}) saw a checkpoint "
                            "at it that the log does not bear out",
                        )
    except _Bad as exc:
        return f"record {exc.seq}: {exc.what}"
    except WitnessError as exc:
        return f"witness {exc}"
    return None


_AFTER_A_STORED_ONE = (
    "{where} saw a checkpoint at {seq} that follows a stored one, and the log has neither a "
    "checkpoint nor its audit key (removed)"
)
# A key is pinned at a log's first checkpoint, which is attempted only once it has records, and
# records are durable before it: a pinned log that holds nothing had everything removed (the
# review of issue 16: a chain emptied whole, then begun anew at 1 by the next start).
_PINNED_BUT_EMPTY = (
    "an audit key is pinned, but the log holds nothing: no record, checkpoint, archive or key "
    "(removed whole)"
)
_UNREADABLE_PIN = "the pinned audit key is no public key (its file emptied or damaged): restore it"


def pinned_der(pem: bytes) -> bytes | None:
    """The public key (DER) of a pin file's contents; None if they are not one (an empty or
    damaged file: never a traceback)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_archive(
    path: Path, sha256: str, bound: _Bound, seq: int, prev: str, chain: str = ""
) -> None:
    if not path.exists():
        raise _Bad(seq + 1, f"archive {path.name} is missing")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise _Bad(seq + 1, f"archive {path.name} is not the file that was archived")
    header, records, checkpoints = read_archive(path)
    # An archive names its chain (one without a name: of a log's one chain, or from before
    # archives named it); its checkpoints are checked as signed for the chain verified.
    if header.get("chain", "") not in ("", chain):
        raise _Bad(seq + 1, f"archive {path.name} is chain {header.get('chain')!r}'s")
    checkpoints = [replace(c, chain=chain) for c in checkpoints]
    if header.get("prev_hash") != prev:
        raise _Bad(seq + 1, f"archive {path.name} does not follow the one before it")
    hashes: dict[int, str] = {}
    last = _walk(records, seq, prev, hashes)
    if _signed(checkpoints, bound, hashes, last, seq) != last:
        raise _Bad(last, f"archive {path.name} does not end at a signed checkpoint")
