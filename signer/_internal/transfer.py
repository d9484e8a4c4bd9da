"""``signer store migrate``: a single machine's SQLite key store and audit log, moved to
PostgreSQL whole (issue 16 item 1), so that ``signer audit-log verify`` passes on both sides.

How, and why so:

* **The source stands still.** The copy holds each source file's write lock (``BEGIN
  IMMEDIATE``) from before it reads until it is done: a service still running on them is
  refused at once if it is writing, and otherwise cannot write until the copy is over (its
  calls fail closed, UNAVAILABLE), so nothing is answered OK that the copy lacks. Stop the
  service first; this is the safety net, not the procedure.
* **A broken log is not copied.** The source is verified first, with its pin and archive
  files (``verify_log``): a copy would otherwise launder a tampered log into a fresh database.
* **Through the stores' own writes.** Keys go in by ``create_key`` (a key and its versions, one
  transaction each), import tokens by ``add_import_token``, records by ``append`` in batches (it
  checks each batch follows the head) and checkpoints by ``add_checkpoint`` (it checks each
  follows the newest and signs its record as stored), interleaved so that each checkpoint's
  record is there before it. What those rightly refuse from a writer goes through
  :meth:`~signer._internal.audit._store.Tables.restore`, for this module only: the archive rows
  with the checkpoint anchoring them (its record is in an archive file), and checkpoints from
  before they chained (``prev`` None).
* **Not one transaction.** The stores' API commits each key, and each batch of records, on its
  own; a failure half way leaves part of the copy on the target, and the error says how to clear
  it (the refusal of a target that is not empty then makes a second run start clean).
* **Checked after.** The copy is verified with the same pin and archive directory, and read back
  against the source: keys and import tokens equal, the log's head, checkpoints, archives and
  audit key equal (with the chain verifying from the same start, an equal head hash is an
  equal log).

The audit key stays in the token, so the pin file (and archive files, and the witness: its
checkpoints are of chain ``""``) stay where they are and the service is pointed at them.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from signer._internal.audit import AuditStore, Checkpoint, SQLiteAuditStore, Verdict, verify_log
from signer._internal.audit._store import Tables
from signer._internal.config import (
    CHAIN_NAME,
    AuditConfig,
    StoreConfig,
    store_parameters,
    store_schema,
)
from signer._internal.store import SQLiteStore, Store, is_postgres, open_store
from signer.errors import SignerError
from signer.keys import ImportToken, Key

# Records per append, one transaction each (a checkpoint ends a batch sooner: every 1000
# records by default). Measured here (fsync on, keys 100): 300 000 records copied in 9.5 s, and
# verified on both sides in 7.9 s more; 1 000 000 in 83 s all told, 1.4 GB at most (verify_log
# holds a log's records in memory).
BATCH = 5000
_PAGE = 500  # keys per list_keys page


class MigrationError(SignerError):
    """The migration was refused (nothing copied), or failed (the message says what is on the
    target and how to clear it)."""


@dataclass(frozen=True)
class Sources:
    """What one machine's deployment keeps in files: the key store, the audit log, its pinned
    audit key and its archive directory."""

    store: Path
    audit: Path
    pin: Path
    archive_dir: Path


def sources(
    given: Sequence[str | Path],
    pin: str | Path | None = None,
    archive_dir: str | Path | None = None,
) -> Sources:
    """``given``: a state directory (its ``signer.db`` and ``audit.db``, the default names), or
    the key store and the audit log files in either order (told apart by their tables).
    ``pin`` and ``archive_dir`` default to the log's path + ``.key.pem`` / ``.archive``, as
    ``[audit]``'s do."""
    paths = [Path(p) for p in given]
    if len(paths) == 1 and paths[0].is_dir():
        directory = paths[0]
        paths = [
            directory / Path(StoreConfig.path).name,
            directory / Path(AuditConfig.path).name,
        ]
    found: dict[str, Path] = {}
    for path in paths:
        what = _kind(path)
        if what in found:
            raise MigrationError(f"--from names two {what}s: {found[what]} and {path}")
        found[what] = path
    if set(found) != {"key store", "audit log"}:
        missing = ({"key store", "audit log"} - set(found)).pop()
        raise MigrationError(f"--from names no {missing} (give a directory, or both files)")
    audit = found["audit log"]
    return Sources(
        found["key store"],
        audit,
        Path(pin) if pin else Path(f"{audit}.key.pem"),
        Path(archive_dir) if archive_dir else Path(f"{audit}.archive"),
    )


def _kind(path: Path) -> str:
    if not path.is_file():
        raise MigrationError(f"{path}: no such file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise MigrationError(f"{path} is not an SQLite database ({exc})") from None
    if {"keys", "versions", "import_tokens"} <= tables:
        return "key store"
    if {"records", "checkpoints", "audit_key"} <= tables:
        return "audit log"
    raise MigrationError(f"{path} is neither a signer key store nor an audit log")


@dataclass(frozen=True)
class Counts:
    keys: int
    versions: int
    import_tokens: int
    records: int  # live
    checkpoints: int
    archives: int
    archived_records: int


@dataclass(frozen=True)
class Migrated:
    counts: Counts  # the source's, and the target's: they are compared
    seconds: float


@contextlib.contextmanager
def _holding_writes(path: Path, what: str) -> Iterator[None]:
    """``path``'s write lock for the block: a service writing it refuses us, or is held off."""
    db = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise MigrationError(
                f"the {what} {path} is being written ({exc}): is the service running on it? "
                "Stop it, then migrate"
            ) from None
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


def _keys(store: Store) -> list[Key]:
    keys: list[Key] = []
    while page := store.list_keys(keys[-1].name if keys else "", _PAGE):
        keys.extend(page)
    return keys


def _import_tokens(path: Path, store: SQLiteStore) -> list[ImportToken]:
    """Every import token, live, spent or destroyed: the store reads each (its own columns and
    conversions); only their names are listed here, the Store API having no such read."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in db.execute("SELECT token FROM import_tokens ORDER BY token")]
    finally:
        db.close()
    return [store.get_import_token(name) for name in names]


def migrate(
    src: Sources,
    url: str,
    chain: str = "",
    *,
    max_unsigned_records: int = AuditConfig.max_unsigned_records,
    batch: int = BATCH,
) -> Migrated:
    """Copies ``src`` to the database ``url`` (the key store, and the audit log as ``chain``),
    after verifying the source and finding the target empty, and verifies the copy. Raises
    :class:`MigrationError` for a refusal (nothing copied: the target's tables may have been
    created, as the service would) or a failure (what is there, and how to clear it)."""
    if not is_postgres(url):
        raise MigrationError("--to must be a postgresql:// URL")
    if chain and not CHAIN_NAME.fullmatch(chain):
        raise MigrationError("--chain must be 1 to 32 of a-z, 0-9 and '-'")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        # Opened first: a store from before a column was added gets it, as at the service's
        # start (under the lock below, that ALTER would wait for the lock this holds).
        source_store = SQLiteStore(src.store)
        stack.callback(source_store.close)
        stack.enter_context(_holding_writes(src.audit, "audit log"))
        if src.store.resolve() != src.audit.resolve():
            stack.enter_context(_holding_writes(src.store, "key store"))
        pin = src.pin.read_bytes() if src.pin.exists() else None
        before = verify_log(
            src.audit, pin, src.archive_dir, max_unsigned_records=max_unsigned_records
        )
        if before.first_bad is not None:
            seq, what = before.first_bad
            raise MigrationError(
                f"the source audit log {src.audit} does not verify (record {seq}: {what}): "
                "nothing copied"
            )
        source_log = SQLiteAuditStore(src.audit, read_only=True)
        stack.callback(source_log.close)
        keys = _keys(source_store)
        tokens = _import_tokens(src.store, source_store)

        from signer._internal.audit._pgstore import PostgresAuditStore

        target_store = open_store(url)
        stack.callback(target_store.close)
        # The chain's writer: a replica writing this chain refuses us, and none starts meanwhile.
        target_log = PostgresAuditStore(url, chain=chain)
        stack.callback(target_log.close)
        chains = target_log.chains()
        _refuse_unless_empty(target_store, chain, chains)
        try:
            for key in keys:
                target_store.create_key(key)
            for token in tokens:
                target_store.add_import_token(token)
            _copy_log(source_log, target_log, batch)
            counts = _compare(source_log, target_log, keys, tokens, target_store)
            after = verify_log(
                url,
                pin,
                src.archive_dir,
                max_unsigned_records=max_unsigned_records,
                chain=chain,
            )
            if after.first_bad is not None:
                seq, what = after.first_bad
                raise MigrationError(f"the copy does not verify (record {seq}: {what})")
            if _verdict(after) != _verdict(before):
                raise MigrationError("verify counts other records or checkpoints in the copy")
        except Exception as exc:
            why = exc.message if isinstance(exc, SignerError) else type(exc).__name__
            raise MigrationError(
                f"the migration failed ({why}): the target holds part of the copy; "
                + _cleanup(url, chain, others=[c for c in chains if c != chain])
            ) from exc
    return Migrated(counts, time.monotonic() - started)


def _verdict(v: Verdict) -> tuple[int, ...]:
    return (v.records, v.checkpoints, v.last_checkpoint, v.records_end, v.archived)


def _refuse_unless_empty(store: Store, chain: str, chains: list[str]) -> None:
    now = datetime.now(UTC)
    if store.list_keys("", 1) or store.live_import_tokens(now) or store.spent_import_tokens(now):
        raise MigrationError(
            "the target already holds a key store (keys or import tokens): refused"
        )
    if chain in chains:
        name = f"chain {chain!r}" if chain else "the log's chain ''"
        raise MigrationError(f"the target's audit log already holds {name}: refused")


def _cleanup(url: str, chain: str, others: list[str]) -> str:
    schema = store_schema(store_parameters(url, "--to"), "--to")
    if not others:
        return (
            f"clear it with DROP SCHEMA {schema} CASCADE; CREATE SCHEMA {schema} (as its owner, "
            "as it was made) and run again"
        )
    # Other replicas' chains live in that schema: remove only what this copy wrote.
    return (
        f"the schema {schema} holds other chains too ({', '.join(others)}): clear this copy "
        "by deleting from records, checkpoints, archives and audit_key the rows of chain "
        f"{chain!r}, and every row of versions, keys and import_tokens (the key store was "
        "empty), then run again"
    )


def _copy_log(src: AuditStore, dst: Tables, batch: int) -> None:
    """Records in batches, each checkpoint after its record, as the writer stored them."""
    key = src.audit_key()
    archives = src.archives()
    checkpoints = src.checkpoints()
    end = src.head()[0]
    done = archives[-1].last_seq if archives else 0
    key_stored = False
    if archives:
        # The anchor: the checkpoint at the last archived record, the one left of those
        # before it (verified: it signs the archive's last hash).
        anchors = [k for k in checkpoints if k.seq <= done]
        if not anchors:
            raise MigrationError("the source's archives have no anchoring checkpoint")
        dst.restore(archives, anchors[0], key)
        for anchor in anchors[1:]:
            dst.restore(checkpoint=anchor)
        key_stored = True
        checkpoints = [k for k in checkpoints if k.seq > done]
    pending: list[Checkpoint | None] = [*checkpoints, None]  # None: the unsigned tail
    for c in pending:
        upto = end if c is None else c.seq
        while done < upto:
            records = list(src.records(first=done + 1, upto=min(upto, done + batch)))
            if not records:
                raise MigrationError(f"the source has no record {done + 1}")
            dst.append(records)
            done = records[-1].seq
        if c is None:
            break
        first = None if key_stored else key
        if c.prev is None:  # from before checkpoints chained: add_checkpoint wants a prev
            dst.restore(checkpoint=c, audit_key=first)
        else:
            dst.add_checkpoint(c, first)
        key_stored = True


def _compare(
    src: AuditStore,
    dst: AuditStore,
    keys: list[Key],
    tokens: list[ImportToken],
    target: Store,
) -> Counts:
    """The target read back against the source; their counts (the same, or this raises)."""
    if _keys(target) != keys:
        raise MigrationError("the target's keys are not the source's")
    if [target.get_import_token(t.token) for t in tokens] != tokens:
        raise MigrationError("the target's import tokens are not the source's")
    checkpoints = src.checkpoints()
    theirs = [replace(c, chain=src.chain) for c in dst.checkpoints()]
    if theirs != checkpoints:
        raise MigrationError("the target's checkpoints are not the source's")
    archives = src.archives()
    if dst.archives() != archives or dst.audit_key() != src.audit_key():
        raise MigrationError("the target's archives or audit key are not the source's")
    if dst.head() != src.head():
        raise MigrationError("the target's newest record is not the source's")
    first = archives[-1].last_seq + 1 if archives else 1
    records = src.head()[0] - first + 1
    return Counts(
        keys=len(keys),
        versions=sum(len(k.versions) for k in keys),
        import_tokens=len(tokens),
        records=records,
        checkpoints=len(checkpoints),
        archives=len(archives),
        archived_records=sum(a.last_seq - a.first_seq + 1 for a in archives),
    )
