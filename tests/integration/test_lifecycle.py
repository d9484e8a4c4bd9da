"""Key lifecycle through the real gRPC client: rotation, primary, disable/enable, destruction.

Time never passes by sleeping: the service runs on an injected :class:`FakeClock`, and the
reaper is run by hand (``service.blocking(service.server.keyring.reap)``). Whether a version's
private key is really gone is checked through the token itself, not through the service's
metadata.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.timestamp_pb2 import Timestamp

from signer.client import SignerClient
from signer.errors import FailedPrecondition, InvalidArgument, NotFound
from signer.v1 import signer_pb2 as pb
from tests.conftest import RunningService, ServiceFactory, UniqueName

pytestmark = pytest.mark.integration

DAY = 24 * 3600
MESSAGE = b"lifecycle payload"


# --- helpers ------------------------------------------------------------------------------------


def ts(t: Timestamp) -> datetime:
    return t.ToDatetime(tzinfo=UTC)


def version_of(key: pb.Key, number: int) -> pb.KeyVersion:
    for v in key.versions:
        if v.version == number:
            return v
    raise AssertionError(f"key {key.name} has no version {number}: {key}")


def state_of(client: SignerClient, name: str, number: int) -> int:
    return version_of(client.get_key(name), number).state


def verifies_locally(client: SignerClient, name: str, version: int, sig: bytes) -> bool:
    """Checks ``sig`` over MESSAGE with the version's public key, outside the service."""
    pub = serialization.load_pem_public_key(client.public_key(name, version).pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    try:
        pub.verify(sig, MESSAGE, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def key_id(service: RunningService, name: str, number: int) -> bytes:
    """The CKA_ID of a version's token objects, from the service's metadata store."""
    for v in service.server.store.get_key(name).versions:
        if v.version == number:
            return v.key_id
    raise AssertionError(f"no version {number} of {name} in the store")


def in_token(service: RunningService, kid: bytes) -> bool:
    """Asks the token itself (not the metadata) whether objects with this CKA_ID exist."""
    return bool(service.blocking(lambda: service.server.token.exists(kid)))


def reap(service: RunningService) -> int:
    return int(service.blocking(service.server.keyring.reap))


def new_key(client: SignerClient, name: str, versions: int = 1) -> pb.Key:
    """An ec-p256 key with ``versions`` versions; the newest is primary."""
    key = client.create_key(name, "ec-p256")
    for _ in range(versions - 1):
        key = client.rotate(name)
    return key


# --- rotation and primary ---------------------------------------------------------------------


def test_rotate_creates_version_2_and_sign_defaults_to_it(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    name = unique_name()
    key = client.create_key(name, "ec-p256")
    assert key.primary_version == 1
    assert [v.version for v in key.versions] == [1]

    key = client.rotate(name)
    assert key.primary_version == 2
    assert [(v.version, v.state) for v in key.versions] == [(1, pb.ENABLED), (2, pb.ENABLED)]
    assert client.get_key(name) == key
    assert client.public_key(name, 1).pem != client.public_key(name, 2).pem
    assert client.public_key(name).version == 2
    # Two distinct key pairs in the token.
    kid1, kid2 = key_id(service, name, 1), key_id(service, name, 2)
    assert kid1 != kid2
    assert in_token(service, kid1)
    assert in_token(service, kid2)

    # Sign defaults to the new primary ...
    new = client.sign(name, message=MESSAGE)
    assert new.version == 2
    assert verifies_locally(client, name, 2, new.signature)
    assert not verifies_locally(client, name, 1, new.signature)
    assert client.verify(name, new.signature, message=MESSAGE)

    # ... while the old version still signs when asked by number, and verifies.
    old = client.sign(name, message=MESSAGE, version=1)
    assert old.version == 1
    assert verifies_locally(client, name, 1, old.signature)
    assert client.verify(name, old.signature, message=MESSAGE, version=1)
    assert not client.verify(name, old.signature, message=MESSAGE)  # primary is v2 now

    # Version numbers keep counting.
    assert client.rotate(name).primary_version == 3


def test_set_primary_back_and_refuse_a_version_that_is_not_enabled(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    name = unique_name()
    new_key(client, name, versions=2)

    key = client.set_primary(name, 1)
    assert key.primary_version == 1
    assert client.get_key(name).primary_version == 1
    assert client.sign(name, message=MESSAGE).version == 1
    assert client.public_key(name).version == 1

    client.disable(name, 2)
    with pytest.raises(FailedPrecondition) as exc:
        client.set_primary(name, 2)
    assert f"'{name}' version 2 is disabled" in exc.value.message
    assert client.get_key(name).primary_version == 1

    client.schedule_destruction(name, 2)
    with pytest.raises(FailedPrecondition, match="destruction scheduled"):
        client.set_primary(name, 2)
    with pytest.raises(NotFound, match="no version 9"):
        client.set_primary(name, 9)
    assert client.get_key(name).primary_version == 1


# --- disable / enable -------------------------------------------------------------------------


def test_disabled_version_neither_signs_nor_verifies_until_enabled(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    name = unique_name()
    new_key(client, name, versions=2)
    sig = client.sign(name, message=MESSAGE, version=1).signature

    v = client.disable(name, 1)
    assert (v.version, v.state) == (1, pb.DISABLED)
    assert state_of(client, name, 1) == pb.DISABLED
    assert client.disable(name, 1).state == pb.DISABLED  # idempotent

    with pytest.raises(FailedPrecondition) as exc:
        client.sign(name, message=MESSAGE, version=1)
    assert f"'{name}' version 1 is disabled" in exc.value.message
    with pytest.raises(FailedPrecondition, match="disabled"):
        client.verify(name, sig, message=MESSAGE, version=1)
    # The other version is untouched.
    assert client.sign(name, message=MESSAGE).version == 2

    v = client.enable(name, 1)
    assert (v.version, v.state) == (1, pb.ENABLED)
    assert state_of(client, name, 1) == pb.ENABLED
    assert client.verify(name, sig, message=MESSAGE, version=1)
    again = client.sign(name, message=MESSAGE, version=1)
    assert again.version == 1
    assert client.verify(name, again.signature, message=MESSAGE, version=1)


def test_disabling_the_primary_stops_default_signing(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    name = unique_name()
    new_key(client, name)
    client.disable(name, 1)
    with pytest.raises(FailedPrecondition, match="version 1 is disabled"):
        client.sign(name, message=MESSAGE)
    client.enable(name, 1)
    assert client.sign(name, message=MESSAGE).version == 1


# --- scheduling destruction -------------------------------------------------------------------


def test_schedule_destruction_default_period_then_cancel(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    name = unique_name()
    new_key(client, name, versions=2)
    sig = client.sign(name, message=MESSAGE, version=1).signature
    now = service.clock.now

    v = client.schedule_destruction(name, 1)  # 0 = the configured default, 7 days
    assert v.state == pb.DESTRUCTION_SCHEDULED
    assert ts(v.destroy_time) == now + timedelta(days=7)
    stored = version_of(client.get_key(name), 1)
    assert stored.state == pb.DESTRUCTION_SCHEDULED
    assert ts(stored.destroy_time) == now + timedelta(days=7)

    with pytest.raises(FailedPrecondition) as exc:
        client.sign(name, message=MESSAGE, version=1)
    assert f"'{name}' version 1 is destruction scheduled" in exc.value.message
    with pytest.raises(FailedPrecondition, match="destruction scheduled"):
        client.verify(name, sig, message=MESSAGE, version=1)
    with pytest.raises(FailedPrecondition, match="destruction scheduled"):
        client.enable(name, 1)
    with pytest.raises(FailedPrecondition, match="destruction scheduled"):
        client.schedule_destruction(name, 1)
    assert ts(version_of(client.get_key(name), 1).destroy_time) == now + timedelta(days=7)
    # The primary is unaffected.
    assert client.sign(name, message=MESSAGE).version == 2

    # Cancelling brings it back disabled, without a destroy time; enabling is a second step.
    v = client.cancel_destruction(name, 1)
    assert v.state == pb.DISABLED
    assert not v.HasField("destroy_time")
    stored = version_of(client.get_key(name), 1)
    assert stored.state == pb.DISABLED
    assert not stored.HasField("destroy_time")
    with pytest.raises(FailedPrecondition, match="disabled"):
        client.sign(name, message=MESSAGE, version=1)
    with pytest.raises(FailedPrecondition, match="disabled; cannot make it disabled"):
        client.cancel_destruction(name, 1)

    assert client.enable(name, 1).state == pb.ENABLED
    assert client.sign(name, message=MESSAGE, version=1).version == 1
    assert client.verify(name, sig, message=MESSAGE, version=1)
    assert in_token(service, key_id(service, name, 1))


def test_schedule_destruction_with_an_explicit_period(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    name = unique_name()
    new_key(client, name, versions=3)
    now = service.clock.now

    v = client.schedule_destruction(name, 1, waiting_period_seconds=2 * DAY + 5)
    assert v.state == pb.DESTRUCTION_SCHEDULED
    assert ts(v.destroy_time) == now + timedelta(days=2, seconds=5)
    assert ts(version_of(client.get_key(name), 1).destroy_time) == now + timedelta(
        days=2, seconds=5
    )

    # Exactly the minimum (1 day by default) is accepted; a disabled version may be scheduled.
    client.disable(name, 2)
    v = client.schedule_destruction(name, 2, waiting_period_seconds=DAY)
    assert v.state == pb.DESTRUCTION_SCHEDULED
    assert ts(v.destroy_time) == now + timedelta(days=1)


def test_default_and_minimum_periods_come_from_the_config(
    service_factory: ServiceFactory, unique_name: UniqueName
) -> None:
    service = service_factory(
        keys={
            "destruction_waiting_period_seconds": 3 * DAY,
            "min_destruction_waiting_period_seconds": 3600,
        }
    )
    client = service.client()
    name = unique_name()
    new_key(client, name, versions=3)
    now = service.clock.now

    v = client.schedule_destruction(name, 1)
    assert ts(v.destroy_time) == now + timedelta(days=3)
    with pytest.raises(InvalidArgument, match="at least 3600, got 3599"):
        client.schedule_destruction(name, 2, waiting_period_seconds=3599)
    v = client.schedule_destruction(name, 2, waiting_period_seconds=3600)
    assert ts(v.destroy_time) == now + timedelta(hours=1)


def test_the_primary_version_cannot_be_scheduled(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    name = unique_name()
    new_key(client, name)
    with pytest.raises(FailedPrecondition) as exc:
        client.schedule_destruction(name, 1)
    assert f"'{name}' version 1 is the primary version" in exc.value.message
    assert state_of(client, name, 1) == pb.ENABLED

    client.rotate(name)
    with pytest.raises(FailedPrecondition, match="version 2 is the primary version"):
        client.schedule_destruction(name, 2, waiting_period_seconds=3 * DAY)
    assert state_of(client, name, 2) == pb.ENABLED
    # Once it is no longer primary, the old version may be scheduled.
    assert client.schedule_destruction(name, 1).state == pb.DESTRUCTION_SCHEDULED


@pytest.mark.parametrize("seconds", [1, DAY - 1])
def test_waiting_period_below_the_minimum_is_invalid(
    service: RunningService, unique_name: UniqueName, seconds: int
) -> None:
    client = service.client()
    name = unique_name()
    new_key(client, name, versions=2)
    with pytest.raises(InvalidArgument) as exc:
        client.schedule_destruction(name, 1, waiting_period_seconds=seconds)
    assert "waiting_period_seconds" in exc.value.message
    assert f"at least {DAY}, got {seconds}" in exc.value.message
    v = version_of(client.get_key(name), 1)
    assert v.state == pb.ENABLED
    assert not v.HasField("destroy_time")


# --- destruction ------------------------------------------------------------------------------


def test_version_is_destroyed_once_its_period_has_passed(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    name = unique_name()
    new_key(client, name, versions=2)
    kid = key_id(service, name, 1)
    sig = client.sign(name, message=MESSAGE, version=1).signature
    destroy_at = ts(client.schedule_destruction(name, 1).destroy_time)
    assert destroy_at == service.clock.now + timedelta(days=7)

    # One second short of the period: still scheduled, and the reaper leaves it alone.
    service.clock.advance(days=7, seconds=-1)
    assert state_of(client, name, 1) == pb.DESTRUCTION_SCHEDULED
    assert reap(service) == 0
    assert in_token(service, kid)

    # The moment the period has passed the version is DESTROYED, before the reaper runs.
    service.clock.advance(seconds=1)
    assert service.clock.now == destroy_at
    v = version_of(client.get_key(name), 1)
    assert v.state == pb.DESTROYED
    assert ts(v.destroy_time) == destroy_at
    assert v.pkcs11_uri == ""
    assert in_token(service, kid)  # the reaper has not run: only the effective state changed
    with pytest.raises(FailedPrecondition, match=f"'{name}' version 1 is destroyed"):
        client.sign(name, message=MESSAGE, version=1)
    with pytest.raises(FailedPrecondition, match="destroyed"):
        client.verify(name, sig, message=MESSAGE, version=1)
    with pytest.raises(FailedPrecondition, match="destroyed"):
        client.public_key(name, 1)
    with pytest.raises(FailedPrecondition, match="destroyed"):
        client.cancel_destruction(name, 1)
    with pytest.raises(FailedPrecondition, match="destroyed"):
        client.enable(name, 1)
    with pytest.raises(FailedPrecondition, match="destroyed"):
        client.set_primary(name, 1)
    assert client.list_keys().keys[0].versions[0].state == pb.DESTROYED

    # The reaper destroys the token objects, once.
    service.clock.advance(hours=1)
    assert reap(service) == 1
    assert not in_token(service, kid)
    stored = service.server.store.get_key(name).versions[0]
    assert stored.state.value == "destroyed"
    assert stored.destroy_at == destroy_at  # when it was due, not when the reaper ran
    assert reap(service) == 0

    v = version_of(client.get_key(name), 1)
    assert (v.state, ts(v.destroy_time)) == (pb.DESTROYED, destroy_at)
    with pytest.raises(FailedPrecondition, match="destroyed"):
        client.enable(name, 1)
    with pytest.raises(FailedPrecondition, match="destroyed"):
        client.cancel_destruction(name, 1)
    with pytest.raises(FailedPrecondition, match="destroyed"):
        client.disable(name, 1)
    with pytest.raises(FailedPrecondition, match="destroyed"):
        client.sign(name, message=MESSAGE, version=1)

    # The rest of the key lives on, and version numbers are never reused.
    assert in_token(service, key_id(service, name, 2))
    assert client.sign(name, message=MESSAGE).version == 2
    assert client.rotate(name).primary_version == 3


def test_reaper_spares_versions_not_yet_due_or_cancelled(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    due, cancelled, later = unique_name("due"), unique_name("cancelled"), unique_name("later")
    for name in (due, cancelled, later):
        new_key(client, name, versions=2)
    kids = {name: key_id(service, name, 1) for name in (due, cancelled, later)}
    client.schedule_destruction(due, 1, waiting_period_seconds=2 * DAY)
    client.schedule_destruction(cancelled, 1, waiting_period_seconds=2 * DAY)
    client.schedule_destruction(later, 1, waiting_period_seconds=30 * DAY)

    service.clock.advance(days=1)
    assert reap(service) == 0
    assert all(in_token(service, kid) for kid in kids.values())
    assert client.cancel_destruction(cancelled, 1).state == pb.DISABLED

    service.clock.advance(days=2)
    with pytest.raises(FailedPrecondition, match="destroyed; cannot make it disabled"):
        client.cancel_destruction(due, 1)  # too late: the period has passed
    assert reap(service) == 1
    assert not in_token(service, kids[due])
    assert in_token(service, kids[cancelled])
    assert in_token(service, kids[later])
    assert state_of(client, due, 1) == pb.DESTROYED
    assert state_of(client, cancelled, 1) == pb.DISABLED
    assert state_of(client, later, 1) == pb.DESTRUCTION_SCHEDULED
    assert client.enable(cancelled, 1).state == pb.ENABLED
    assert client.sign(cancelled, message=MESSAGE, version=1).version == 1


# --- listing ----------------------------------------------------------------------------------


def test_list_keys_pages_in_name_order(service: RunningService, unique_name: UniqueName) -> None:
    client = service.client()
    prefix = unique_name("page")
    names = [f"{prefix}-{i}" for i in range(7)]
    for name in random.Random(7).sample(names, len(names)):  # creation order must not matter
        client.create_key(name, "ec-p256")

    pages = []
    token = ""
    while True:
        page = client.list_keys(page_size=3, page_token=token)
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
    assert [len(p.keys) for p in pages] == [3, 3, 1]
    assert all(p.next_page_token for p in pages[:-1])
    assert pages[-1].next_page_token == ""
    assert [k.name for p in pages for k in p.keys] == sorted(names)
    assert all(k.algorithm == "ec-p256" and len(k.versions) == 1 for p in pages for k in p.keys)

    assert [k.name for k in client.iter_keys(page_size=3)] == sorted(names)
    exact = client.list_keys(page_size=7)  # a page that is exactly full is the last one
    assert ([k.name for k in exact.keys], exact.next_page_token) == (sorted(names), "")
    default = client.list_keys()
    assert ([k.name for k in default.keys], default.next_page_token) == (sorted(names), "")
    assert len(client.list_keys(page_size=1000).keys) == 7


def test_list_keys_rejects_a_page_size_over_1000(service: RunningService) -> None:
    client = service.client()
    with pytest.raises(InvalidArgument, match="page_size must be at most 1000, got 1001"):
        client.list_keys(page_size=1001)


@pytest.mark.parametrize(
    "token", ["garbage", "not a token!", "AAAA", "%%%%", "\u043a\u043b\u044e\u0447", "a" * 500]
)
def test_list_keys_rejects_a_garbage_page_token(
    service: RunningService, unique_name: UniqueName, token: str
) -> None:
    client = service.client()
    client.create_key(unique_name(), "ec-p256")
    with pytest.raises(InvalidArgument, match="page_token is malformed"):
        client.list_keys(page_size=3, page_token=token)


# --- scope and labels -------------------------------------------------------------------------


def test_scope_and_labels_are_stored_and_returned(
    service: RunningService, unique_name: UniqueName
) -> None:
    client = service.client()
    name, plain = unique_name(), unique_name("plain")
    labels = {"team": "payments", "env": "prod", "cost_center": "4711", "empty": ""}
    created = client.create_key(name, "ec-p256", scope="payments:eu-1", labels=labels)
    client.create_key(plain, "ec-p256")
    assert (created.scope, dict(created.labels)) == ("payments:eu-1", labels)

    key = client.get_key(name)
    assert (key.scope, dict(key.labels)) == ("payments:eu-1", labels)
    listed = {k.name: k for k in client.list_keys().keys}
    assert (listed[name].scope, dict(listed[name].labels)) == ("payments:eu-1", labels)
    # No scope given: the default one.
    assert (listed[plain].scope, dict(listed[plain].labels)) == ("default", {})

    # Fixed at creation: a rotation keeps them.
    rotated = client.rotate(name)
    assert (rotated.scope, dict(rotated.labels)) == ("payments:eu-1", labels)
    assert client.get_key(name) == rotated
