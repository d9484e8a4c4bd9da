"""The audit key in software, and what the audit log's tests do to a log.

The token's signing is stood in for by a software EC key (the integration tests use the real
token); everything else is the real AuditLog on a real SQLite file. ``write`` records an event
as the server does; ``rows`` and ``rewrite`` read and tamper with the file underneath.
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from signer._internal.audit import (
    AuditLog,
    Event,
    FileWitness,
    Signing,
    SQLiteAuditStore,
    verify_log,
)
from signer.keys import SignMechanism

T0 = datetime(2026, 11, 22, tzinfo=UTC)


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


def verdict_of(path: Path) -> tuple[int, str] | None:
    return verify_log(path, pinned(path)).first_bad


def rows(path: Path) -> list[list[Any]]:
    with sqlite3.connect(path) as db:
        return [list(r) for r in db.execute("SELECT * FROM records ORDER BY seq")]


def rewrite(path: Path, new_rows: list[list[Any]]) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM records")
        db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?)", new_rows)


def witnessed_log(tmp_path: Path, soft: SoftKey, n: int) -> tuple[Path, Path]:
    path = tmp_path / "audit.db"
    witness = tmp_path / "elsewhere" / "checkpoints.jsonl"
    witness.parent.mkdir()
    log = AuditLog(
        SQLiteAuditStore(path),
        checkpoint_every=4,
        checkpoint_interval=60,
        witnesses=[FileWitness(witness)],
    )
    log.start(soft.make, tmp_path / "audit.db.key.pem")
    for i in range(1, n + 1):
        write(log, event(i))
    log.close()
    return path, witness
