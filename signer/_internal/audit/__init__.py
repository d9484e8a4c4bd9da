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
the cost of durability is shared by concurrent calls. Retention moves whole segments, ending at a
signed checkpoint, into archive files, and the live log remembers each move; nothing is deleted
that is not somewhere else, checked.

What a hash chain cannot show by itself: records cut from the end together with the checkpoints
that covered them. So checkpoints chain to each other, the log is never left unsigned beyond a
bound (records and time) that ``verify`` holds it to, and each checkpoint also goes to witnesses
outside the database (a file, syslog, and the service's own log) that ``verify`` can be given.
"""

from signer._internal.audit._archive import archive, read_archive
from signer._internal.audit._chain import (
    AUDIT_ALGORITHM,
    GENESIS,
    Checkpoint,
    Event,
    Record,
    Signing,
    checkpoint_message,
    record_hash,
)
from signer._internal.audit._log import AuditLog, AuditPaused, MakeKey
from signer._internal.audit._store import (
    Archived,
    AuditStore,
    SQLiteAuditStore,
    is_database,
    open_audit_store,
)
from signer._internal.audit._verify import Verdict, verify_log
from signer._internal.audit._witness import FileWitness, SyslogWitness, Witness, read_witness
from signer._internal.config import AuditConfig


def witnesses(cfg: AuditConfig) -> list[Witness]:
    """The witnesses ``cfg`` names."""
    out: list[Witness] = []
    if cfg.witness_file:
        out.append(FileWitness(cfg.witness_file))
    if cfg.witness_syslog:
        out.append(SyslogWitness(cfg.witness_syslog))
    return out


__all__ = [
    "AUDIT_ALGORITHM",
    "GENESIS",
    "Archived",
    "AuditLog",
    "AuditPaused",
    "AuditStore",
    "Checkpoint",
    "Event",
    "FileWitness",
    "MakeKey",
    "Record",
    "SQLiteAuditStore",
    "Signing",
    "SyslogWitness",
    "Verdict",
    "Witness",
    "archive",
    "checkpoint_message",
    "is_database",
    "open_audit_store",
    "read_archive",
    "read_witness",
    "record_hash",
    "verify_log",
    "witnesses",
]
