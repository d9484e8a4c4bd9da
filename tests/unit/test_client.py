"""signer.client: a status turned back into its error class; the ImportKeyVersion request
built on the caller's side."""

from __future__ import annotations

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from signer import errors, wrapping
from signer._wire import STATUS
from signer.client import _error, build_import_request
from signer.errors import Internal, SignerError
from signer.v1 import signer_pb2 as pb
from tests.unit.fakes import pem, spki, unwrap, wrapping_key, wrapping_pem
from tests.unit.test_errors import WIRE_CLASSES


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]  # grpc is untyped (Any) to mypy
    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__()
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


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


# --- the import request --------------------------------------------------------------------


def test_build_import_request_sends_the_blob_and_the_public_key_only() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    wk = wrapping_key()
    params = pb.ImportParameters(import_token="t" * 43, wrapping_public_key_pem=wrapping_pem(wk))
    req = build_import_request("k", "ec-p384", pem(key), params, scope="s", labels={"a": "b"})
    assert (req.name, req.algorithm, req.import_token, req.scope) == ("k", "ec-p384", "t" * 43, "s")
    assert dict(req.labels) == {"a": "b"}
    assert req.public_key_der == spki(key)
    assert unwrap(req.wrapped_key, wk) == wrapping.pkcs8_der(key)
    wire = req.SerializeToString()
    secret = key.private_numbers().private_value.to_bytes(48, "big")
    assert secret not in wire
    assert wrapping.pkcs8_der(key) not in wire
