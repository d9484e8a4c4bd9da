"""signer.errors, the one table to gRPC statuses (signer._wire) and the client's way back."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from signer import errors
from signer._internal.policy import Caller
from signer._internal.server import CALLER, CallInterceptor
from signer._wire import STATUS, error_from, status_name, status_of
from signer.client import _error
from signer.errors import (
    ConfigError,
    CoreFormatError,
    HarnessError,
    Internal,
    LoginRefused,
    ScanError,
    SignerError,
    StoreUncertain,
    TokenRejected,
)

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


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]  # grpc is untyped (Any) to mypy
    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__()
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


def all_subclasses(cls: type[object]) -> set[type[object]]:
    out: set[type[object]] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | all_subclasses(sub)
    return out


def test_every_wire_error_class_has_a_distinct_status() -> None:
    statuses = [STATUS[cls] for cls in WIRE_CLASSES]
    assert len(set(statuses)) == len(statuses)
    assert set(STATUS) == set(WIRE_CLASSES)
    for cls, status in STATUS.items():
        assert (
            status.name
            == "".join(
                "_" + ch if ch.isupper() and i else ch for i, ch in enumerate(cls.__name__)
            ).upper()
        )


LOCAL_CLASSES = {ConfigError, TokenRejected, ScanError, CoreFormatError, HarnessError}


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


def test_error_from_a_number_gRPC_does_not_know_is_internal() -> None:
    exc = error_from(99, "boom")
    assert type(exc) is Internal
    assert exc.message == "99: boom"
    assert type(error_from(5, "gone")) is errors.NotFound


@pytest.mark.parametrize("cls", WIRE_CLASSES)
def test_client_maps_status_back_to_class(cls: type[SignerError]) -> None:
    status = STATUS[cls]
    exc = _error(FakeRpcError(status, "the server said so"))
    assert type(exc) is cls
    assert exc.message == "the server said so"


@pytest.mark.parametrize("cls", WIRE_CLASSES)
def test_round_trip_through_server_table(cls: type[SignerError]) -> None:
    original = cls("message 42")
    back = _error(FakeRpcError(STATUS[cls], original.message))
    assert type(back) is type(original)
    assert back.message == original.message


def test_client_missing_details_uses_code_name() -> None:
    exc = _error(FakeRpcError(grpc.StatusCode.NOT_FOUND, None))
    assert isinstance(exc, errors.NotFound)
    assert exc.message == "NOT_FOUND"
    exc = _error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, ""))
    assert isinstance(exc, errors.Unavailable)
    assert exc.message == "UNAVAILABLE"


@pytest.mark.parametrize("status", [grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_cancelled_and_deadline_mean_try_again(status: grpc.StatusCode) -> None:
    # A server shutting down cancels undispatched calls (grpc/grpc#41785); a deadline is the
    # caller's own limit. Neither is a bug in the service, so neither is Internal.
    exc = _error(FakeRpcError(status, "boom"))
    assert type(exc) is errors.Unavailable
    assert "boom" in exc.message


@pytest.mark.parametrize(
    "status",
    [
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
    ],
)
def test_unknown_codes_become_internal(status: grpc.StatusCode) -> None:
    exc = _error(FakeRpcError(status, "boom"))
    assert type(exc) is Internal
    assert exc.message == f"{status.name}: boom"


# --- CallInterceptor ----------------------------------------------------------------------------


class FakeContext:
    def __init__(self) -> None:
        self.aborted: list[tuple[grpc.StatusCode, str]] = []

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted.append((code, details))
        raise grpc.aio.AbortError()


class Details:
    def __init__(self, method: str = "/signer.v1.SignerService/Sign") -> None:
        self.method = method


ALICE = Caller.unix(1000, "alice")


def intercept(
    handler: Any, caller: Caller | None = ALICE, method: str = "/signer.v1.SignerService/Sign"
) -> Any:
    """``handler`` (a gRPC method handler: untyped) as the interceptor hands it back."""

    async def continuation(_details: object) -> object:
        return handler

    interceptor = CallInterceptor(lambda context: caller, "connect through the Unix socket")
    return asyncio.run(interceptor.intercept_service(continuation, Details(method)))


def call_guarded(
    behaviour: BaseException | str,
    caller: Caller | None = ALICE,
    method: str = "/signer.v1.SignerService/Sign",
) -> tuple[object, FakeContext]:
    async def inner(request: object, context: object) -> object:
        if isinstance(behaviour, BaseException):
            raise behaviour
        assert method.startswith("/grpc.health") or CALLER.get() == caller
        return behaviour

    handler = intercept(grpc.unary_unary_rpc_method_handler(inner), caller, method)
    ctx = FakeContext()

    async def run() -> object:
        return await handler.unary_unary("request", ctx)

    try:
        result: object = asyncio.run(run())
    except grpc.aio.AbortError:
        result = "aborted"
    return result, ctx


def test_interceptor_passes_results_through() -> None:
    result, ctx = call_guarded("response")
    assert (result, ctx.aborted) == ("response", [])


@pytest.mark.parametrize("cls", WIRE_CLASSES)
def test_interceptor_maps_signer_errors(cls: type[SignerError]) -> None:
    result, ctx = call_guarded(cls("key 'k' version 2 is disabled"))
    assert result == "aborted"
    assert ctx.aborted == [(STATUS[cls], "key 'k' version 2 is disabled")]


def test_interceptor_hides_unexpected_errors() -> None:
    result, ctx = call_guarded(KeyError("secret detail"))
    assert result == "aborted"
    assert len(ctx.aborted) == 1
    code, details = ctx.aborted[0]
    assert code is grpc.StatusCode.INTERNAL
    assert "secret detail" not in details
    assert "KeyError" not in details


def test_interceptor_lets_aborts_through() -> None:
    result, ctx = call_guarded(grpc.aio.AbortError())
    assert result == "aborted"
    assert ctx.aborted == []


def test_interceptor_leaves_other_handlers_alone() -> None:
    assert intercept(None) is None
    stream = grpc.unary_stream_rpc_method_handler(lambda r, c: iter(()))
    assert intercept(stream) is stream


def test_a_call_without_a_caller_is_unauthenticated_before_it_runs() -> None:
    result, ctx = call_guarded("response", caller=None)
    assert result == "aborted"
    assert ctx.aborted == [
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "no authenticated caller: connect through the Unix socket",
        )
    ]


def test_health_checks_need_no_caller() -> None:
    result, ctx = call_guarded("ok", caller=None, method="/grpc.health.v1.Health/Check")
    assert (result, ctx.aborted) == ("ok", [])
