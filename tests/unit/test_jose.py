"""signer.jose against hostile input (issue 12): claims a caller sends SignJWT, and tokens and
JWKS documents a verifier is handed. Our error or TokenRejected, never another exception."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm

from fuzz import targets
from signer import jose
from signer.errors import InvalidArgument, TokenRejected


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_claims_nested_too_deeply_are_invalid_argument() -> None:
    """Once a RecursionError out of SignJWT (json has no depth limit): 64 KiB of '['."""
    with pytest.raises(InvalidArgument, match="nest arrays or objects too deeply"):
        jose.check_claims(b"[" * 60_000)
    assert jose.check_claims(b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}")


@pytest.fixture(scope="module")
def jwk() -> dict[str, object]:
    key = ec.generate_private_key(ec.SECP256R1())
    out: dict[str, object] = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    out.update(kid="k1", alg="ES256", scope="consumer")
    return out


HEADER = _b64(b'{"alg":"ES256","kid":"k1"}')
TOKEN = f"{HEADER}.{_b64(b'{}')}.{_b64(bytes(64))}"


@pytest.mark.parametrize(
    ("jwks", "message"),
    [
        ({"keys": 4}, "no list of keys"),
        ({"keys": {"k1": {}}}, "no list of keys"),
        ({}, "no list of keys"),
        (
            {
                "keys": [
                    {
                        "kid": "k1",
                        "scope": "consumer",
                        "alg": "ES256",
                        "kty": "EC",
                        "crv": "P-256",
                        "x": 5,
                        "y": [],
                    }
                ]
            },
            "is not usable",
        ),
        ({"keys": [{"kid": "k1", "scope": "consumer", "alg": "ES256", "kty": 7}]}, "is not usable"),
    ],
)
def test_malformed_jwks_rejects_the_token(jwks: dict[str, object], message: str) -> None:
    """A JWKS whose 'keys' is not a list once raised TypeError (found by fuzz/targets.py:jwt)."""
    with pytest.raises(TokenRejected, match=message):
        jose.verify_jwt(TOKEN, jwks, "consumer", "iss", "aud")


def test_header_alg_of_another_type(jwk: dict[str, object]) -> None:
    header = _b64(json.dumps({"alg": ["ES256"], "kid": "k1"}).encode())
    token = f"{header}.{_b64(b'{}')}.{_b64(bytes(64))}"
    bad = {**jwk, "alg": ["ES256"]}  # the same list in the key: equal, and unhashable
    with pytest.raises(TokenRejected, match="header alg"):
        jose.verify_jwt(token, {"keys": [bad]}, "consumer", "iss", "aud")


def test_a_kid_is_shown_bounded(jwk: dict[str, object]) -> None:
    header = _b64(json.dumps({"alg": "ES256", "kid": "k" * 10_000}).encode())
    with pytest.raises(TokenRejected) as ei:
        jose.verify_jwt(f"{header}.e30.AA", {"keys": [jwk]}, "consumer", "iss", "aud")
    assert len(str(ei.value)) < 200


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_as_claims_token_and_jwks(data: bytes) -> None:
    targets.jwt(data)
