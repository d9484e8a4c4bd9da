"""What the keyring's parts share: the clock, the length of the CKA_IDs they draw."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
# Every object the service generates gets a random CKA_ID this long (signer keys reconcile
# tells the service's objects by it: signer/_internal/reconcile.py SERVICE_KEY_ID_BYTES).
KEY_ID_BYTES = 16


def utcnow() -> datetime:
    return datetime.now(UTC)
