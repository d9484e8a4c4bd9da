"""signer.jose: the claims a caller sends SignJWT (each refusal named, never echoing them), the
token's compact form, and the verifier's rules (scope, alg, kid, signature, exp/nbf/iss/aud),
with keys in software. Against hostile input (issue 12): our error or TokenRejected, never
another exception. Tokens the real service signs: tests/integration/test_jwt.py."""

from __future__ import annotations

import base64
import json
import re
import time

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
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


# --- claims, each refusal named (SignJWT's input) -----------------------------------------------


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        (b"", "claims are empty: send a JSON object"),
        (b" " * (jose.MAX_CLAIMS_BYTES + 1), "claims are 65537 bytes; at most 65536 are accepted"),
        (b'{"a": "\xff"}', "claims are not UTF-8: byte 7 is not valid"),
        (b'{"a": 1', "claims are not UTF-8 JSON: Expecting"),
        (b'{"a": 1} x', "claims are not UTF-8 JSON: Extra data"),
        (b'{"sub": "me", "sub": "admin"}', "claims name one member twice"),
        (b'{"a": {"b": 1, "b": 2}}', "claims name one member twice"),
        (b'{"a": NaN}', "claims hold NaN, which is not JSON"),
        (b'{"a": -Infinity}', "claims hold -Infinity, which is not JSON"),
        (b'{"n": ' + b"7" * 4301 + b"}", "a number of more than 4300 digits"),
        (b"[]", "claims must be a JSON object, not list"),
        (b'"sub"', "claims must be a JSON object, not str"),
        (b"null", "claims must be a JSON object, not NoneType"),
        (b'{"a":' * 129 + b"1" + b"}" * 129, "more than 128 levels"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_claims_that_are_refused_say_why(claims: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        jose.check_claims(claims)


def test_a_refusal_never_echoes_the_claims() -> None:
    secret = b"do-not-echo-" + bytes(range(0x80, 0x90))
    with pytest.raises(InvalidArgument) as exc:
        jose.check_claims(b'{"a": "' + secret + b'"}')
    assert "do-not-echo" not in str(exc.value)


def test_claims_at_the_bounds_are_taken() -> None:
    at_depth = b'{"a":' * 128 + b"1" + b"}" * 128
    assert jose.check_claims(at_depth)
    # Brackets inside strings do not nest: 200 of them in a value are text.
    assert jose.check_claims(b'{"a": "' + b"[" * 200 + b'"}') == {"a": "[" * 200}
    assert jose.check_claims(b'{"a": "\\"' + b"{" * 200 + b'"}') == {"a": '"' + "{" * 200}
    padded = b'{"a":"' + b"x" * (jose.MAX_CLAIMS_BYTES - 8) + b'"}'
    assert len(padded) == jose.MAX_CLAIMS_BYTES
    assert jose.check_claims(padded)["a"] == "x" * (jose.MAX_CLAIMS_BYTES - 8)
    assert jose.check_claims(b'{"n": ' + b"7" * 4300 + b"}")["n"] == int("7" * 4300)
    assert jose.check_claims('{"ü": "é", "e": 1e3, "t": true}'.encode()) == {
        "ü": "é",
        "e": 1000.0,
        "t": True,
    }


# --- the token's shape, and verification by the verifier's rules --------------------------------

# Parameters are built at collection, minutes before a test may run in a full suite: times that
# must be in the future are a year away, not minutes (a token that expired on the way failed).
NOW = int(time.time())
A_YEAR = 365 * 86400
ISS, AUD = "https://signer.example", "portal"


def claims(**changes: object) -> bytes:
    base: dict[str, object] = {"iss": ISS, "aud": AUD, "sub": "user-42", "exp": NOW + A_YEAR}
    base.update(changes)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def es256_token(key: ec.EllipticCurvePrivateKey, kid: str, body: bytes) -> str:
    """Signed as the service does: the token holds the signing input, the signature is raw
    r || s (RFC 7518, 3.4)."""
    signing_input = jose.signing_input("ES256", kid, body)
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return jose.compact(signing_input, r.to_bytes(32, "big") + s.to_bytes(32, "big"))


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def jwks(signing_key: ec.EllipticCurvePrivateKey) -> dict[str, object]:
    key: dict[str, object] = json.loads(ECAlgorithm.to_jwk(signing_key.public_key()))
    key.update(kid="pay/1", alg="ES256", use="sig", scope="consumer")
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    theirs: dict[str, object] = json.loads(ECAlgorithm.to_jwk(other))
    theirs.update(kid="ent/1", alg="ES256", use="sig", scope="enterprise")
    return {"keys": [key, theirs]}


def test_the_compact_form_is_header_claims_signature_in_base64url() -> None:
    token = jose.compact(jose.signing_input("ES256", "k/1", b'{"a":1}'), b"\xfb\xff" * 32)
    header, body, signature = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {
        "alg": "ES256",
        "kid": "k/1",
        "typ": "JWT",
    }
    assert base64.urlsafe_b64decode(body + "==") == b'{"a":1}'  # the claims as sent, unchanged
    assert base64.urlsafe_b64decode(signature + "==") == b"\xfb\xff" * 32
    assert not set("=+/") & set(token)  # base64url, unpadded
    assert jose.b64url(b"\xfb\xff") == b"-_8"


def test_a_token_of_the_expected_scope_verifies(
    signing_key: ec.EllipticCurvePrivateKey, jwks: dict[str, object]
) -> None:
    token = es256_token(signing_key, "pay/1", claims())
    assert jose.verify_jwt(token, jwks, "consumer", ISS, AUD)["sub"] == "user-42"
    # PyJWT, as any verifier, takes the same token with the same key.
    public = signing_key.public_key()
    assert jwt.decode(token, public, algorithms=["ES256"], audience=AUD)["iss"] == ISS


def test_a_valid_signature_by_a_key_of_another_scope_is_refused(
    signing_key: ec.EllipticCurvePrivateKey, jwks: dict[str, object]
) -> None:
    """The incident this module answers: a consumer key's token at an enterprise verifier."""
    token = es256_token(signing_key, "pay/1", claims())
    with pytest.raises(TokenRejected, match="belongs to scope 'consumer', not 'enterprise'"):
        jose.verify_jwt(token, jwks, "enterprise", ISS, AUD)


@pytest.mark.parametrize(
    ("token_claims", "kid", "message"),
    [
        (claims(exp=NOW - 60), "pay/1", "ExpiredSignatureError"),
        (claims(exp=None), "pay/1", "MissingRequiredClaimError"),
        (claims(iss=None), "pay/1", "MissingRequiredClaimError"),
        (claims(aud=None), "pay/1", "MissingRequiredClaimError"),
        (claims(iss="https://evil.example"), "pay/1", "InvalidIssuerError"),
        (claims(aud="elsewhere"), "pay/1", "InvalidAudienceError"),
        (claims(nbf=NOW + A_YEAR), "pay/1", "ImmatureSignatureError"),
        (claims(), "nobody/1", "the JWKS has no key(s) with kid 'nobody/1'"),
        (claims(), "ent/1", "InvalidSignatureError"),  # kid of the other key: a forged kid
    ],
)
def test_tokens_that_do_not_hold_are_refused_saying_which_rule(
    signing_key: ec.EllipticCurvePrivateKey,
    jwks: dict[str, object],
    token_claims: bytes,
    kid: str,
    message: str,
) -> None:
    token = es256_token(signing_key, kid, token_claims)
    scope = "enterprise" if kid == "ent/1" else "consumer"
    with pytest.raises(TokenRejected, match=re.escape(message)):
        jose.verify_jwt(token, jwks, scope, ISS, AUD)


def test_leeway_admits_a_token_just_expired(
    signing_key: ec.EllipticCurvePrivateKey, jwks: dict[str, object]
) -> None:
    just_expired = int(time.time()) - 5
    token = es256_token(signing_key, "pay/1", claims(exp=just_expired))
    with pytest.raises(TokenRejected, match="ExpiredSignatureError"):
        jose.verify_jwt(token, jwks, "consumer", ISS, AUD)
    assert jose.verify_jwt(token, jwks, "consumer", ISS, AUD, leeway=60)["exp"] == just_expired


def test_a_tampered_token_is_refused(
    signing_key: ec.EllipticCurvePrivateKey, jwks: dict[str, object]
) -> None:
    header, _claims, signature = es256_token(signing_key, "pay/1", claims()).split(".")
    forged = jose.b64url(claims(sub="admin")).decode()
    with pytest.raises(TokenRejected, match="InvalidSignatureError"):
        jose.verify_jwt(f"{header}.{forged}.{signature}", jwks, "consumer", ISS, AUD)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "not a compact JWS"),
        ("a.b", "not a compact JWS"),
        ("not base64!.e30.AA", "not a compact JWS"),
    ],
)
def test_what_is_not_a_token_is_refused(jwks: dict[str, object], token: str, message: str) -> None:
    with pytest.raises(TokenRejected, match=message):
        jose.verify_jwt(token, jwks, "consumer", ISS, AUD)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"alg": "none", "kid": "pay/1"}, "header alg 'none' is not the key's ('ES256')"),
        ({"alg": "HS256", "kid": "pay/1"}, "header alg 'HS256' is not the key's ('ES256')"),
        ({"alg": "ES384", "kid": "pay/1"}, "header alg 'ES384' is not the key's ('ES256')"),
        ({"kid": "pay/1"}, "header alg 'None' is not the key's"),
        ({"alg": "ES256"}, "the JWKS has no key(s) with kid 'None'"),
    ],
)
def test_the_header_alg_must_be_the_keys(
    jwks: dict[str, object], header: dict[str, str], message: str
) -> None:
    """No alg swapping: 'none', an HMAC over the public key, or another curve's algorithm."""
    encoded = jose.b64url(json.dumps(header).encode()).decode()
    token = f"{encoded}.{jose.b64url(claims()).decode()}.{jose.b64url(bytes(64)).decode()}"
    with pytest.raises(TokenRejected, match=re.escape(message)):
        jose.verify_jwt(token, jwks, "consumer", ISS, AUD)


def test_a_kid_named_twice_in_the_jwks_is_refused(
    signing_key: ec.EllipticCurvePrivateKey, jwks: dict[str, object]
) -> None:
    keys = jwks["keys"]
    assert isinstance(keys, list)
    doubled = {"keys": [keys[0], {**keys[1], "kid": "pay/1"}]}
    token = es256_token(signing_key, "pay/1", claims())
    with pytest.raises(TokenRejected, match=re.escape("the JWKS has 2 key(s) with kid 'pay/1'")):
        jose.verify_jwt(token, doubled, "consumer", ISS, AUD)
