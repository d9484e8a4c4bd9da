"""Rotation of keys in an issuer's scope (issue 17): the new version is published a lead time
before it becomes primary, and the version it replaces stays published for a grace period
after. Verifiers (PyJWKClient, Node's jose) cache a JWKS for minutes and ignore Cache-Control:
without the lead they reject the new version's tokens, without the grace the old one's. Over a
FakeToken, a real SQLiteStore and a FakeClock; keys of other scopes rotate as before."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from signer import jose
from signer._internal.config import Config, JwtConfig
from signer._internal.keyring import Keyring
from signer.errors import FailedPrecondition, TokenRejected
from signer.keys import Padding, SigFormat, SignMechanism
from tests.conftest import FakeClock
from tests.unit.fakes import FailingStore, FakeToken

LEAD = 3600.0
GRACE = 7200.0
ISSUER = "https://issuer.example/iss"
AUDIENCE = "relying-party"
SECOND = timedelta(seconds=1)


@pytest.fixture
def token() -> FakeToken:
    return FakeToken()


@pytest.fixture
def cfg() -> Config:
    return Config(
        jwt=JwtConfig(
            issuers=f"iss={ISSUER}", rotation_lead_seconds=LEAD, retired_grace_seconds=GRACE
        )
    )


@pytest.fixture
def keyring(cfg: Config, token: FakeToken, store: FailingStore, clock: FakeClock) -> Keyring:
    return Keyring(cfg, token, store, clock)


def kids(keyring: Keyring, scope: str = "iss") -> list[str]:
    return [k["kid"] for k in keyring.jwks(scope)["keys"]]


@pytest.fixture
def clock() -> FakeClock:
    # From the wall clock: verifiers check exp against time.time(), and the service holds an
    # issuer's tokens to exp <= its clock + jwt.max_token_lifetime_seconds.
    return FakeClock(datetime.now(UTC))


def claims(iss: str | None = ISSUER) -> bytes:
    body = {"aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + 600}
    return json.dumps(body | ({"iss": iss} if iss else {})).encode()


def signed_kid(keyring: Keyring, name: str = "api") -> str:
    """The kid of a JWT the key signs now, checked to say the version that signed it, and the
    token checked against the JWKS as a verifier fetching it now sees it."""
    result = keyring.sign_jwt(name, claims())
    kid = jwt.get_unverified_header(result.token)["kid"]
    assert kid == result.kid == f"{name}/{result.version}"
    jose.verify_jwt(result.token, keyring.jwks("iss"), "iss", ISSUER, AUDIENCE)
    return str(kid)


def at(clock: FakeClock, start: datetime, seconds: float) -> None:
    clock.now = start + timedelta(seconds=seconds)


def test_rotation_publishes_the_next_version_and_the_old_one_keeps_signing(
    keyring: Keyring, token: FakeToken, store: FailingStore, clock: FakeClock
) -> None:
    keyring.create_key("api", "ec-p256", "iss")
    t0 = clock.now
    key = keyring.rotate("api")
    assert (key.primary, key.next_primary, key.next_primary_at) == (
        1,
        2,
        t0 + timedelta(seconds=LEAD),
    )
    assert [v.version for v in key.versions] == [1, 2]
    # Published at once, so that verifiers have it before it signs anything.
    assert kids(keyring) == ["api/1", "api/2"]
    # Version 1 still signs: the JWT's kid, the token object, GetPublicKey's version 0.
    assert signed_kid(keyring) == "api/1"
    v1, v2 = key.versions
    assert token.signed[-1][:2] == (v1.key_id, SignMechanism.ECDSA)
    assert keyring.public_key("api", 0)[0].version == 1
    # Version 1 is retired when version 2 becomes primary, not now.
    stored = store.get_key("api")
    assert [v.retired_at for v in stored.versions] == [t0 + timedelta(seconds=LEAD), None]
    assert v2.retired_at is None


def test_the_next_version_becomes_primary_at_the_lead_time_without_a_write(
    keyring: Keyring, token: FakeToken, store: FailingStore, clock: FakeClock
) -> None:
    keyring.create_key("api", "ec-p256", "iss")
    t0 = clock.now
    v2 = keyring.rotate("api").versions[1]
    at(clock, t0, LEAD - 1)
    assert signed_kid(keyring) == "api/1"
    assert keyring.get_key("api").primary == 1
    at(clock, t0, LEAD)
    assert signed_kid(keyring) == "api/2"
    assert token.signed[-1][0] == v2.key_id
    assert keyring.public_key("api", 0)[0].version == 2
    key = keyring.get_key("api")
    assert (key.primary, key.next_primary, key.next_primary_at) == (2, None, None)
    assert [k.primary for k in keyring.list_keys(0, "")[0]] == [2]
    # Nothing was written at the switch: the store still says 1, with 2 next.
    stored = store.get_key("api")
    assert (stored.primary, stored.next_primary) == (1, 2)


def test_the_replaced_version_stays_in_the_jwks_for_the_grace_after_the_switch(
    keyring: Keyring, clock: FakeClock
) -> None:
    keyring.create_key("api", "ec-p256", "iss")
    t0 = clock.now
    old = keyring.sign_jwt("api", claims())
    keyring.rotate("api")
    at(clock, t0, LEAD + GRACE - 1)
    assert kids(keyring) == ["api/1", "api/2"]
    # A token version 1 signed before the switch still verifies against the JWKS served now.
    jose.verify_jwt(old.token, keyring.jwks("iss"), "iss", ISSUER, AUDIENCE)
    at(clock, t0, LEAD + GRACE)
    assert kids(keyring) == ["api/2"]
    with pytest.raises(TokenRejected, match="no key"):
        jose.verify_jwt(old.token, keyring.jwks("iss"), "iss", ISSUER, AUDIENCE)


def test_a_rotation_while_one_is_pending_is_refused(
    keyring: Keyring, token: FakeToken, store: FailingStore, clock: FakeClock
) -> None:
    keyring.create_key("api", "ec-p256", "iss")
    t0 = clock.now
    keyring.rotate("api")
    at(clock, t0, LEAD - 1)
    before = store.get_key("api")
    for now in (False, True):
        with pytest.raises(
            FailedPrecondition,
            match=re.escape(
                f"version 2 becomes primary at {(t0 + LEAD * SECOND).isoformat()}: rotate "
                "again after it, or set the primary version now"
            ),
        ):
            keyring.rotate("api", now=now)
    assert len(token.generated) == 2  # nothing generated for the refused ones
    assert store.get_key("api") == before
    # Once it has become primary, the next rotation folds it in and schedules version 3.
    at(clock, t0, LEAD)
    key = keyring.rotate("api")
    assert (key.primary, key.next_primary, key.next_primary_at) == (
        2,
        3,
        t0 + timedelta(seconds=2 * LEAD),
    )
    stored = store.get_key("api")
    assert (stored.primary, stored.next_primary) == (2, 3)
    assert [v.retired_at for v in stored.versions] == [
        t0 + timedelta(seconds=LEAD),
        t0 + timedelta(seconds=2 * LEAD),
        None,
    ]
    assert signed_kid(keyring) == "api/2"
    at(clock, t0, LEAD + GRACE)
    assert kids(keyring) == ["api/2", "api/3"]


def test_rotate_now_makes_the_new_version_primary_at_once(
    keyring: Keyring, store: FailingStore, clock: FakeClock
) -> None:
    keyring.create_key("api", "ec-p256", "iss")
    t0 = clock.now
    key = keyring.rotate("api", now=True)
    assert (key.primary, key.next_primary, key.next_primary_at) == (2, None, None)
    assert signed_kid(keyring) == "api/2"
    assert [v.retired_at for v in store.get_key("api").versions] == [t0, None]
    at(clock, t0, GRACE - 1)
    assert kids(keyring) == ["api/1", "api/2"]
    at(clock, t0, GRACE)
    assert kids(keyring) == ["api/2"]


def test_set_primary_to_the_pending_version_switches_at_once(
    keyring: Keyring, store: FailingStore, clock: FakeClock
) -> None:
    keyring.create_key("api", "ec-p256", "iss")
    t0 = clock.now
    keyring.rotate("api")
    at(clock, t0, 60)
    key = keyring.set_primary("api", 2)
    assert (key.primary, key.next_primary, key.next_primary_at) == (2, None, None)
    assert signed_kid(keyring) == "api/2"
    stored = store.get_key("api")
    assert (stored.primary, stored.next_primary, stored.next_primary_at) == (2, None, None)
    # Version 1 retired now, not at the lead time it was scheduled for.
    assert [v.retired_at for v in stored.versions] == [t0 + timedelta(seconds=60), None]
    at(clock, t0, 60 + GRACE)
    assert kids(keyring) == ["api/2"]


def test_set_primary_to_the_current_version_cancels_the_pending_one(
    keyring: Keyring, store: FailingStore, clock: FakeClock
) -> None:
    keyring.create_key("api", "ec-p256", "iss")
    t0 = clock.now
    keyring.rotate("api")
    at(clock, t0, 60)
    key = keyring.set_primary("api", 1)
    assert (key.primary, key.next_primary) == (1, None)
    # Version 1 is no longer to be retired; version 2, which never signed, is from now.
    assert [v.retired_at for v in store.get_key("api").versions] == [
        None,
        t0 + timedelta(seconds=60),
    ]
    at(clock, t0, LEAD)
    assert signed_kid(keyring) == "api/1"
    at(clock, t0, 60 + GRACE)
    assert kids(keyring) == ["api/1"]
    # And a rotation is allowed again.
    assert keyring.rotate("api").next_primary == 3


def test_a_pending_or_effective_primary_cannot_be_scheduled_for_destruction(
    keyring: Keyring, clock: FakeClock
) -> None:
    keyring.create_key("api", "ec-p256", "iss")
    t0 = clock.now
    keyring.rotate("api")
    with pytest.raises(FailedPrecondition, match="version 2 is to become the primary version"):
        keyring.schedule_destruction("api", 2, 0)
    at(clock, t0, LEAD)
    with pytest.raises(FailedPrecondition, match="version 2 is the primary version"):
        keyring.schedule_destruction("api", 2, 0)
    assert keyring.schedule_destruction("api", 1, 0).destroy_at is not None


def test_keys_of_other_scopes_rotate_at_once_and_keep_every_version_published(
    keyring: Keyring, store: FailingStore, clock: FakeClock
) -> None:
    keyring.create_key("plain", "ec-p256", "other")
    t0 = clock.now
    key = keyring.rotate("plain")
    assert (key.primary, key.next_primary, key.next_primary_at) == (2, None, None)
    result = keyring.sign_jwt("plain", claims(iss=None))
    assert (result.kid, result.version) == ("plain/2", 2)
    assert [v.retired_at for v in store.get_key("plain").versions] == [t0, None]
    at(clock, t0, LEAD + GRACE + 365 * 24 * 3600)
    assert kids(keyring, "other") == ["plain/1", "plain/2"]
    # A second rotation straight after the first, as before.
    assert keyring.rotate("plain").primary == 3


def test_verify_with_version_0_uses_the_effective_primary(
    keyring: Keyring, clock: FakeClock
) -> None:
    keyring.create_key("api", "ec-p256", "iss")
    t0 = clock.now
    keyring.rotate("api")
    at(clock, t0, LEAD)
    data, _, signature = keyring.sign_jwt("api", claims()).token.rpartition(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    assert keyring.verify("api", 0, data.encode(), None, raw, SigFormat.RAW) == (True, 2)


def test_an_issuers_key_signs_jwts_only(keyring: Keyring) -> None:
    """Raw Sign would mint tokens the issuer's verifiers accept with any iss and no bounded
    exp (review of issue 17): a key of an issuer's scope signs through SignJWT alone."""
    keyring.create_key("api", "ec-p256", "iss")
    keyring.create_key("plain", "ec-p256", "other")
    for sign in (
        lambda name: keyring.sign(name, 0, b"message", None),
        lambda name: keyring.plan_batch(name, 0, [(b"message", None)], pad=Padding.PSS),
    ):
        with pytest.raises(FailedPrecondition, match="signs JWTs only"):
            sign("api")
        assert sign("plain")
