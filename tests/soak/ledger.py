"""What the callers saw, counted: answers per RPC and status, signatures checked, defects, and
the audit records the log must hold for the calls that were answered OK.

An audit record keeps the caller's identity, the method, the key's name and the SHA-256 of the
call's payload (signer._internal.server.audit_event; README "audit log"). For every OK answer the
ledger
keeps the same four things, so that after the run each OK answer can be matched with a record
of its own (a multiset: a record for a different call of the same kind does not cover it).
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from signer.v1 import signer_pb2 as pb

# Every RPC of the API, from the proto itself: a new one shows up as not exercised.
METHODS: tuple[str, ...] = tuple(pb.DESCRIPTOR.services_by_name["SignerService"].methods_by_name)
# The request fields an audit record digests, the first one set (README, "audit log").
_PAYLOAD_FIELDS = ("message", "digest", "wrapped_key", "claims")
SAMPLES = 20  # examples of each kind of defect kept for the report
_RESERVOIR = 4000  # latencies kept per method, for percentiles


def payload_digest(request: Any) -> str:
    """The payload digest an audit record of ``request`` carries: of the first payload field
    set, or for a batch the SHA-256 of its items' SHA-256s in order; "" for none."""
    for name in _PAYLOAD_FIELDS:
        value = getattr(request, name, b"")
        if isinstance(value, bytes) and value:
            return hashlib.sha256(value).hexdigest()
    items = getattr(request, "items", None)
    if items:
        joined = b"".join(hashlib.sha256(i.message or i.digest).digest() for i in items)
        return hashlib.sha256(joined).hexdigest()
    return ""


def record_key(identity: str, method: str, name: str, payload: str) -> bytes:
    """What one call is known by in both the ledger and the log (16 bytes, to keep a long run's
    ledger small)."""
    return hashlib.sha256(f"{identity}\0{method}\0{name}\0{payload}".encode()).digest()[:16]


_VOLATILE = re.compile(r"'[^']*'|\"[^\"]*\"|\b[0-9a-f]{8,}\b|\d+(\.\d+)?")


def reason(details: str) -> str:
    """An error message with its names and numbers taken out, to count messages by kind."""
    return _VOLATILE.sub("_", details)[:100]


@dataclass
class Ledger:
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method, status)
    unexpected: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected_samples: list[dict[str, Any]] = field(default_factory=list)
    reasons: Counter[tuple[str, str]] = field(default_factory=Counter)  # (status, message kind)
    unavailable: list[tuple[float, str]] = field(default_factory=list)  # (t, method)
    expected_records: Counter[bytes] = field(default_factory=Counter)
    signatures_verified: int = 0
    wrong_signatures: int = 0
    wrong_samples: list[dict[str, Any]] = field(default_factory=list)
    unverified: int = 0  # signatures whose version's public key could never be had
    verify_answers: Counter[str] = field(default_factory=Counter)  # right / wrong
    batch_items: Counter[str] = field(default_factory=Counter)  # OK or the item's error code
    defects: Counter[str] = field(default_factory=Counter)  # inconsistencies by kind
    defect_samples: list[dict[str, Any]] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)

    def now(self) -> float:
        return time.monotonic() - self.started

    def _latency(self, method: str, seconds: float) -> None:
        kept = self.latencies.setdefault(method, [])
        self.calls[method] += 1
        if len(kept) < _RESERVOIR:
            kept.append(seconds)
        else:
            i = random.randrange(self.calls[method])
            if i < _RESERVOIR:
                kept[i] = seconds

    def answered(self, identity: str, method: str, request: Any, seconds: float) -> None:
        key = record_key(
            identity, method, str(getattr(request, "name", "")), payload_digest(request)
        )
        with self.lock:
            self.ok[method] += 1
            self.expected_records[key] += 1
            self._latency(method, seconds)

    def failed(
        self, method: str, code: str, details: str, seconds: float, expected: bool, caller: str
    ) -> None:
        with self.lock:
            self.errors[(method, code)] += 1
            self.reasons[(code, reason(details))] += 1
            self._latency(method, seconds)
            if code == "UNAVAILABLE":
                self.unavailable.append((self.now(), method))
            if not expected:
                self.unexpected[(method, code)] += 1
                if len(self.unexpected_samples) < SAMPLES:
                    self.unexpected_samples.append(
                        {
                            "t": round(self.now(), 1),
                            "caller": caller,
                            "method": method,
                            "status": code,
                            "details": details[:300],
                        }
                    )

    def signature(self, good: bool, **what: Any) -> None:
        with self.lock:
            if good:
                self.signatures_verified += 1
                return
            self.wrong_signatures += 1
            if len(self.wrong_samples) < SAMPLES:
                self.wrong_samples.append({"t": round(self.now(), 1), **what})

    def defect(self, kind: str, **what: Any) -> None:
        with self.lock:
            self.defects[kind] += 1
            if len(self.defect_samples) < SAMPLES:
                self.defect_samples.append({"t": round(self.now(), 1), "kind": kind, **what})

    def count(self, counter: str, key: str, n: int = 1) -> None:
        with self.lock:
            getattr(self, counter)[key] += n

    def add_unverified(self, n: int = 1) -> None:
        with self.lock:
            self.unverified += n
