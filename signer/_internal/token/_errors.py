"""What the token's PKCS#11 errors mean to the service: one table, applied by :func:`map_errors`.

python-pkcs11 raises one exception class per CKR_ return code (its ``_errors.pyx`` maps the codes
to the classes); :data:`PKCS11_ERRORS` maps those classes to :mod:`signer.errors`. Every call into
the token runs on a borrowed session inside ``map_errors()``: the first entry the exception is
an instance of decides what the caller gets, most specific first, ``raise Ours(message) from
exc``. A message names the return code and never echoes an input.

Some answers mean more than their class, so they are written out where their context is:

* a lost token host (:data:`CONNECTION_LOST`): the session pool marks the connection down first,
  and its UNAVAILABLE says why the token is down (``SessionPool._session``);
* a stale object handle (``ObjectHandleInvalid``, ``KeyHandleInvalid``): the session's cached
  handles are dropped before the table answers NOT_FOUND (``SessionPool._session``);
* a refused attempt (:data:`PIN_REFUSED`): counted by :mod:`._logins` against the file it
  came from, and the connection attempt fails UNAVAILABLE (``SessionPool._connect``);
* a failed connection attempt: not a call's error; the monitor records why and tries again
  (``SessionPool._try_connect``);
* a failed C_UnwrapKey (:data:`UNWRAP_ERRORS`): the caller's wrapped key is the likely cause, so
  the import maps those first, with this table of its own (``WrappedImport._unwrap``);
* an attribute the object does not have or does not show (:data:`ATTRIBUTE_UNREADABLE`): read
  as absent, not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pkcs11.exceptions as p11e

from signer._internal.token._logins import EXPIRED, INCORRECT, LOCKED
from signer.errors import FailedPrecondition, Internal, InvalidArgument, NotFound, SignerError

log = logging.getLogger("signer.token")  # named for the component: signer._internal.logs

# A python-pkcs11 exception class -> our error and its message; ``{error}`` is the class's name.
Table = Mapping[type[Exception], tuple[type[SignerError], str]]

PKCS11_ERRORS: Table = {
    p11e.MechanismInvalid: (FailedPrecondition, "the token refused the mechanism: {error}"),
    p11e.DataLenRange: (InvalidArgument, "the token refused the input: {error}"),
    p11e.DataInvalid: (InvalidArgument, "the token refused the input: {error}"),
    p11e.ObjectHandleInvalid: (NotFound, "key object is gone from the token ({error})"),
    p11e.KeyHandleInvalid: (NotFound, "key object is gone from the token ({error})"),
    # Whatever else the token says is unexpected: named (and logged), never echoing inputs.
    p11e.PKCS11Error: (Internal, "token error: {error}"),
}

# Errors that mean the connection to the token host is gone, not that the request was wrong.
CONNECTION_LOST: tuple[type[Exception], ...] = (
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.UserNotLoggedIn,
)

# Errors that mean a cached object handle no longer names an object.
STALE_HANDLE: tuple[type[Exception], ...] = (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid)

# What the token answers when it refuses the PIN itself, and what it means for the next try.
PIN_REFUSED: dict[type[Exception], str] = {
    p11e.PinIncorrect: INCORRECT,
    p11e.PinInvalid: INCORRECT,
    p11e.PinLenRange: INCORRECT,
    p11e.PinExpired: EXPIRED,
    p11e.PinLocked: LOCKED,
}

# What a token answers when a wrapped key will not unwrap: corrupt, wrapped for another wrapping
# key, or not the declared type. SoftHSM2 2.6.1 answers a failed OAEP decryption with
# CKR_GENERAL_ERROR and a PKCS#8 it cannot use with CKR_FUNCTION_FAILED. ``{kind}``: the
# declared algorithm's kind with its article ("an RSA-2048").
_UNWRAP_REFUSED = (
    "the token could not unwrap wrapped_key ({error}): it is corrupt, was wrapped for another "
    "import token's wrapping key, or is not {kind} key in PKCS#8"
)
UNWRAP_ERRORS: Table = {
    p11e.WrappedKeyInvalid: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.WrappedKeyLenRange: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.EncryptedDataInvalid: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.EncryptedDataLenRange: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.DataInvalid: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.DataLenRange: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.GeneralError: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.FunctionFailed: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.KeyTypeInconsistent: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.KeySizeRange: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.DomainParamsInvalid: (InvalidArgument, _UNWRAP_REFUSED),
    p11e.MechanismParamInvalid: (
        FailedPrecondition,
        "the PKCS#11 module refuses RSA-OAEP with SHA-1 and MGF1-SHA-1 for unwrapping",
    ),
}

# What reading an attribute answers when the object has none of that type, or will not show it.
ATTRIBUTE_UNREADABLE: tuple[type[Exception], ...] = (
    p11e.AttributeTypeInvalid,
    p11e.AttributeSensitive,
)


@contextmanager
def map_errors(table: Table = PKCS11_ERRORS, **facts: str) -> Iterator[None]:
    """Raises ``table``'s error for an exception it names, ``from`` that exception; anything
    else goes through unchanged (our own errors; with a partial table, what it does not name).
    ``facts`` fill the messages' other fields. An answer the table files under INTERNAL is
    logged too: its message names it, the log says it happened."""
    try:
        yield
    except Exception as exc:
        mapped = next((to for cls, to in table.items() if isinstance(exc, cls)), None)
        if mapped is None:
            raise
        ours, message = mapped
        if ours is Internal:
            log.error("token error", extra={"error": type(exc).__name__})
        raise ours(message.format(error=type(exc).__name__, **facts)) from exc
