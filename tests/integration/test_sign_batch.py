"""SignBatch: many signatures in one call, each verified independently; per-item errors."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from signer._internal.keyring import BatchPlan
from signer.client import Signature, SignerClient
from signer.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from signer.keys import SignMechanism
from tests.conftest import RunningService, ServiceFactory, TokenHostHandle, UniqueName

pytestmark = pytest.mark.integration


def public(client: SignerClient, name: str) -> PublicKeyTypes:
    return serialization.load_pem_public_key(client.public_key(name).pem.encode())


@pytest.mark.parametrize("algorithm", ["ec-p256", "rsa-2048"])
def test_every_item_verifies(client: SignerClient, unique_name: UniqueName, algorithm: str) -> None:
    name = unique_name()
    client.create_key(name, algorithm)
    messages = [os.urandom(40) for _ in range(25)]
    results = client.sign_batch(name, messages=messages)
    key = public(client, name)
    assert len(results) == len(messages)
    for message, result in zip(messages, results, strict=True):
        assert isinstance(result, Signature)
        assert result.version == 1
        if algorithm.startswith("ec"):
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(result.signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(key, rsa.RSAPublicKey)
            key.verify(
                result.signature,
                message,
                padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                hashes.SHA256(),
            )


def test_a_bad_item_fails_alone(client: SignerClient, unique_name: UniqueName) -> None:
    name = unique_name()
    client.create_key(name, "ec-p256")
    good = hashlib.sha256(b"good").digest()
    results = client.sign_batch(name, digests=[good, b"short", good])
    assert isinstance(results[0], Signature)
    assert isinstance(results[2], Signature)
    assert isinstance(results[1], InvalidArgument)
    assert results[1].message.startswith("item 1: digest must be 32 bytes")


@pytest.mark.parametrize(
    ("count", "message"), [(0, "items is empty"), (1001, "1001 items; at most 1000")]
)
def test_batch_size_is_bounded(
    client: SignerClient, unique_name: UniqueName, count: int, message: str
) -> None:
    name = unique_name()
    client.create_key(name, "ec-p256")
    with pytest.raises(InvalidArgument, match=message):
        client.sign_batch(name, messages=[b"m"] * count)


def test_a_disabled_version_fails_the_whole_batch(
    client: SignerClient, unique_name: UniqueName
) -> None:
    name = unique_name()
    client.create_key(name, "ec-p256")
    client.rotate(name)
    client.disable(name, 1)
    with pytest.raises(FailedPrecondition, match="disabled"):
        client.sign_batch(name, messages=[b"a", b"b"], version=1)


def test_one_audit_record_and_one_authorisation(
    service_factory: ServiceFactory, unique_name: UniqueName, tmp_path: Path
) -> None:
    policy = tmp_path / "read-only.toml"
    policy.write_text(
        f'[[grant]]\ncallers = ["uid:{os.getuid()}"]\noperations = ["read"]\nscopes = ["*"]\n'
    )
    svc = service_factory()
    c = svc.client()
    name = unique_name()
    c.create_key(name, "ec-p256")
    messages = [b"one", b"two", b"three"]
    c.sign_batch(name, messages=messages)
    svc.stop()
    with sqlite3.connect(svc.server.cfg.audit.path) as db:
        rows = db.execute("SELECT operation, key, payload_sha256, status FROM records").fetchall()
    combined = b"".join(hashlib.sha256(m).digest() for m in messages)
    assert rows[-1] == ("SignBatch", name, hashlib.sha256(combined).hexdigest(), "OK")

    denied = service_factory(server={"policy_file": str(policy)})
    with pytest.raises(PermissionDenied, match=f"may not sign key '{name}'"):
        denied.client().sign_batch(name, messages=messages)


def test_a_long_batch_does_not_hold_up_single_signatures(
    service_factory: ServiceFactory,
    token_host: TokenHostHandle,
    unique_name: UniqueName,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch reaches the token in chunks, so a Sign that arrives meanwhile waits for one
    chunk, not for the whole batch. One lane, so the two must take turns: without chunks the
    Sign would finish after the batch's 1,000 signatures. The token's calls are watched (no
    sleep): the Sign is sent once the batch is signing, and is signed between two chunks."""
    svc = service_factory(token=token_host.token_config(lanes=1))
    name = unique_name()
    with svc.client() as c:
        c.create_key(name, "ec-p256")
    finished: dict[str, float] = {}
    signing = threading.Event()
    on_the_token: list[str] = []  # "chunk" for each chunk of the batch, "single" for the Sign
    token = svc.server.token
    sign_many, sign = token.sign_many, token.sign
    single = hashlib.sha256(b"meanwhile").digest()  # what the token signs for the Sign

    def watched_many(key_id: bytes, jobs: list[tuple[SignMechanism, bytes]]) -> list[bytes]:
        signing.set()
        out = sign_many(key_id, jobs)
        on_the_token.append("chunk")
        return out

    def watched_sign(key_id: bytes, mech: SignMechanism, data: bytes) -> bytes:
        out = sign(key_id, mech, data)
        if data == single:
            on_the_token.append("single")
        return out

    monkeypatch.setattr(token, "sign_many", watched_many)
    monkeypatch.setattr(token, "sign", watched_sign)

    def batch() -> None:
        with svc.client() as c:
            results = c.sign_batch(name, messages=[os.urandom(32) for _ in range(1000)])
        assert all(isinstance(r, Signature) for r in results)
        finished["batch"] = time.monotonic()

    worker = threading.Thread(target=batch)
    worker.start()
    assert signing.wait(30)  # the batch is on the lane, signing (its first chunk)
    with svc.client() as c:
        assert c.sign(name, message=b"meanwhile").version == 1
    finished["single"] = time.monotonic()
    worker.join(60)
    assert "batch" in finished
    assert finished["single"] < finished["batch"]
    # Signed while the batch still had chunks to sign: it waited for one chunk, not for all.
    assert "chunk" in on_the_token[on_the_token.index("single") :], on_the_token


def test_a_version_disabled_while_a_batch_runs_signs_no_more_of_it(
    service: RunningService, unique_name: UniqueName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: the state is read again before each chunk of 50. The batch is held after its
    first chunk (a hook in the token call, no sleep), the version disabled, the batch let go."""
    client = service.client()
    name = unique_name()
    client.create_key(name, "ec-p256")
    first_chunk, go_on = threading.Event(), threading.Event()
    original = service.server.token.sign_many

    def held(key_id: bytes, jobs: list[tuple[SignMechanism, bytes]]) -> list[bytes]:
        out = original(key_id, jobs)
        if not first_chunk.is_set():
            first_chunk.set()
            assert go_on.wait(30)
        return out

    monkeypatch.setattr(service.server.token, "sign_many", held)
    result: list[object] = []
    batch = threading.Thread(
        target=lambda: result.extend(
            client.sign_batch(name, messages=[b"m%d" % i for i in range(300)])
        )
    )
    batch.start()
    assert first_chunk.wait(30)
    client.disable(name, 1)
    go_on.set()
    batch.join(60)
    assert [isinstance(r, Signature) for r in result] == [True] * 50 + [False] * 250
    refused = result[50]
    assert isinstance(refused, FailedPrecondition)
    assert refused.message == f"item 50: key {name!r} version 1 is disabled (since the batch began)"


def test_a_version_disabled_after_the_plan_signs_not_even_the_first_chunk(
    service: RunningService, unique_name: UniqueName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 12: the plan and the first chunk run as two lane jobs, and the first
    chunk had stopped reading the state again, so a Disable that returned OK between them still
    let 50 items be signed. The batch is held right after its plan (a hook, no sleep)."""
    client = service.client()
    name = unique_name()
    client.create_key(name, "ec-p256")
    planned, go_on = threading.Event(), threading.Event()
    original = service.server.keyring.plan_batch

    def held(*args: Any, **kwargs: Any) -> BatchPlan:
        plan = original(*args, **kwargs)
        planned.set()
        assert go_on.wait(30)
        return plan

    monkeypatch.setattr(service.server.keyring, "plan_batch", held)
    result: list[object] = []
    batch = threading.Thread(
        target=lambda: result.extend(
            client.sign_batch(name, messages=[b"m%d" % i for i in range(120)])
        )
    )
    batch.start()
    assert planned.wait(30)
    client.disable(name, 1)
    go_on.set()
    batch.join(60)
    assert not any(isinstance(r, Signature) for r in result)
    assert len(result) == 120
