"""JWTs signed in the token, JWKS per scope, and the verifier that checks scope: against the real
service, with PyJWT and jwcrypto as independent verifiers."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from jwcrypto import jwk as jc_jwk
from jwcrypto import jwt as jc_jwt

from signer.client import SignerClient, TokenRejected, verify_jwt
from signer.errors import InvalidArgument
from tests.conftest import SIGNER_BIN, RunningService, UniqueName

pytestmark = pytest.mark.integration


def claims(aud: str, **extra: object) -> dict[str, object]:
    now = int(time.time())
    return {
        "iss": "https://signer.example",
        "aud": aud,
        "sub": "user-42",
        "iat": now,
        "exp": now + 300,
        **extra,
    }


@pytest.mark.parametrize(
    ("algorithm", "alg"),
    [("ec-p256", "ES256"), ("ec-p384", "ES384"), ("ec-p521", "ES512"), ("rsa-2048", "PS256")],
)
def test_tokens_verify_with_our_verifier_pyjwt_and_jwcrypto(
    client: SignerClient, unique_name: UniqueName, algorithm: str, alg: str
) -> None:
    name = unique_name()
    client.create_key(name, algorithm, scope="consumer")
    body = claims("shop")
    token = client.sign_jwt(name, body)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": f"{name}/1", "typ": "JWT"}

    jwks = client.jwks("consumer")
    mine = [k for k in jwks["keys"] if k["kid"] == f"{name}/1"]
    assert len(mine) == 1
    assert mine[0]["scope"] == "consumer"
    assert mine[0]["alg"] == alg

    assert verify_jwt(token, jwks, "consumer", "https://signer.example", "shop") == body
    # PyJWT on its own, from the JWK alone.
    key = jwt.PyJWK(mine[0]).key
    assert jwt.decode(token, key, algorithms=[alg], audience="shop") == body
    # jwcrypto, from the whole JWKS document.
    keyset = jc_jwk.JWKSet.from_json(json.dumps(jwks))
    verified = jc_jwt.JWT(jwt=token, key=keyset, algs=[alg])
    assert json.loads(verified.claims) == body


def test_a_consumer_key_cannot_sign_for_enterprise(
    client: SignerClient, unique_name: UniqueName
) -> None:
    """The incident: a verifier for enterprise trusts a JWKS holding keys of both scopes (say,
    one document for the whole company). A consumer key signs a token for enterprise. The
    signature is valid, so a signature-only check accepts it; verify_jwt does not."""
    consumer, enterprise = unique_name("consumer"), unique_name("enterprise")
    client.create_key(consumer, "ec-p256", scope="consumer")
    client.create_key(enterprise, "ec-p256", scope="enterprise")
    token = client.sign_jwt(consumer, claims("enterprise-portal", role="admin"))

    combined = {"keys": client.jwks("consumer")["keys"] + client.jwks("enterprise")["keys"]}
    kid = jwt.get_unverified_header(token)["kid"]
    (consumer_jwk,) = [k for k in combined["keys"] if k["kid"] == kid]
    # The signature is good: a verifier that only checks signatures would let this in.
    jwt.decode(
        token, jwt.PyJWK(consumer_jwk).key, algorithms=["ES256"], audience="enterprise-portal"
    )

    with pytest.raises(TokenRejected, match="belongs to scope 'consumer', not 'enterprise'"):
        verify_jwt(token, combined, "enterprise", "https://signer.example", "enterprise-portal")
    # And an enterprise key's token is accepted by the same verifier.
    good = client.sign_jwt(enterprise, claims("enterprise-portal"))
    assert verify_jwt(good, combined, "enterprise", "https://signer.example", "enterprise-portal")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: {**c, "aud": "elsewhere"}, "InvalidAudienceError"),
        (lambda c: {**c, "iss": "https://evil.example"}, "InvalidIssuerError"),
        (lambda c: {**c, "exp": int(time.time()) - 60}, "ExpiredSignatureError"),
        (lambda c: {k: v for k, v in c.items() if k != "exp"}, "MissingRequiredClaimError"),
    ],
)
def test_claims_are_checked(
    client: SignerClient,
    unique_name: UniqueName,
    change: Callable[[dict[str, object]], dict[str, object]],
    message: str,
) -> None:
    name = unique_name()
    client.create_key(name, "ec-p256", scope="consumer")
    token = client.sign_jwt(name, change(claims("shop")))
    with pytest.raises(TokenRejected, match=message):
        verify_jwt(token, client.jwks("consumer"), "consumer", "https://signer.example", "shop")


def test_forged_headers_and_unknown_keys_are_rejected(
    client: SignerClient, unique_name: UniqueName
) -> None:
    name = unique_name()
    client.create_key(name, "ec-p256", scope="consumer")
    jwks = client.jwks("consumer")
    token = client.sign_jwt(name, claims("shop"))
    head, body, sig = token.split(".")
    forged = jwt.utils.base64url_encode(
        json.dumps({"alg": "none", "kid": f"{name}/1"}).encode()
    ).decode()
    with pytest.raises(TokenRejected, match="header alg 'none' is not the key's"):
        verify_jwt(f"{forged}.{body}.", jwks, "consumer", "https://signer.example", "shop")
    with pytest.raises(TokenRejected, match="no key"):
        verify_jwt(token, {"keys": []}, "consumer", "https://signer.example", "shop")
    with pytest.raises(TokenRejected, match="not a compact JWS"):
        verify_jwt("garbage", jwks, "consumer", "https://signer.example", "shop")
    tampered = f"{head}.{jwt.utils.base64url_encode(b'{}').decode()}.{sig}"
    with pytest.raises(TokenRejected, match="InvalidSignatureError"):
        verify_jwt(tampered, jwks, "consumer", "https://signer.example", "shop")


def test_disabled_versions_leave_the_jwks_and_rotation_adds_the_new_one(
    client: SignerClient, unique_name: UniqueName
) -> None:
    name = unique_name()
    client.create_key(name, "ec-p256", scope="rotating")
    old = client.sign_jwt(name, claims("shop"))
    client.rotate(name)
    kids = {k["kid"] for k in client.jwks("rotating")["keys"]}
    assert {f"{name}/1", f"{name}/2"} <= kids
    new = client.sign_jwt(name, claims("shop"))
    assert jwt.get_unverified_header(new)["kid"] == f"{name}/2"
    client.disable(name, 1)
    jwks = client.jwks("rotating")
    assert f"{name}/1" not in {k["kid"] for k in jwks["keys"]}
    with pytest.raises(TokenRejected, match="no key"):
        verify_jwt(old, jwks, "rotating", "https://signer.example", "shop")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "claims are empty"),
        (b"[1, 2]", "claims must be a JSON object, not list"),
        (b"{not json", "claims are not UTF-8 JSON"),
        (b'{"a": "' + b"x" * 70_000 + b'"}', "at most 65536 are accepted"),
    ],
)
def test_bad_claims_are_refused(
    client: SignerClient, unique_name: UniqueName, body: bytes, message: str
) -> None:
    name = unique_name()
    client.create_key(name, "ec-p256")
    with pytest.raises(InvalidArgument, match=message):
        client.sign_jwt(name, body)


def test_a_jwks_needs_a_scope(client: SignerClient) -> None:
    with pytest.raises(InvalidArgument, match="scope is required"):
        client.jwks("")


def test_cli_jwt_sign_and_jwks(
    service: RunningService, unique_name: UniqueName, tmp_path: Path
) -> None:
    name = unique_name()
    with service.client() as c:
        c.create_key(name, "ec-p256", scope="cli")
    (tmp_path / "claims.json").write_text(json.dumps(claims("shop")))

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(SIGNER_BIN), *args, "--address", service.address],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    token = run("jwt", "sign", name, "--claims", "claims.json").strip()
    jwks = json.loads(run("jwks", "--scope", "cli"))
    assert verify_jwt(token, jwks, "cli", "https://signer.example", "shop")["sub"] == "user-42"
