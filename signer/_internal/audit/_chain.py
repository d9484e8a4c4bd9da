"""The pieces of the chain: events, records, checkpoints, their hashes and signatures."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from signer.keys import (
    ALGORITHMS,
    Padding,
    SigFormat,
    SignMechanism,
    format_signature,
    to_be_signed,
    verify,
)

AUDIT_ALGORITHM = ALGORITHMS["ec-p256"]
GENESIS = "0" * 64
# Another chain's newest checkpoint, as a checkpoint saw it: (chain, seq, hash).
Ref = tuple[str, int, str]


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


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    time: str
    signature: bytes
    # The sequence number of the checkpoint before this one (0: the first), signed with it:
    # checkpoints chain, so one deleted between two is named. None: a checkpoint written before
    # they chained (its signature covers seq, hash and time only).
    prev: int | None = None
    # What the writer saw of the other chains of its database when it signed (replicas, one
    # chain each): their newest checkpoints as (chain, seq, hash), signed with it, so that a
    # chain removed whole, or rewritten, is named by another's checkpoint. Empty: one chain.
    refs: tuple[Ref, ...] = ()
    # The chain it signs ("": the one chain of a log that has one), signed with it (v3): with
    # one pin shared by replicas, a chain's rows relabelled as another's do not verify.
    chain: str = ""

    def verifies(self, public_der: bytes) -> bool:
        """Signed by ``public_der`` as a checkpoint of :attr:`chain`."""
        return self._verifies(public_der, self.chain)

    def verifies_unbound(self, public_der: bytes) -> bool:
        """Signed by ``public_der`` without naming a chain, although it is a named chain's: one
        signed before checkpoints named their chain (a log migrated into the chain, or a replica
        of before), which verify accepts only before the chain's first bound one."""
        return bool(self.chain) and self._verifies(public_der, "")

    def _verifies(self, public_der: bytes, chain: str) -> bool:
        message = checkpoint_message(self.seq, self.hash, self.time, self.prev, self.refs, chain)
        return verify(
            public_der,
            AUDIT_ALGORITHM,
            self.signature,
            message,
            None,
            Padding.PSS,
            SigFormat.DER,
        )


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def record_hash(seq: int, e: Event, prev_hash: str) -> str:
    fields = [seq, iso(e.time), e.caller, e.operation, e.key, e.version, e.payload_sha256, e.status]
    body = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(prev_hash.encode() + b"\n" + body).hexdigest()


def chain(seq: int, event: Event, prev_hash: str) -> Record:
    return Record(seq, event, prev_hash, record_hash(seq, event, prev_hash))


def checkpoint_message(
    seq: int,
    hash_: str,
    at: str,
    prev: int | None = None,
    refs: tuple[Ref, ...] = (),
    chain: str = "",
) -> bytes:
    """What a checkpoint's signature covers. v1 (``prev`` None) and v2 (chain "" and no refs)
    are those of logs before refs and chain names; v3 signs the refs and, for a named chain,
    the chain's name after them (``:name``: the refs' text ends in ``]``, a name never does,
    so no v3 message of one chain is another's, or one of chain "")."""
    if prev is None:
        return f"signer-audit-checkpoint:{seq}:{hash_}:{at}".encode()
    if not refs and not chain:
        return f"signer-audit-checkpoint:v2:{seq}:{hash_}:{at}:{prev}".encode()
    named = f":{chain}" if chain else ""
    return f"signer-audit-checkpoint:v3:{seq}:{hash_}:{at}:{prev}:{refs_text(refs)}{named}".encode()


def refs_text(refs: tuple[Ref, ...]) -> str:
    """The one text of a checkpoint's references (signed, and stored as such)."""
    return json.dumps(sorted(map(list, refs)), separators=(",", ":"), ensure_ascii=True)


def refs_of(text: str | None) -> tuple[Ref, ...]:
    if not text:
        return ()
    return tuple((str(c), int(s), str(h)) for c, s, h in json.loads(text))


class Signing:
    """How the audit log signs: the token's ``sign`` and the audit key's id."""

    def __init__(self, sign: Callable[[bytes, SignMechanism, bytes], bytes], key_id: bytes) -> None:
        self._sign = sign
        self.key_id = key_id

    def __call__(self, message: bytes) -> bytes:
        mech, data = to_be_signed(AUDIT_ALGORITHM, message, None, Padding.PSS)
        raw = self._sign(self.key_id, mech, data)
        return format_signature(AUDIT_ALGORITHM, raw, SigFormat.DER)
