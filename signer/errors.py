"""The one exception tree of the signer.

Every error the service can answer with is a subclass of :class:`SignerError` and knows its gRPC
status code. PKCS#11 errors are mapped to these in :mod:`signer.token` (and nowhere else); these
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
    └── Internal               a bug or an unexpected token answer; details go to the log only
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


class Internal(SignerError):
    code = Code.INTERNAL


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
        Internal,
    )
}
