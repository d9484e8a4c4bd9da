"""signer._internal.server's interceptor: the caller before the call, errors answered by the
status table, anything unexpected hidden."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from signer._internal.policy import Caller
from signer._internal.server import CALLER, CallInterceptor
from signer._wire import STATUS
from signer.errors import SignerError
from tests.unit.test_errors import WIRE_CLASSES


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
