"""Our errors on the wire: the one table between :mod:`signer.errors` and gRPC status codes.

The server's interceptor answers an error with :func:`status_of` (its class's nearest entry in
the table, INTERNAL for anything else); the client turns a status back into the class with
:func:`error_from` (the table read backwards). Errors that never travel (ConfigError,
ScanError, ...) have no entry: one that reached the interceptor would be a bug, and answers
INTERNAL.
"""

from __future__ import annotations

import grpc

from signer.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SignerError,
    Unauthenticated,
    Unavailable,
)

STATUS: dict[type[SignerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Internal: grpc.StatusCode.INTERNAL,
}

_BY_STATUS: dict[grpc.StatusCode, type[SignerError]] = {v: k for k, v in STATUS.items()}
_BY_VALUE: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_of(error: SignerError | type[SignerError]) -> grpc.StatusCode:
    """The status an error is answered with: its class's nearest ancestor in :data:`STATUS`."""
    cls = error if isinstance(error, type) else type(error)
    for base in cls.__mro__:
        if base in STATUS:
            return STATUS[base]
    return grpc.StatusCode.INTERNAL


def status_name(error: SignerError | type[SignerError]) -> str:
    """``status_of(error)``'s name, e.g. ``"NOT_FOUND"``: what audit records and logs say."""
    return str(status_of(error).name)


def error_from(code: grpc.StatusCode | int, message: str) -> SignerError:
    """The error a status stands for, with the server's message; one outside the table (or a
    number gRPC does not know) is :class:`Internal`, naming it."""
    status = _BY_VALUE.get(code) if isinstance(code, int) else code
    cls = _BY_STATUS.get(status) if status is not None else None
    if cls is None:
        name = status.name if status is not None else str(code)
        return Internal(f"{name}: {message}")
    return cls(message)
