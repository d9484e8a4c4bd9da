"""signer._internal.keyring's wrapped import over a software token: import tokens (bound to
their caller, used once, bounded in number, reaped), the checks before and after the unwrap,
and what a failure leaves behind. The wrapping format is tests/unit/test_wrapping.py's."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signer import wrapping
from signer._internal.config import Config, KeysConfig
from signer._internal.keyring import Keyring
from signer.errors import (
    AlreadyExists,
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
)
from tests.conftest import FakeClock
from tests.unit.fakes import (
    FailingStore,
    FakeToken,
    PrivateKey,
    spki,
    unwrap,
    wrapping_key,
    wrapping_pem,
)

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
def keyring(token: FakeImportToken, store: FailingStore, clock: FakeClock) -> Keyring:
    cfg = Config(keys=KeysConfig(import_token_lifetime_seconds=3600))
    return Keyring(cfg, token, store, clock)


def blob_for(keyring: Keyring, key: Any) -> tuple[str, bytes]:
    params = keyring.get_import_parameters(ME)
    pub = serialization.load_der_public_key(params.token.public_key_der)
    assert isinstance(pub, rsa.RSAPublicKey)
    pem_text = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return params.token.token, wrapping.wrap(wrapping.pkcs8_der(key), pem_text)


def test_get_import_parameters(
    keyring: Keyring, token: FakeImportToken, store: FailingStore, clock: FakeClock
) -> None:
    token.import_missing = {
        a: ["CKM_AES_KEY_WRAP_PAD"] for a in ("rsa-2048", "rsa-3072", "rsa-4096")
    }
    params = keyring.get_import_parameters(ME)
    assert params.wrapping_algorithm == "RSA-OAEP-SHA1"
    assert params.two_step_wrapping_algorithm == ""
    assert params.supported_algorithms == ["ec-p256", "ec-p384", "ec-p521", "ed25519"]
    record = params.token
    assert (record.created, record.expires) == (clock.now, clock.now + timedelta(hours=1))
    assert store.get_import_token(record.token) == record
    assert record.key_id in token.wrapping
    assert len(record.token) == 43
    token.two_step_mechanism = "CKM_AES_KEY_WRAP_PAD"
    other = keyring.get_import_parameters("uid:1001(bob)")
    assert other.two_step_wrapping_algorithm == wrapping.TWO_STEP
    assert other.token.token != record.token
    assert other.token.key_id != record.key_id


def test_import_creates_then_adds_primary_versions(
    keyring: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    t, blob = blob_for(keyring, first)
    key = keyring.import_key_version("k", "ec-p256", t, blob, "team", {"a": "b"}, caller=ME)
    assert (key.primary, key.scope, key.labels) == (1, "team", {"a": "b"})
    assert key.versions[0].public_key_der == spki(first)
    (wrapping_id, alg, key_id, label) = token.unwrapped[0]
    assert (alg, label, key.versions[0].key_id) == ("ec-p256", "k/v1", key_id)
    assert wrapping_id == store.get_import_token(t).key_id

    t2, blob2 = blob_for(keyring, second)  # an import token is used once
    assert t2 != t
    key = keyring.import_key_version("k", "", t2, blob2, caller=ME)
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
    keyring: Keyring,
    token: FakeImportToken,
    store: FailingStore,
    kwargs: dict[str, Any],
    fragment: str,
) -> None:
    t, blob = blob_for(keyring, ec.generate_private_key(ec.SECP256R1()))
    args: dict[str, Any] = {
        "name": "k",
        "alg_name": "ec-p256",
        "import_token": t,
        "wrapped_key": blob,
    }
    args.update(kwargs)
    with pytest.raises(InvalidArgument) as exc:
        keyring.import_key_version(**args, caller=ME)
    assert fragment in exc.value.message
    assert token.keys == {}
    with pytest.raises(NotFound):
        store.get_key("k")


def test_expired_import_token_is_failed_precondition_before_and_after_the_reaper(
    keyring: Keyring, token: FakeImportToken, store: FailingStore, clock: FakeClock
) -> None:
    t, blob = blob_for(keyring, ec.generate_private_key(ec.SECP256R1()))
    wrapping_id = store.get_import_token(t).key_id
    clock.advance(seconds=3599)
    assert keyring.reap() == 0
    assert wrapping_id in token.wrapping
    clock.advance(seconds=1)
    with pytest.raises(FailedPrecondition, match="import_token expired at 2026-01-01T01:00:00"):
        keyring.import_key_version("k", "ec-p256", t, blob, caller=ME)
    assert keyring.reap() == 0  # counts versions only
    assert wrapping_id not in token.wrapping
    assert store.get_import_token(t).destroyed
    with pytest.raises(FailedPrecondition, match="import_token expired"):
        keyring.import_key_version("k", "ec-p256", t, blob, caller=ME)
    assert token.unwrapped == []


def test_import_into_an_existing_key_must_agree_with_it(
    keyring: Keyring, store: FailingStore
) -> None:
    keyring.create_key("k", "ec-p256", "team", {"a": "b"})
    key = ec.generate_private_key(ec.SECP256R1())
    t, blob = blob_for(keyring, key)
    with pytest.raises(InvalidArgument, match="key 'k' is ec-p256; a version imported into it"):
        keyring.import_key_version("k", "ec-p384", t, blob, caller=ME)
    with pytest.raises(InvalidArgument, match="scope is fixed at creation"):
        keyring.import_key_version("k", "ec-p256", t, blob, "other", caller=ME)
    with pytest.raises(InvalidArgument, match="labels are fixed at creation"):
        keyring.import_key_version("k", "ec-p256", t, blob, "", {"a": "c"}, caller=ME)
    assert len(store.get_key("k").versions) == 1
    # The same scope and labels, or none, are fine.
    assert (
        keyring.import_key_version("k", "ec-p256", t, blob, "team", {"a": "b"}, caller=ME).primary
        == 2
    )


def test_module_without_the_mechanisms_is_failed_precondition(
    keyring: Keyring, token: FakeImportToken
) -> None:
    t, blob = blob_for(keyring, ec.generate_private_key(ec.SECP256R1()))
    token.import_missing = {"ec-p256": ["CKM_ECDSA"]}
    with pytest.raises(FailedPrecondition, match="importing ec-p256 keys is not available"):
        keyring.import_key_version("k", "ec-p256", t, blob, caller=ME)
    assert token.unwrapped == []


def test_an_rsa_key_with_another_exponent_is_refused_and_left_nowhere(
    keyring: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    """With p, q and d in hand, e + lambda(n) signs the same and has another public key: the
    same RSA key could be imported into two scopes. Only e = 65537 is imported (review)."""
    key = rsa.generate_private_key(public_exponent=3, key_size=2048)
    token.two_step_mechanism = "CKM_AES_KEY_WRAP_PAD"
    t, blob = blob_for(keyring, key)
    with pytest.raises(InvalidArgument, match="public exponent 65537"):
        keyring.import_key_version("k", "rsa-2048", t, blob, caller=ME)
    (_, _, key_id, _) = token.unwrapped[0]
    assert key_id in token.destroyed
    with pytest.raises(NotFound):
        store.get_key("k")


def test_store_failure_after_unwrap_destroys_the_new_object(
    keyring: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    t, blob = blob_for(keyring, ec.generate_private_key(ec.SECP256R1()))
    store.fail_create = RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        keyring.import_key_version("k", "ec-p256", t, blob, caller=ME)
    (_, _, key_id, _) = token.unwrapped[0]
    assert token.destroyed == [key_id]
    assert key_id not in token.keys


def test_store_failure_after_wrapping_key_generation_destroys_it(
    keyring: Keyring, token: FakeImportToken, store: FailingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(record: ImportToken) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "add_import_token", fail)
    with pytest.raises(RuntimeError):
        keyring.get_import_parameters(ME)
    assert token.wrapping == {}
    assert len(token.destroyed) == 1


# --- import tokens are bound, single-use and bounded (issue 11) --------------------------------


def test_another_callers_import_token_is_unknown_to_it(
    keyring: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    t, blob = blob_for(keyring, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(InvalidArgument, match="import_token is unknown"):
        keyring.import_key_version("theirs", "ec-p256", t, blob, "consumer", caller="uid:1001(bob)")
    assert token.unwrapped == []
    with pytest.raises(NotFound):
        store.get_key("theirs")
    # The owner still can: the refused replay did not use it up.
    assert keyring.import_key_version("mine", "ec-p256", t, blob, caller=ME).primary == 1


def test_an_import_token_is_used_once_and_its_wrapping_key_goes_at_once(
    keyring: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    t, blob = blob_for(keyring, first)
    wrapping_id = store.get_import_token(t).key_id
    keyring.import_key_version("k", "ec-p256", t, blob, caller=ME)
    assert wrapping_id not in token.wrapping  # destroyed right after the import
    record = store.get_import_token(t)
    assert (record.used, record.destroyed) == (True, True)
    again = wrapping.wrap(wrapping.pkcs8_der(second), wrapping_pem(wrapping_key()))
    with pytest.raises(FailedPrecondition, match="import_token was already used"):
        keyring.import_key_version("k2", "ec-p256", t, again, caller=ME)
    assert len(token.unwrapped) == 1


def test_a_key_pair_is_imported_once_whatever_the_name_or_scope(
    keyring: Keyring, token: FakeImportToken, store: FailingStore
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    t, blob = blob_for(keyring, key)
    keyring.import_key_version("ent-imported", "ec-p256", t, blob, "enterprise", caller=ME)
    t2, blob2 = blob_for(keyring, key)
    with pytest.raises(AlreadyExists, match="this key pair is already a key version"):
        keyring.import_key_version("copy", "ec-p256", t2, blob2, "consumer", caller=ME)
    (_, _, key_id, _) = token.unwrapped[1]
    assert key_id in token.destroyed  # the second unwrap is undone
    with pytest.raises(NotFound):
        store.get_key("copy")
    assert not store.get_import_token(t2).used  # a refused import does not use the token up


def test_the_decision_is_made_under_the_lock_on_the_key_as_it_is(
    keyring: Keyring, token: FakeImportToken
) -> None:
    t, blob = blob_for(keyring, ec.generate_private_key(ec.SECP256R1()))
    seen: list[Key | None] = []

    def authorise(existing: Key | None) -> None:
        seen.append(existing)
        raise PermissionDenied("alice may not import key 'k'")

    keyring.create_key("k", "ec-p256", "enterprise")
    with pytest.raises(PermissionDenied):
        keyring.import_key_version("k", "ec-p256", t, blob, caller=ME, authorise=authorise)
    assert [k.scope if k else None for k in seen] == ["enterprise"]
    assert token.unwrapped == []


def test_a_caller_gets_its_live_import_token_again(
    keyring: Keyring, token: FakeImportToken, clock: FakeClock
) -> None:
    first = keyring.get_import_parameters(ME).token
    for _ in range(10):
        assert keyring.get_import_parameters(ME).token == first
    assert len(token.wrapping) == 1
    clock.advance(seconds=1801)  # less than half of its hour left: a new one
    second = keyring.get_import_parameters(ME).token
    assert second != first
    assert keyring.get_import_parameters(ME).token == second
    assert len(token.wrapping) == 2


def test_live_import_tokens_are_bounded_across_callers(
    token: FakeImportToken, store: FailingStore, clock: FakeClock
) -> None:
    cfg = Config(keys=KeysConfig(import_token_lifetime_seconds=3600, max_live_import_tokens=3))
    keyring = Keyring(cfg, token, store, clock)
    for i in range(3):
        keyring.get_import_parameters(f"uid:{i}")
    with pytest.raises(ResourceExhausted, match=r"3 import tokens are live.*2026-01-01T01:00"):
        keyring.get_import_parameters("uid:9")
    assert len(token.wrapping) == 3
    keyring.get_import_parameters("uid:0")  # a caller's own live token is still given back
    clock.advance(seconds=3600)
    assert keyring.get_import_parameters("uid:9").token.caller == "uid:9"


def test_a_clock_set_back_does_not_revive_a_reaped_import_token(
    keyring: Keyring, token: FakeImportToken, store: FailingStore, clock: FakeClock
) -> None:
    """Issue 12, clock jumps: a jump forward expires an import token (and the reaper destroys
    its wrapping key); a jump back afterwards does not make it usable again, since a reaped
    token is expired whatever the time. (Between its expiry and the reaper's next pass, a jump
    back would: the wrapping key is still there then, and the token is still its caller's.)"""
    t, blob = blob_for(keyring, ec.generate_private_key(ec.SECP256R1()))
    clock.advance(days=30)
    keyring.reap()
    assert store.get_import_token(t).destroyed
    clock.advance(days=-60)
    with pytest.raises(FailedPrecondition, match="import_token expired"):
        keyring.import_key_version("k", "ec-p256", t, blob, caller=ME)
    assert token.unwrapped == []
