"""The one exception tree of the signer.

Every error the service can answer with is a subclass of :class:`SignerError` and knows its gRPC
status code. PKCS#11 errors are mapped to these in :mod:`signer._internal.token` (and nowhere
else); these
are mapped to gRPC statuses in one server interceptor, and back again in :mod:`signer.client`.

Messages name the problem (the parameter, the key, the version) and never carry a secret: no PIN,
no key material, no payload.

    SignerError
    ├── InvalidArgument        bad input: name, algorithm, digest length, message size, ...
    ├── NotFound               unknown key or version
    ├── AlreadyExists          duplicate key name
    ├── FailedPrecondition     the state forbids it: disabled/destroyed version, missing mechanism
    ├── Unavailable            the token host cannot be reached (retry later)
    ├── Unauthenticated        no caller identity
    ├── PermissionDenied       caller may not do this
    ├── ResourceExhausted      a bound was reached: live import tokens, refused calls of a caller
    └── Internal               a bug or an unexpected token answer; details go to the log only

A value a caller sent goes into a message only through :func:`shown`, which bounds it: a message
travels in a gRPC trailer (nginx refuses large ones), a log line and an audit record.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """The gRPC status codes this service uses, by name (kept free of a grpc import)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"


class SignerError(Exception):
    """Root of every error this project raises on purpose."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SignerError):
    code = Code.INVALID_ARGUMENT


class NotFound(SignerError):
    code = Code.NOT_FOUND


class AlreadyExists(SignerError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(SignerError):
    code = Code.FAILED_PRECONDITION


class Unavailable(SignerError):
    code = Code.UNAVAILABLE


class Unauthenticated(SignerError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(SignerError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(SignerError):
    code = Code.RESOURCE_EXHAUSTED


class Internal(SignerError):
    code = Code.INTERNAL


class LoginRefused(FailedPrecondition):
    """The token refuses the service's PIN: no call can be served, and waiting will not help
    (signer/_internal/token/_logins.py)."""


class StoreUncertain(Unavailable):
    """A store write failed with an I/O error: it was rolled back for this process, but what
    it wrote may come back at the recovery after a crash (a COMMIT whose fsync failed). Code
    that would undo what the write stood for must not: a crash may leave it on record."""


# What "the token cannot be used now" looks like to code that would otherwise try again later.
TOKEN_AWAY: tuple[type[SignerError], ...] = (Unavailable, LoginRefused)


class ConfigError(SignerError):
    """A configuration file or setting is wrong; raised at start-up, never over the wire."""

    code = Code.FAILED_PRECONDITION


BY_CODE: dict[Code, type[SignerError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Internal,
    )
}

# The most of a caller's value a message shows.
SHOWN_CHARS = 64


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` of at most ``limit`` characters of it, saying how long it really was:
    untrusted input in a message, a log line or an audit record, bounded (issue 11)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
