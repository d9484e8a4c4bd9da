"""signer.errors: the one tree, whose root carries no wire status; every class in it is a wire
class (tests/unit/test_wire.py) or one that never travels."""

from __future__ import annotations

import grpc

from signer import errors
from signer._wire import STATUS, status_name, status_of
from signer.errors import (
    ConfigError,
    CoreFormatError,
    GateError,
    HarnessError,
    LoginRefused,
    ScanError,
    SignerError,
    StoreUncertain,
    TokenRejected,
)

# The classes that travel: signer._wire's table has exactly these (tests/unit/test_wire.py).
WIRE_CLASSES = [
    errors.InvalidArgument,
    errors.NotFound,
    errors.AlreadyExists,
    errors.FailedPrecondition,
    errors.Unavailable,
    errors.Unauthenticated,
    errors.PermissionDenied,
    errors.ResourceExhausted,
    errors.Internal,
]


def all_subclasses(cls: type[object]) -> set[type[object]]:
    out: set[type[object]] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | all_subclasses(sub)
    return out


LOCAL_CLASSES = {ConfigError, TokenRejected, ScanError, CoreFormatError, HarnessError, GateError}


def test_every_signer_error_subclass_is_accounted_for() -> None:
    # LoginRefused and StoreUncertain go as the status of their parent (a client sees
    # FailedPrecondition, Unavailable); the local classes never travel and would answer
    # INTERNAL. Any new subclass must be a wire class or one of these.
    subclasses = {c for c in all_subclasses(SignerError) if c.__module__ == "signer.errors"}
    assert subclasses == set(WIRE_CLASSES) | {LoginRefused, StoreUncertain} | LOCAL_CLASSES
    assert status_of(LoginRefused) is grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(StoreUncertain("x")) is grpc.StatusCode.UNAVAILABLE
    for local in LOCAL_CLASSES:
        assert status_of(local) is grpc.StatusCode.INTERNAL
        assert not isinstance(local("x"), tuple(STATUS))


def test_the_root_carries_no_wire_status() -> None:
    assert not hasattr(SignerError("x"), "code")
    assert status_of(SignerError("x")) is grpc.StatusCode.INTERNAL
    assert status_name(errors.NotFound) == "NOT_FOUND"


def test_error_carries_message() -> None:
    exc = errors.NotFound("key 'x' not found")
    assert exc.message == "key 'x' not found"
    assert str(exc) == "key 'x' not found"
