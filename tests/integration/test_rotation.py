"""Rotation of a key in an issuer's scope (issue 17) through the real service and SoftHSM2:
RotateKey publishes the new version and makes it primary after [jwt] rotation_lead_seconds
(the service's clock is a FakeClock), RotateKey with now at once, and Key says which version is
next and when."""

from __future__ import annotations

import time
from datetime import timedelta

import jwt
import pytest

from signer.client import verify_jwt
from signer.errors import FailedPrecondition
from tests.conftest import ServiceFactory, UniqueName

pytestmark = pytest.mark.integration

ISSUER = "https://issuer.example/iss"
LEAD = 3600.0


def test_rotate_publishes_first_and_switches_after_the_lead(
    service_factory: ServiceFactory, unique_name: UniqueName
) -> None:
    svc = service_factory(jwt={"issuers": f"iss={ISSUER}", "rotation_lead_seconds": LEAD})
    client = svc.client()
    name = unique_name()
    client.create_key(name, "ec-p256", scope="iss")
    t0 = svc.clock()
    key = client.rotate(name)
    assert (key.primary_version, key.next_primary_version) == (1, 2)
    assert key.next_primary_time.ToDatetime().timestamp() == pytest.approx(
        (t0 + timedelta(seconds=LEAD)).timestamp(), abs=1e-3
    )
    body = {"iss": ISSUER, "aud": "rp", "exp": int(time.time()) + 300}

    def kid() -> str:
        token = client.sign_jwt(name, body)
        assert verify_jwt(token, client.jwks("iss"), "iss", ISSUER, "rp") == body
        return str(jwt.get_unverified_header(token)["kid"])

    assert [k["kid"] for k in client.jwks("iss")["keys"]] == [f"{name}/1", f"{name}/2"]
    assert kid() == f"{name}/1"
    with pytest.raises(FailedPrecondition, match="version 2 becomes primary at"):
        client.rotate(name, now=True)
    svc.clock.advance(seconds=LEAD)
    assert kid() == f"{name}/2"
    key = client.get_key(name)
    assert (key.primary_version, key.next_primary_version, key.HasField("next_primary_time")) == (
        2,
        0,
        False,
    )
    key = client.rotate(name, now=True)
    assert (key.primary_version, key.next_primary_version) == (3, 0)
    assert kid() == f"{name}/3"
