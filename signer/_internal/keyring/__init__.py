"""The keyring: the service's behaviour, free of gRPC (:class:`Keyring`).

Its parts, each a module here:

- ``_keyring``: :class:`Keyring`, the one object the server talks to: key lifecycle (create,
  rotate, primary, enable/disable, destruction and its reaper), reading keys and JWKS, signing
  (one message, a batch in chunks, a JWT) and verification, adoption of a provisioned key pair.
- ``_imports``: :class:`ImportTokens`, wrapped import's tokens and their wrapping keys, with their
  own bounds and locks; the keyring asks it to check, redeem and unwrap for an import.
- ``_common``: the clock, the CKA_ID length and per-name locks both use.
"""

from signer._internal.keyring._common import KEY_ID_BYTES, Clock, utcnow
from signer._internal.keyring._keyring import (
    BATCH_CHUNK,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    MAX_WAITING_PERIOD_SECONDS,
    BatchPlan,
    Keyring,
    adopt_with_config,
    token_label,
)

__all__ = [
    "BATCH_CHUNK",
    "DEFAULT_PAGE_SIZE",
    "KEY_ID_BYTES",
    "MAX_PAGE_SIZE",
    "MAX_WAITING_PERIOD_SECONDS",
    "BatchPlan",
    "Clock",
    "Keyring",
    "adopt_with_config",
    "token_label",
    "utcnow",
]
