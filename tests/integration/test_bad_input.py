"""Every way a caller can get it wrong: the right error class, a message that names the problem,
and nothing changed by the failed call.

Most rows share one shape (an existing key, one refused call) and live in ``ROWS``, one test id
per row; rows that need their own service or a hand-built request have their own test. The
client maps gRPC statuses back to :mod:`signer.errors` classes; ``test_raw_grpc_status`` checks
the status codes themselves, without the client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signer.client import SignerClient
from signer.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SignerError,
    Unavailable,
)
from signer.v1 import signer_pb2 as pb
from signer.v1 import signer_pb2_grpc as pb_grpc
from tests.conftest import RunningService, ServiceFactory, TokenHostHandle, UniqueName

pytestmark = pytest.mark.integration

DAY = 24 * 3600
MESSAGE = b"bad input payload"


@dataclass(frozen=True)
class Ctx:
    service: RunningService
    client: SignerClient
    name: str  # an ec-p256 key with one enabled version, the primary
    missing: str  # a valid name that no key has


def snapshot(client: SignerClient) -> list[pb.Key]:
    """Everything the service knows about every key (each test has its own store)."""
    return list(client.list_keys(page_size=1000).keys)


def refused(ctx: Ctx, error: type[SignerError], says: list[str], call: Callable[[], object]) -> str:
    """Runs a call that must fail with ``error`` whose message contains every one of ``says``,
    and must leave every key exactly as it was. Returns the message."""
    before = snapshot(ctx.client)
    with pytest.raises(SignerError) as exc:
        call()
    assert type(exc.value) is error, f"{type(exc.value).__name__}: {exc.value.message}"
    for fragment in says:
        assert fragment in exc.value.message, (fragment, exc.value.message)
    assert snapshot(ctx.client) == before, "the failed call changed the keys"
    return exc.value.message


@pytest.fixture
def ctx(service: RunningService, unique_name: Callable[[str], str]) -> Ctx:
    client = service.client()
    name = unique_name("bad")
    client.create_key(name, "ec-p256")
    return Ctx(service, client, name, unique_name("missing"))


@pytest.fixture
def stub(service: RunningService) -> Iterator[pb_grpc.SignerServiceStub]:
    """The generated stub over a plain channel: requests built by hand, statuses unmapped."""
    with grpc.insecure_channel(service.address) as channel:
        yield pb_grpc.SignerServiceStub(channel)


# --- the table --------------------------------------------------------------------------------


def _disable_v1(ctx: Ctx) -> None:
    ctx.client.disable(ctx.name, 1)


def _destroy_v1(ctx: Ctx) -> None:
    ctx.client.rotate(ctx.name)
    ctx.client.schedule_destruction(ctx.name, 1)
    ctx.service.clock.advance(days=8)
    assert ctx.service.blocking(ctx.service.server.keyring.reap) == 1


def _original_is_intact(ctx: Ctx) -> None:
    """After a refused duplicate: still the first key, one version, same key pair, still signs."""
    key = ctx.client.get_key(ctx.name)
    assert (key.algorithm, key.primary_version, len(key.versions)) == ("ec-p256", 1, 1)
    kid = ctx.service.server.store.get_key(ctx.name).versions[0].key_id
    assert ctx.service.blocking(lambda: ctx.service.server.token.exists(kid))
    sig = ctx.client.sign(ctx.name, message=MESSAGE)
    pub = serialization.load_pem_public_key(ctx.client.public_key(ctx.name).pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig.signature, MESSAGE, ec.ECDSA(hashes.SHA256()))


def _no_key_named_missing(ctx: Ctx) -> None:
    with pytest.raises(NotFound):
        ctx.client.get_key(ctx.missing)


@dataclass(frozen=True)
class Row:
    call: Callable[[Ctx], object]
    error: type[SignerError]
    says: Callable[[Ctx], list[str]]  # fragments the message must contain
    prepare: Callable[[Ctx], None] | None = None  # runs before the "nothing changed" snapshot
    then: Callable[[Ctx], None] | None = None  # further checks after the refusal


def _invalid_name(bad: str) -> Row:
    return Row(
        call=lambda c: c.client.create_key(bad, "ec-p256"),
        error=InvalidArgument,
        says=lambda c: [f"name {bad!r} is invalid", "1-63 characters"],
        then=lambda c: _get_key_refuses_bad_name(c, bad),
    )


def _get_key_refuses_bad_name(ctx: Ctx, bad: str) -> None:
    with pytest.raises(InvalidArgument, match="is invalid"):
        ctx.client.get_key(bad)


ROWS: dict[str, Row] = {
    "unknown-key": Row(
        call=lambda c: c.client.sign(c.missing, message=MESSAGE),
        error=NotFound,
        says=lambda c: [f"key {c.missing!r} not found"],
    ),
    "unknown-version": Row(
        call=lambda c: c.client.sign(c.name, message=MESSAGE, version=7),
        error=NotFound,
        says=lambda c: [f"key {c.name!r} has no version 7"],
    ),
    "duplicate-name": Row(
        call=lambda c: c.client.create_key(c.name, "ec-p384"),
        error=AlreadyExists,
        says=lambda c: [f"key {c.name!r} already exists"],
        then=_original_is_intact,
    ),
    "unsupported-algorithm": Row(
        call=lambda c: c.client.create_key(c.missing, "ec-p999"),
        error=InvalidArgument,
        says=lambda c: ["algorithm 'ec-p999' is not supported", "ec-p256", "rsa-2048"],
        then=_no_key_named_missing,
    ),
    "invalid-name-bad-chars": _invalid_name("Bad Name!"),
    "invalid-name-empty": _invalid_name(""),
    "invalid-name-64-chars": _invalid_name("k" * 64),
    "wrong-digest-length": Row(
        call=lambda c: c.client.sign(c.name, digest=bytes(31)),
        error=InvalidArgument,
        says=lambda c: ["digest must be 32 bytes", "got 31"],
    ),
    "empty-message": Row(
        call=lambda c: c.client.sign(c.name, message=b""),
        error=InvalidArgument,
        says=lambda c: ["message is empty"],
    ),
    "disabled-version": Row(
        call=lambda c: c.client.sign(c.name, message=MESSAGE, version=1),
        error=FailedPrecondition,
        says=lambda c: [f"key {c.name!r} version 1 is disabled"],
        prepare=_disable_v1,
    ),
    "destroyed-version": Row(
        call=lambda c: c.client.sign(c.name, message=MESSAGE, version=1),
        error=FailedPrecondition,
        says=lambda c: [f"key {c.name!r} version 1 is destroyed"],
        prepare=_destroy_v1,
    ),
    "ed25519-through-p11-kit": Row(
        call=lambda c: c.client.create_key(c.missing, "ed25519"),
        error=FailedPrecondition,
        says=lambda c: ["algorithm ed25519 is not available", "p11-kit-client.so", "CKM_EDDSA"],
        then=_no_key_named_missing,
    ),
    "version-0-where-required": Row(
        call=lambda c: c.client.disable(c.name, 0),
        error=InvalidArgument,
        says=lambda c: ["version is required"],
    ),
    "empty-signature": Row(
        call=lambda c: c.client.verify(c.name, b"", message=MESSAGE),
        error=InvalidArgument,
        says=lambda c: ["signature is empty"],
    ),
}


@pytest.mark.parametrize("row", list(ROWS.values()), ids=list(ROWS))
def test_refused(ctx: Ctx, row: Row) -> None:
    if row.prepare is not None:
        row.prepare(ctx)
    refused(ctx, row.error, row.says(ctx), lambda: row.call(ctx))
    if row.then is not None:
        row.then(ctx)


# --- rows with their own set-up ---------------------------------------------------------------


def test_oversized_message_names_the_limit(
    service_factory: ServiceFactory, unique_name: UniqueName
) -> None:
    service = service_factory(server={"max_message_bytes": 1024})
    client = service.client()
    name = unique_name()
    client.create_key(name, "ec-p256")
    c = Ctx(service, client, name, "")

    at_limit = client.sign(name, message=b"m" * 1024)
    assert client.verify(name, at_limit.signature, message=b"m" * 1024)

    says = ["message is 1025 bytes", "the limit is 1024"]
    refused(c, InvalidArgument, says, lambda: client.sign(name, message=b"m" * 1025))
    refused(
        c,
        InvalidArgument,
        says,
        lambda: client.verify(name, at_limit.signature, message=b"m" * 1025),
    )


def test_neither_message_nor_digest(ctx: Ctx, stub: pb_grpc.SignerServiceStub) -> None:
    with pytest.raises(TypeError, match="exactly one of message= or digest="):
        ctx.client.sign(ctx.name)  # the typed client refuses before sending
    before = snapshot(ctx.client)
    for method, request in (
        (stub.Sign, pb.SignRequest(name=ctx.name)),
        (stub.Verify, pb.VerifyRequest(name=ctx.name, signature=b"\x30\x00")),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            method(request, timeout=10)
        assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details() == "one of message or digest is required"
    assert snapshot(ctx.client) == before


def test_token_unreachable_fails_fast_with_unavailable(
    service_factory: ServiceFactory, token_host: TokenHostHandle, unique_name: UniqueName
) -> None:
    # A key made through a reachable token, so that the metadata lookup succeeds and the call
    # really reaches the token; an unknown key would be (rightly) NOT_FOUND before that.
    good = service_factory()
    name = unique_name()
    good.client().create_key(name, "ec-p256")
    metadata = good.server.store.get_key(name)

    bad = service_factory(
        token=token_host.token_config(server_address="unix:path=/nonexistent/sock")
    )
    bad.server.store.create_key(metadata)
    client = bad.client(timeout=10)
    c = Ctx(bad, client, name, unique_name("missing"))

    started = time.monotonic()
    refused(c, Unavailable, ["token unavailable"], lambda: client.sign(name, message=b"x"))
    elapsed = time.monotonic() - started
    assert elapsed < 2, f"Sign took {elapsed:.2f} s to fail"  # (two ListKeys included)

    started = time.monotonic()
    refused(c, Unavailable, ["token unavailable"], lambda: client.create_key(c.missing, "ec-p256"))
    assert time.monotonic() - started < 2
    _no_key_named_missing(c)
    # The reachable service was not disturbed.
    assert good.client().sign(name, message=b"x").version == 1


# --- status codes over raw gRPC ---------------------------------------------------------------


@dataclass(frozen=True)
class RawRow:
    call: Callable[[Ctx, pb_grpc.SignerServiceStub], object]
    code: grpc.StatusCode
    prepare: Callable[[Ctx], None] | None = None


RAW_ROWS: dict[str, RawRow] = {
    "unknown-key": RawRow(
        lambda c, s: s.GetKey(pb.GetKeyRequest(name=c.missing), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    ),
    "unknown-version": RawRow(
        lambda c, s: s.Sign(pb.SignRequest(name=c.name, version=7, message=MESSAGE), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    ),
    "duplicate-name": RawRow(
        lambda c, s: s.CreateKey(pb.CreateKeyRequest(name=c.name, algorithm="ec-p256"), timeout=10),
        grpc.StatusCode.ALREADY_EXISTS,
    ),
    "disabled-version": RawRow(
        lambda c, s: s.Sign(pb.SignRequest(name=c.name, version=1, message=MESSAGE), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        prepare=_disable_v1,
    ),
    "destroyed-version": RawRow(
        lambda c, s: s.Sign(pb.SignRequest(name=c.name, version=1, message=MESSAGE), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        prepare=_destroy_v1,
    ),
    "ed25519-through-p11-kit": RawRow(
        lambda c, s: s.CreateKey(
            pb.CreateKeyRequest(name=c.missing, algorithm="ed25519"), timeout=10
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    "version-0-where-required": RawRow(
        lambda c, s: s.DisableKeyVersion(pb.KeyVersionRequest(name=c.name, version=0), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
}


@pytest.mark.parametrize("row", list(RAW_ROWS.values()), ids=list(RAW_ROWS))
def test_raw_grpc_status(ctx: Ctx, stub: pb_grpc.SignerServiceStub, row: RawRow) -> None:
    if row.prepare is not None:
        row.prepare(ctx)
    before = snapshot(ctx.client)
    with pytest.raises(grpc.RpcError) as exc:
        row.call(ctx, stub)
    assert exc.value.code() is row.code, (exc.value.code(), exc.value.details())
    assert exc.value.details()  # a message naming the problem, not a bare status
    assert snapshot(ctx.client) == before


# --- found while writing these ----------------------------------------------------------------


@pytest.mark.parametrize("seconds", [10**12, 2**64 - 1])
def test_absurd_waiting_period_is_invalid_argument_not_internal(ctx: Ctx, seconds: int) -> None:
    # now + timedelta(seconds=...) overflows datetime; the service must refuse the value
    # instead of crashing into INTERNAL ("internal error (see the service log)").
    ctx.client.rotate(ctx.name)
    refused(
        ctx,
        InvalidArgument,
        ["waiting_period_seconds"],
        lambda: ctx.client.schedule_destruction(ctx.name, 1, waiting_period_seconds=seconds),
    )
