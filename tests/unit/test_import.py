"""Wrapped key import without a token: the wrapping format, the store's import tokens, the
service's rules over a software token, the CLI's forms, and the PIN-on-a-terminal dance."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from signer import wrapping
from signer._internal import hsm
from signer._internal.config import Config, KeysConfig, load
from signer._internal.keyring import Keyring
from signer._internal.token.pin import Pin
from signer.cli import _calls, _host
from signer.cli.main import EXIT_OK, build_parser, main
from signer.client import build_import_request
from signer.errors import (
    AlreadyExists,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from signer.keys import (
    ALGORITHMS,
    Algorithm,
    ImportToken,
    Key,
    State,
    algorithm_kind,
    load_public_key,
    public_key_kind,
    with_article,
)
from signer.v1 import signer_pb2 as pb
from tests.conftest import FakeClock
from tests.unit.fakes import FailingStore, FakeToken, PrivateKey

DAY = 24 * 3600


@functools.cache
def wrapping_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def wrapping_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def spki(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def unwrap(blob: bytes, key: rsa.RSAPrivateKey) -> bytes:
    """What the token does, in software: one OAEP block, or OAEP then RFC 5649."""
    k = key.key_size // 8
    if len(blob) == k:
        return key.decrypt(blob, wrapping.oaep_sha1())
    aes = key.decrypt(blob[:k], wrapping.oaep_sha1())
    assert len(aes) == wrapping.AES_KEY_BYTES
    return aes_key_unwrap_with_padding(aes, blob[k:])


# --- the wrapping format ------------------------------------------------------------------------


def test_one_block_holds_470_bytes_under_rsa_4096() -> None:
    assert wrapping.one_step_capacity(512) == 470
    assert wrapping.one_step_capacity(256) == 214


@pytest.mark.parametrize(
    ("make", "scheme"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), wrapping.ONE_STEP),  # 138 bytes
        (lambda: ec.generate_private_key(ec.SECP384R1()), wrapping.ONE_STEP),  # 185 bytes
        (lambda: ec.generate_private_key(ec.SECP521R1()), wrapping.TWO_STEP),  # 241 > 214
        (lambda: ed25519.Ed25519PrivateKey.generate(), wrapping.ONE_STEP),
        (lambda: wrapping_key(2048), wrapping.TWO_STEP),
    ],
)
def test_wrap_round_trips_in_the_scheme_that_fits(make: Any, scheme: str) -> None:
    key = make()
    der = wrapping.pkcs8_der(key)
    wk = wrapping_key()
    assert wrapping.scheme_for(len(der), wrapping_pem(wk)) == scheme
    blob = wrapping.wrap(der, wrapping_pem(wk))
    assert (len(blob) == 256) == (scheme == wrapping.ONE_STEP)
    assert unwrap(blob, wk) == der
    assert der not in blob
    # Randomised: wrapping twice gives two different blobs.
    assert wrapping.wrap(der, wrapping_pem(wk)) != blob


def test_private_keys_that_cannot_be_imported() -> None:
    with pytest.raises(InvalidArgument, match="not a PEM private key"):
        wrapping.load_private_key_pem(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(InvalidArgument, match="missing or wrong password") as exc:
        wrapping.load_private_key_pem(encrypted)
    assert "secret" not in str(exc.value)
    assert isinstance(
        wrapping.load_private_key_pem(encrypted, b"secret"), ec.EllipticCurvePrivateKey
    )
    with pytest.raises(InvalidArgument, match="X25519PrivateKey keys cannot be imported"):
        wrapping.load_private_key_pem(pem(x25519.X25519PrivateKey.generate()))
    with pytest.raises(InvalidArgument, match="not an RSA key"):
        wrapping.load_wrapping_key(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


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


# --- key naming ---------------------------------------------------------------------------------


def test_kinds_and_articles() -> None:
    assert [algorithm_kind(a) for a in ALGORITHMS.values()] == [
        "P-256",
        "P-384",
        "P-521",
        "RSA-2048",
        "RSA-3072",
        "RSA-4096",
        "Ed25519",
    ]
    p384 = load_public_key(spki(ec.generate_private_key(ec.SECP384R1())))
    assert public_key_kind(p384) == "P-384"
    assert public_key_kind(load_public_key(spki(wrapping_key()))) == "RSA-2048"
    assert public_key_kind(load_public_key(spki(ed25519.Ed25519PrivateKey.generate()))) == (
        "Ed25519"
    )
    assert [with_article(k) for k in ("P-384", "RSA-2048", "Ed25519")] == [
        "a P-384",
        "an RSA-2048",
        "an Ed25519",
    ]


# --- config -------------------------------------------------------------------------------------


def test_import_token_lifetime_setting(tmp_path: Path) -> None:
    assert load(env={}).keys.import_token_lifetime_seconds == DAY
    assert KeysConfig().import_token_lifetime_seconds == DAY
    path = tmp_path / "c.toml"
    path.write_text("[keys]\nimport_token_lifetime_seconds = 3600\n")
    assert load(path, env={}).keys.import_token_lifetime_seconds == 3600
    assert load(env={"SIGNER_KEYS_IMPORT_TOKEN_LIFETIME_SECONDS": "60"}).keys == replace(
        KeysConfig(), import_token_lifetime_seconds=60
    )
    with pytest.raises(ConfigError, match="import_token_lifetime_seconds must be positive"):
        load(env={"SIGNER_KEYS_IMPORT_TOKEN_LIFETIME_SECONDS": "0"})


# --- the store ----------------------------------------------------------------------------------


def test_store_keeps_import_tokens(tmp_path: Path) -> None:
    clock = FakeClock()
    s = FailingStore(tmp_path / "s.db")
    try:
        a = ImportToken("a" * 43, b"\x01" * 16, b"spki-a", clock.now, clock.now + timedelta(days=1))
        b = ImportToken("b" * 43, b"\x02" * 16, b"spki-b", clock.now, clock.now + timedelta(days=2))
        s.add_import_token(a)
        s.add_import_token(b)
        assert s.get_import_token(a.token) == a
        with pytest.raises(NotFound, match="import token not found"):
            s.get_import_token("c" * 43)
        assert s.spent_import_tokens(clock.now) == []
        assert s.spent_import_tokens(a.expires) == [a]
        assert s.spent_import_tokens(b.expires) == [a, b]
        assert s.live_import_tokens(clock.now) == [a, b]
        assert s.live_import_tokens(a.expires) == [b]
        s.set_import_token_destroyed(a.token)
        assert s.get_import_token(a.token) == replace(a, destroyed=True)
        assert s.spent_import_tokens(b.expires) == [b]
        with pytest.raises(NotFound):
            s.set_import_token_destroyed("c" * 43)
        assert a.expired(a.expires)
        assert not b.expired(a.expires)
        assert replace(b, destroyed=True).expired(clock.now)
    finally:
        s.close()


# --- the service over a software token ----------------------------------------------------------


ME = "uid:1000(alice)"


class FakeImportToken(FakeToken):
    """FakeToken plus a software wrapping key and unwrap (what the real token does, in Python);
    adoption and relabelling are FakeToken's."""

    def __init__(self) -> None:
        super().__init__()
        self.wrapping: dict[bytes, rsa.RSAPrivateKey] = {}
        self.import_missing: dict[str, list[str]] = {}
        self.two_step_mechanism: str | None = None
        self.unwrapped: list[tuple[bytes, str, bytes, str]] = []

    def require_wrapping(self) -> None:
        self.missing_mechanisms(ALGORITHMS["ec-p256"])  # Unavailable when unavailable

    def missing_import_mechanisms(self, alg: Algorithm) -> list[str]:
        self.missing_mechanisms(alg)
        return list(self.import_missing.get(alg.name, []))

    def require_import(self, alg: Algorithm) -> None:
        missing = self.missing_import_mechanisms(alg)
        if missing:
            raise FailedPrecondition(f"importing {alg.name} keys is not available: {missing}")

    def generate_wrapping_key(self, key_id: bytes, label: str) -> bytes:
        self.wrapping[key_id] = wrapping_key()
        return spki(self.wrapping[key_id])

    def unwrap_private(
        self,
        wrapping_key_id: bytes,
        blob: bytes,
        alg: Algorithm,
        key_id: bytes,
        label: str,
        public_der: bytes | None,
    ) -> bytes:
        wk = self.wrapping.get(wrapping_key_id)
        if wk is None:
            raise FailedPrecondition("the import token's wrapping key is no longer in the token")
        try:
            key = serialization.load_der_private_key(unwrap(blob, wk), None)
        except ValueError:
            raise InvalidArgument("the token could not unwrap wrapped_key") from None
        if algorithm_kind(alg) != public_key_kind(load_public_key(spki(key))):
            raise InvalidArgument(f"wrapped key is not {alg.name}")
        assert isinstance(key, PrivateKey)  # its kind was checked just above
        self.keys[key_id] = key
        self.unwrapped.append((wrapping_key_id, alg.name, key_id, label))
        return spki(key)

    def destroy(self, key_id: bytes) -> int:
        n = super().destroy(key_id)
        return n + (2 if self.wrapping.pop(key_id, None) is not None else 0)


@pytest.fixture
def token() -> FakeImportToken:
    return FakeImportToken()


@pytest.fixture
def signer(token: FakeImportToken, store: FailingStore, clock: FakeClock) -> Keyring:
    cfg = Config(keys=KeysConfig(import_token_lifetime_seconds=3600))
    return Keyring(cfg, token, store, clock)


def blob_for(signer: Keyring, key: Any) -> tuple[str, bytes]:
    params = signer.get_import_parameters(ME)
    pub = serialization.load_der_public_key(params.token.public_key_der)
    assert isinstance(pub, rsa.RSAPublicKey)
    pem_text = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return params.token.token, wrapping.wrap(wrapping.pkcs8_der(key), pem_text)


def test_get_import_parameters(
    signer: Keyring, token: FakeImportToken, store: FailingStore, clock: FakeClock
) -> None:
    token.import_missing = {
        a: ["CKM_AES_KEY_WRAP_PAD"] for a in ("rsa-2048", "rsa-3072", "rsa-4096")
    }
    params = signer.get_import_parameters(ME)
    assert params.wrapping_algorithm == "RSA-OAEP-SHA1"
    assert params.two_step_wrapping_algorithm == ""
    assert params.supported_algorithms == ["ec-p256", "ec-p384", "ec-p521", "ed25519"]
    record = params.token
    assert (record.created, record.expires) == (clock.now, clock.now + timedelta(hours=1))
    assert store.get_import_token(record.token) == record
    assert record.key_id in token.wrapping
    assert len(record.token) == 43
    token.two_step_mechanism = "CKM_AES_KEY_WRAP_PAD"
    other = signer.get_import_parameters("uid:1001(bob)")
    assert other.two_step_wrapping_algorithm == wrapping.TWO_STEP
    assert other.token.token != record.token
    assert other.token.key_id != record.key_id


def test_import_creates_then_adds_primary_versions(
    signer: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    t, blob = blob_for(signer, first)
    key = signer.import_key_version("k", "ec-p256", t, blob, "team", {"a": "b"}, caller=ME)
    assert (key.primary, key.scope, key.labels) == (1, "team", {"a": "b"})
    assert key.versions[0].public_key_der == spki(first)
    (wrapping_id, alg, key_id, label) = token.unwrapped[0]
    assert (alg, label, key.versions[0].key_id) == ("ec-p256", "k/v1", key_id)
    assert wrapping_id == store.get_import_token(t).key_id

    t2, blob2 = blob_for(signer, second)  # an import token is used once
    assert t2 != t
    key = signer.import_key_version("k", "", t2, blob2, caller=ME)
    assert key.primary == 2
    assert [v.state for v in key.versions] == [State.ENABLED, State.ENABLED]
    assert token.unwrapped[1][3] == "k/v2"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "Bad"}, "name 'Bad' is invalid"),
        ({"alg_name": "dsa"}, "algorithm 'dsa' is not supported"),
        ({"alg_name": ""}, "algorithm is required: key 'k' does not exist yet"),
        ({"import_token": ""}, "import_token is missing or malformed"),
        ({"import_token": "x" * 200}, "import_token is missing or malformed"),
        ({"import_token": "u" * 43}, "import_token is unknown"),
        ({"wrapped_key": b""}, "wrapped_key is empty"),
        ({"wrapped_key": bytes(16 * 1024 + 1)}, "wrapped_key is 16385 bytes; the limit is 16384"),
        ({"wrapped_key": bytes(256)}, "the token could not unwrap"),
        ({"public_key_der": b"junk"}, "public_key_der is not a DER SubjectPublicKeyInfo"),
        ({"scope": "Bad Scope"}, "scope 'Bad Scope' is invalid"),
    ],
)
def test_import_validation_changes_nothing(
    signer: Keyring,
    token: FakeImportToken,
    store: FailingStore,
    kwargs: dict[str, Any],
    fragment: str,
) -> None:
    t, blob = blob_for(signer, ec.generate_private_key(ec.SECP256R1()))
    args: dict[str, Any] = {
        "name": "k",
        "alg_name": "ec-p256",
        "import_token": t,
        "wrapped_key": blob,
    }
    args.update(kwargs)
    with pytest.raises(InvalidArgument) as exc:
        signer.import_key_version(**args, caller=ME)
    assert fragment in exc.value.message
    assert token.keys == {}
    with pytest.raises(NotFound):
        store.get_key("k")


def test_expired_import_token_is_failed_precondition_before_and_after_the_reaper(
    signer: Keyring, token: FakeImportToken, store: FailingStore, clock: FakeClock
) -> None:
    t, blob = blob_for(signer, ec.generate_private_key(ec.SECP256R1()))
    wrapping_id = store.get_import_token(t).key_id
    clock.advance(seconds=3599)
    assert signer.reap() == 0
    assert wrapping_id in token.wrapping
    clock.advance(seconds=1)
    with pytest.raises(FailedPrecondition, match="import_token expired at 2026-01-01T01:00:00"):
        signer.import_key_version("k", "ec-p256", t, blob, caller=ME)
    assert signer.reap() == 0  # counts versions only
    assert wrapping_id not in token.wrapping
    assert store.get_import_token(t).destroyed
    with pytest.raises(FailedPrecondition, match="import_token expired"):
        signer.import_key_version("k", "ec-p256", t, blob, caller=ME)
    assert token.unwrapped == []


def test_import_into_an_existing_key_must_agree_with_it(
    signer: Keyring, store: FailingStore
) -> None:
    signer.create_key("k", "ec-p256", "team", {"a": "b"})
    key = ec.generate_private_key(ec.SECP256R1())
    t, blob = blob_for(signer, key)
    with pytest.raises(InvalidArgument, match="key 'k' is ec-p256; a version imported into it"):
        signer.import_key_version("k", "ec-p384", t, blob, caller=ME)
    with pytest.raises(InvalidArgument, match="scope is fixed at creation"):
        signer.import_key_version("k", "ec-p256", t, blob, "other", caller=ME)
    with pytest.raises(InvalidArgument, match="labels are fixed at creation"):
        signer.import_key_version("k", "ec-p256", t, blob, "", {"a": "c"}, caller=ME)
    assert len(store.get_key("k").versions) == 1
    # The same scope and labels, or none, are fine.
    assert (
        signer.import_key_version("k", "ec-p256", t, blob, "team", {"a": "b"}, caller=ME).primary
        == 2
    )


def test_module_without_the_mechanisms_is_failed_precondition(
    signer: Keyring, token: FakeImportToken
) -> None:
    t, blob = blob_for(signer, ec.generate_private_key(ec.SECP256R1()))
    token.import_missing = {"ec-p256": ["CKM_ECDSA"]}
    with pytest.raises(FailedPrecondition, match="importing ec-p256 keys is not available"):
        signer.import_key_version("k", "ec-p256", t, blob, caller=ME)
    assert token.unwrapped == []


def test_an_rsa_key_with_another_exponent_is_refused_and_left_nowhere(
    signer: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    """With p, q and d in hand, e + lambda(n) signs the same and has another public key: the
    same RSA key could be imported into two scopes. Only e = 65537 is imported (review)."""
    key = rsa.generate_private_key(public_exponent=3, key_size=2048)
    token.two_step_mechanism = "CKM_AES_KEY_WRAP_PAD"
    t, blob = blob_for(signer, key)
    with pytest.raises(InvalidArgument, match="public exponent 65537"):
        signer.import_key_version("k", "rsa-2048", t, blob, caller=ME)
    (_, _, key_id, _) = token.unwrapped[0]
    assert key_id in token.destroyed
    with pytest.raises(NotFound):
        store.get_key("k")


def test_store_failure_after_unwrap_destroys_the_new_object(
    signer: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    t, blob = blob_for(signer, ec.generate_private_key(ec.SECP256R1()))
    store.fail_create = RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        signer.import_key_version("k", "ec-p256", t, blob, caller=ME)
    (_, _, key_id, _) = token.unwrapped[0]
    assert token.destroyed == [key_id]
    assert key_id not in token.keys


def test_store_failure_after_wrapping_key_generation_destroys_it(
    signer: Keyring, token: FakeImportToken, store: FailingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(record: ImportToken) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "add_import_token", fail)
    with pytest.raises(RuntimeError):
        signer.get_import_parameters(ME)
    assert token.wrapping == {}
    assert len(token.destroyed) == 1


# --- import tokens are bound, single-use and bounded (issue 11) --------------------------------


def test_another_callers_import_token_is_unknown_to_it(
    signer: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    t, blob = blob_for(signer, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(InvalidArgument, match="import_token is unknown"):
        signer.import_key_version("theirs", "ec-p256", t, blob, "consumer", caller="uid:1001(bob)")
    assert token.unwrapped == []
    with pytest.raises(NotFound):
        store.get_key("theirs")
    # The owner still can: the refused replay did not use it up.
    assert signer.import_key_version("mine", "ec-p256", t, blob, caller=ME).primary == 1


def test_an_import_token_is_used_once_and_its_wrapping_key_goes_at_once(
    signer: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    t, blob = blob_for(signer, first)
    wrapping_id = store.get_import_token(t).key_id
    signer.import_key_version("k", "ec-p256", t, blob, caller=ME)
    assert wrapping_id not in token.wrapping  # destroyed right after the import
    record = store.get_import_token(t)
    assert (record.used, record.destroyed) == (True, True)
    again = wrapping.wrap(wrapping.pkcs8_der(second), wrapping_pem(wrapping_key()))
    with pytest.raises(FailedPrecondition, match="import_token was already used"):
        signer.import_key_version("k2", "ec-p256", t, again, caller=ME)
    assert len(token.unwrapped) == 1


def test_a_key_pair_is_imported_once_whatever_the_name_or_scope(
    signer: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    t, blob = blob_for(signer, key)
    signer.import_key_version("ent-imported", "ec-p256", t, blob, "enterprise", caller=ME)
    t2, blob2 = blob_for(signer, key)
    with pytest.raises(AlreadyExists, match="this key pair is already a key version"):
        signer.import_key_version("copy", "ec-p256", t2, blob2, "consumer", caller=ME)
    (_, _, key_id, _) = token.unwrapped[1]
    assert key_id in token.destroyed  # the second unwrap is undone
    with pytest.raises(NotFound):
        store.get_key("copy")
    assert not store.get_import_token(t2).used  # a refused import does not use the token up


def test_the_decision_is_made_under_the_lock_on_the_key_as_it_is(
    signer: Keyring, token: FakeImportToken
) -> None:
    t, blob = blob_for(signer, ec.generate_private_key(ec.SECP256R1()))
    seen: list[Key | None] = []

    def authorise(existing: Key | None) -> None:
        seen.append(existing)
        raise PermissionDenied("alice may not import key 'k'")

    signer.create_key("k", "ec-p256", "enterprise")
    with pytest.raises(PermissionDenied):
        signer.import_key_version("k", "ec-p256", t, blob, caller=ME, authorise=authorise)
    assert [k.scope if k else None for k in seen] == ["enterprise"]
    assert token.unwrapped == []


def test_a_caller_gets_its_live_import_token_again(
    signer: Keyring, token: FakeImportToken, clock: FakeClock
) -> None:
    first = signer.get_import_parameters(ME).token
    for _ in range(10):
        assert signer.get_import_parameters(ME).token == first
    assert len(token.wrapping) == 1
    clock.advance(seconds=1801)  # less than half of its hour left: a new one
    second = signer.get_import_parameters(ME).token
    assert second != first
    assert signer.get_import_parameters(ME).token == second
    assert len(token.wrapping) == 2


def test_live_import_tokens_are_bounded_across_callers(
    token: FakeImportToken, store: FailingStore, clock: FakeClock
) -> None:
    cfg = Config(keys=KeysConfig(import_token_lifetime_seconds=3600, max_live_import_tokens=3))
    signer = Keyring(cfg, token, store, clock)
    for i in range(3):
        signer.get_import_parameters(f"uid:{i}")
    with pytest.raises(ResourceExhausted, match=r"3 import tokens are live.*2026-01-01T01:00"):
        signer.get_import_parameters("uid:9")
    assert len(token.wrapping) == 3
    signer.get_import_parameters("uid:0")  # a caller's own live token is still given back
    clock.advance(seconds=3600)
    assert signer.get_import_parameters("uid:9").token.caller == "uid:9"


def test_key_locks_do_not_outlive_their_use(signer: Keyring) -> None:
    for i in range(1000):
        with pytest.raises(NotFound):
            signer.rotate(f"no-such-key-{i}")
    signer.create_key("k", "ec-p256")
    assert len(signer._locks) == 0


def test_adopt_key(signer: Keyring, token: FakeImportToken, store: FailingStore) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    token.keys[b"\x0a\x0b"] = key
    adopted = signer.adopt_key("admin", "ec-p384", b"\x0a\x0b", "ops")
    assert (adopted.primary, adopted.scope, adopted.versions[0].key_id) == (1, "ops", b"\x0a\x0b")
    assert adopted.versions[0].public_key_der == spki(key)
    assert store.get_key("admin") == adopted
    assert token.labels == {b"\x0a\x0b": "admin/v1"}
    with pytest.raises(AlreadyExists, match="key 'admin' already exists"):
        signer.adopt_key("admin", "ec-p384", b"\x0a\x0b")
    # An object another version already stands for is not adopted twice, nor relabelled.
    with pytest.raises(AlreadyExists, match="another key version already has this token object"):
        signer.adopt_key("again", "ec-p384", b"\x0a\x0b")
    assert token.labels == {b"\x0a\x0b": "admin/v1"}
    with pytest.raises(NotFound):
        signer.adopt_key("other", "ec-p384", b"\x0c")
    with pytest.raises(InvalidArgument, match="key_id must be 1 to 64 bytes, got 0"):
        signer.adopt_key("other", "ec-p384", b"")
    assert b"\x0a\x0b" not in token.destroyed


# --- the command line ---------------------------------------------------------------------------


def parse(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


def test_cli_forms() -> None:
    a = parse(
        "keys",
        "import",
        "k",
        "--algorithm",
        "ec-p256",
        "--in",
        "key.pem",
        "--scope",
        "s",
        "--label",
        "a=b",
    )
    assert (a.func, a.name, a.algorithm, a.infile, a.scope, a.label) == (
        _calls.cmd_keys_import,
        "k",
        "ec-p256",
        "key.pem",
        "s",
        [("a", "b")],
    )
    a = parse("keys", "adopt", "k", "--algorithm", "rsa-2048", "--id", "0A0b", "--config", "c.toml")
    assert (a.func, a.id, a.config, a.scope) == (_host.cmd_keys_adopt, b"\x0a\x0b", "c.toml", "")
    a = parse("hsm", "import-key", "--dir", "d", "--in", "k.pem", "--label", "l", "--id", "ff")
    assert (a.func, a.dir, a.infile, a.label, a.id, a.token) == (
        _host.cmd_hsm_import_key,
        "d",
        "k.pem",
        "l",
        b"\xff",
        "signer",
    )


@pytest.mark.parametrize("bad", ["xyz", "", "0", "00" * 65])
def test_cli_refuses_a_bad_id(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse("hsm", "import-key", "--in", "k.pem", "--label", "l", "--id", bad)
    assert exc.value.code == 2
    assert "must be 1 to 64 bytes in hex" in capsys.readouterr().err


def test_keys_import_reads_the_pem_and_calls_import_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[Any, ...]] = []

    class Client:
        def __init__(self, address: str, tls: object = None) -> None:
            self.address = address

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def import_key(self, *args: Any, **kwargs: Any) -> pb.Key:
            calls.append((self.address, args, kwargs))
            return pb.Key(name="k", algorithm="ec-p256", primary_version=1)

    monkeypatch.setattr(_calls, "SignerClient", Client)
    (tmp_path / "key.pem").write_bytes(b"PEM BYTES")
    rc = main(
        [
            "keys",
            "import",
            "k",
            "--algorithm",
            "ec-p256",
            "--in",
            str(tmp_path / "key.pem"),
            "--address",
            "h:1",
        ]
    )
    assert rc == EXIT_OK
    assert calls == [("h:1", ("k", "ec-p256", b"PEM BYTES"), {"scope": "", "labels": {}})]
    assert '"primary_version": 1' in capsys.readouterr().out


# --- the token host's provisioning, with a stand-in tool ----------------------------------------

FAKE_TOOL = """
import sys, termios
out = sys.argv[1]
answers = []
for prompt in ("Please enter user PIN: ", "Please reenter user PIN: "):
    sys.stdout.write(prompt)
    sys.stdout.flush()
    answers.append(sys.stdin.readline().rstrip("\\n"))
echo = bool(termios.tcgetattr(0)[3] & termios.ECHO)
with open(out, "w") as fh:
    fh.write(repr((answers, echo, sys.stdin.isatty())))
print("ERROR: pretend failure" if answers[0] != answers[1] else "done")
sys.exit(0 if answers[0] == answers[1] else 3)
"""


def test_pin_goes_to_the_terminal_prompts_only(tmp_path: Path) -> None:
    pin_file = tmp_path / "user.pin"
    pin_file.write_bytes(b"pin-on-a-terminal-1234\n")
    os.chmod(pin_file, 0o600)
    out = tmp_path / "out"
    argv = [sys.executable, "-c", FAKE_TOOL, str(out)]
    status, errors = hsm._run_on_terminal(argv, {"PATH": "/usr/bin:/bin"}, Pin(pin_file), 30)
    assert (status, errors) == (0, "")
    # Both prompts got the PIN, typed with echo off, on a terminal.
    assert out.read_text() == repr((["pin-on-a-terminal-1234"] * 2, False, True))


def test_import_command_has_no_pin() -> None:
    argv = hsm.import_command(Path("/d/key.p8"), "label", b"\x01\x02", "signer")
    assert argv == [
        "softhsm2-util",
        "--import",
        "/d/key.p8",
        "--token",
        "signer",
        "--label",
        "label",
        "--id",
        "0102",
    ]


def test_provision_key_validates_before_running_anything(tmp_path: Path) -> None:
    root = tmp_path / "hsm"
    (root / "tokens" / "t").mkdir(parents=True)
    (root / "softhsm2.conf").write_text("")
    (root / "user.pin").write_text("1234")
    key = pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(InvalidArgument, match="label must be"):
        hsm.provision_key(root, key, "", b"\x01")
    with pytest.raises(InvalidArgument, match="label must be"):
        hsm.provision_key(root, key, "two\nlines", b"\x01")
    with pytest.raises(InvalidArgument, match="key id must be 1 to 64 bytes"):
        hsm.provision_key(root, key, "l", b"")
    with pytest.raises(InvalidArgument, match="not a PEM private key"):
        hsm.provision_key(root, b"nope", "l", b"\x01")
    assert sorted(p.name for p in root.iterdir()) == ["softhsm2.conf", "tokens", "user.pin"]


def test_a_clock_set_back_does_not_revive_a_reaped_import_token(
    signer: Keyring, token: FakeImportToken, store: FailingStore, clock: FakeClock
) -> None:
    """Issue 12, clock jumps: a jump forward expires an import token (and the reaper destroys
    its wrapping key); a jump back afterwards does not make it usable again, since a reaped
    token is expired whatever the time. (Between its expiry and the reaper's next pass, a jump
    back would: the wrapping key is still there then, and the token is still its caller's.)"""
    t, blob = blob_for(signer, ec.generate_private_key(ec.SECP256R1()))
    clock.advance(days=30)
    signer.reap()
    assert store.get_import_token(t).destroyed
    clock.advance(days=-60)
    with pytest.raises(FailedPrecondition, match="import_token expired"):
        signer.import_key_version("k", "ec-p256", t, blob, caller=ME)
    assert token.unwrapped == []
